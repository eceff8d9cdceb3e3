"""CLI flag values -> InterventionSpec and ReadoutSpec."""

import pytest
from attnserve_client.flags import (
    attention_rows_from_flags,
    emphasis_from_flags,
    parse_index_list,
    parse_token_range,
    sink_calibration_from_flag,
    specs_from_flags,
)
from attnserve_client.spec import SpecError
from attnserve_client.v1 import intervention_pb2, readout_pb2


@pytest.mark.parametrize(
    ("text", "indices"),
    [("3", [3]), ("0,2", [0, 2]), ("2-4,9", [2, 3, 4, 9]), ("5,1-2,2", [1, 2, 5]), (" 1 , 3 ", [1, 3])],
)
def test_index_lists(text, indices):
    assert parse_index_list(text) == indices


@pytest.mark.parametrize("text", ["", "a", "3-", "-1", "4-2", "1,,2"])
def test_bad_index_lists(text):
    with pytest.raises(SpecError, match="layer list"):
        parse_index_list(text, "layer")


def test_sink_calibration_flag():
    intervention = sink_calibration_from_flag("3-4:0,2", tau=0.2, beta=0.5)
    assert intervention == intervention_pb2.Intervention(
        selector=intervention_pb2.Selector(layers=[3, 4], heads=[0, 2]),
        sink_calibration=intervention_pb2.SinkCalibration(tau=0.2, beta=0.5),
    )


def test_sink_calibration_flag_defaults_to_every_head_and_server_parameters():
    intervention = sink_calibration_from_flag("7")
    assert list(intervention.selector.heads) == []
    assert not intervention.sink_calibration.HasField("tau")
    assert not intervention.sink_calibration.HasField("beta")


def test_emphasis_down_weights_every_other_prompt_token():
    intervention = emphasis_from_flags(["0:5", "9:12"], alpha=0.05)
    keys = intervention.selector.keys
    assert [(r.start, r.end) for r in keys.ranges] == [(0, 5), (9, 12)]
    assert keys.invert
    assert intervention.key_emphasis.alpha == pytest.approx(0.05)
    assert not intervention.selector.layers


@pytest.mark.parametrize("text", ["5", "5:", "a:b", "5:3", "-1:2", "3:3"])
def test_bad_token_ranges(text):
    with pytest.raises(SpecError, match="token range"):
        parse_token_range(text)


def test_attention_rows_union():
    spec = attention_rows_from_flags(["5:0", "7:1-2:0,3"])
    assert spec == readout_pb2.AttentionRowsSpec(layers=[5, 7], heads=[0, 1, 2], steps=[0, 3])


@pytest.mark.parametrize("text", ["5", "5:0:1:2", "x:0"])
def test_bad_attention_rows(text):
    with pytest.raises(SpecError):
        attention_rows_from_flags([text])


def test_specs_from_flags():
    interventions, readouts = specs_from_flags(
        presets=["act"],
        sink_calibration=["3:0", "4"],
        tau=0.3,
        emphasize=["0:5"],
        alpha=0.01,
        layer_statistics=True,
        summary=True,
        attention_rows=["5:0"],
    )
    assert list(interventions.presets) == ["act"]
    operations = [i.WhichOneof("operation") for i in interventions.interventions]
    assert operations == ["sink_calibration", "sink_calibration", "key_emphasis"]
    assert [list(i.selector.layers) for i in interventions.interventions[:2]] == [[3], [4]]
    assert readouts == readout_pb2.ReadoutSpec(
        layer_statistics=True,
        summary=True,
        attention_rows=readout_pb2.AttentionRowsSpec(layers=[5], heads=[0], steps=[0]),
    )


def test_no_flags_give_empty_specs():
    interventions, readouts = specs_from_flags()
    assert interventions.ByteSize() == 0
    assert readouts.ByteSize() == 0
