"""Spec dicts (what JSON and YAML spec files hold) -> InterventionSpec and ReadoutSpec."""

import json

import pytest
from attnserve_client.spec import (
    SpecError,
    intervention_from_dict,
    load_spec_file,
    readout_spec_from_dict,
    specs_from_dict,
)
from attnserve_client.v1 import intervention_pb2, readout_pb2

EXAMPLE = {
    "presets": ["act"],
    "interventions": [
        {"layers": [3], "heads": [0, 2], "sink_calibration": {"tau": 0.1, "beta": 0.4}},
        {
            "keys": {"ranges": [[0, 5]], "invert": True},
            "key_emphasis": {"alpha": 0.01},
            "steps": {"start": 0, "end": 4},
        },
    ],
    "readouts": {
        "layer_statistics": True,
        "attention_rows": {"layers": [5], "heads": [0], "steps": [0]},
        "summary": True,
    },
}


def test_example_spec():
    interventions, readouts = specs_from_dict(EXAMPLE)

    assert interventions == intervention_pb2.InterventionSpec(
        presets=["act"],
        interventions=[
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(layers=[3], heads=[0, 2]),
                sink_calibration=intervention_pb2.SinkCalibration(tau=0.1, beta=0.4),
            ),
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(
                    keys=intervention_pb2.KeySelector(
                        ranges=[intervention_pb2.TokenRange(start=0, end=5)], invert=True
                    ),
                    steps=intervention_pb2.StepRange(start=0, end=4),
                ),
                key_emphasis=intervention_pb2.KeyEmphasis(alpha=0.01),
            ),
        ],
    )
    assert readouts == readout_pb2.ReadoutSpec(
        layer_statistics=True,
        attention_rows=readout_pb2.AttentionRowsSpec(layers=[5], heads=[0], steps=[0]),
        summary=True,
    )


def test_nested_selector_equals_flat_selector():
    flat = intervention_from_dict({"layers": [1, 2], "queries": "last", "logit_rescale": {"alpha": 0.5}})
    nested = intervention_from_dict(
        {"selector": {"layers": [1, 2], "queries": "QUERY_SCOPE_LAST"}, "logit_rescale": {"alpha": 0.5}}
    )
    assert flat == nested
    assert flat.selector.queries == intervention_pb2.QUERY_SCOPE_LAST


def test_conveniences():
    intervention = intervention_from_dict(
        {"keys": [[2, 4], {"start": 7, "end": 9}], "steps": [3, None], "attention": "self", "key_mask": None}
    )
    selector = intervention.selector
    assert [(r.start, r.end) for r in selector.keys.ranges] == [(2, 4), (7, 9)]
    assert selector.steps.start == 3 and not selector.steps.HasField("end")
    assert selector.attention == intervention_pb2.ATTENTION_KIND_SELF
    assert intervention.WhichOneof("operation") == "key_mask"


def test_layer_names_in_selectors_and_attention_rows():
    intervention = intervention_from_dict(
        {"layer_names": ["model.layers.1?.self_attn"], "attention": "cross", "key_mask": None}
    )
    assert list(intervention.selector.layer_names) == ["model.layers.1?.self_attn"]
    assert intervention.selector.attention == intervention_pb2.ATTENTION_KIND_CROSS
    readouts = readout_spec_from_dict({"attention_rows": {"layer_names": ["*.self_attn"]}})
    assert list(readouts.attention_rows.layer_names) == ["*.self_attn"]


def test_unset_parameters_stay_unset():
    intervention = intervention_from_dict({"sink_calibration": {}})
    assert not intervention.sink_calibration.HasField("tau")
    assert not intervention.HasField("selector")


def test_readout_mass_ranges_pairs():
    readouts = readout_spec_from_dict({"mass_ranges": [[0, 3], [3, 8]]})
    assert [(r.start, r.end) for r in readouts.mass_ranges] == [(0, 3), (3, 8)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"bogus": 1}, "spec: unknown key 'bogus'"),
        ({"interventions": [{"layers": [1]}]}, "interventions[0]: set exactly one operation"),
        (
            {"interventions": [{"key_mask": {}, "sink_calibration": {}}]},
            "interventions[0]: set exactly one operation",
        ),
        ({"interventions": [{"key_mask": {}, "layerz": [1]}]}, "interventions[0]: unknown key 'layerz'"),
        ({"interventions": [{"sink_calibration": {"taux": 1}}]}, 'no field named "taux"'),
        ({"interventions": [{"key_mask": {}, "queries": "first"}]}, "QUERY_SCOPE_FIRST"),
        ({"interventions": [{"key_mask": {}, "keys": [[1]]}]}, "interventions[0].selector.keys.ranges[0]"),
        (
            {"interventions": [{"key_mask": {}, "layers": [1], "selector": {"layers": [2]}}]},
            "layers is set both at the top level and in selector",
        ),
        ({"interventions": {"key_mask": {}}}, "interventions: expected a list"),
        ({"interventions": ["key_mask"]}, "interventions[0]: expected a mapping"),
        ({"presets": "act"}, "presets: expected a list of preset names"),
        ({"readouts": {"rows": {}}}, 'no field named "rows"'),
    ],
)
def test_invalid_specs(spec, message):
    with pytest.raises(SpecError) as raised:
        specs_from_dict(spec)
    assert message in str(raised.value)


def test_load_json_and_yaml(tmp_path):
    json_file = tmp_path / "spec.json"
    json_file.write_text(json.dumps(EXAMPLE))
    yaml_file = tmp_path / "spec.yaml"
    yaml_file.write_text(
        "presets: [act]\n"
        "interventions:\n"
        "  - layers: [3]\n"
        "    heads: [0, 2]\n"
        "    sink_calibration: {tau: 0.1, beta: 0.4}\n"
        "  - keys: {ranges: [[0, 5]], invert: true}\n"
        "    key_emphasis: {alpha: 0.01}\n"
        "    steps: {start: 0, end: 4}\n"
        "readouts:\n"
        "  layer_statistics: true\n"
        "  attention_rows: {layers: [5], heads: [0], steps: [0]}\n"
        "  summary: true\n"
    )
    assert load_spec_file(json_file) == EXAMPLE
    assert specs_from_dict(load_spec_file(yaml_file)) == specs_from_dict(EXAMPLE)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml"):
        load_spec_file(tmp_path / "missing.yaml")
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec_file(not_a_mapping)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SpecError, match="broken.json"):
        load_spec_file(broken)
