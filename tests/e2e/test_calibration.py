"""`attnserve calibrate` on a small labelled set, then the preset served by name: GetModel lists it
with its provenance and Score reproduces its recorded held-out effect."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import grpc
import pytest
import yaml
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb

from .conftest import running_server

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "sentiment.jsonl"
PRESET = "act-sentiment"
#: The per-layer sweep of every layer 2-29 chose 12, 15 and 16 on this data (README, bench/); a
#: few layers around them keep the test short.
SEARCH = ["--layers", "12-16", "--budget", "2", "--search", "layer-sweep"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("calibration")
    model = {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}
    plain_config = folder / "plain.yaml"
    plain_config.write_text(yaml.safe_dump({"models": [model]}))
    preset_file = folder / "act-sentiment.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "attnserve.cli", "calibrate", str(DATA), "--config", str(plain_config)]
        + ["--output", str(preset_file), "--bootstrap-resamples", "500", *SEARCH],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out margin" in result.stdout
    served_config = folder / "served.yaml"
    served_config.write_text(
        yaml.safe_dump({"models": [{**model, "presets": [{"name": PRESET, "file": str(preset_file)}]}]})
    )
    return {"preset": yaml.safe_load(preset_file.read_text()), "config": served_config, "folder": folder}


@pytest.fixture(scope="module")
def stub(calibrated):
    log = calibrated["folder"] / "server.log"
    with (
        running_server(calibrated["config"], log) as server,
        grpc.insecure_channel(server["target"]) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


def test_preset_file_records_method_heads_and_effect(calibrated):
    preset = calibrated["preset"]
    [intervention] = preset["interventions"]
    assert intervention["sink_calibration"] == {"tau": 0.1, "beta": 0.4, "min_queries": 0}
    chosen = [item["layer"] for item in intervention["layer_heads"]]
    assert 1 <= len(chosen) <= 2 and set(chosen) <= set(range(12, 17))
    provenance = preset["provenance"]
    for key in (
        "model_files_sha256",
        "data_sha256",
        "split",
        "seed",
        "search",
        "validation.margin_change_ci95",
    ):
        assert provenance[key]
    assert float(provenance["calibration.margin_after"]) > float(provenance["calibration.margin_before"])
    # Written without --write-anyway, so it passed the held-out gate (and says so).
    assert provenance["validation.gate"].startswith("passed")
    assert "held-out margin" in preset["description"]


def test_get_model_lists_the_preset_with_its_provenance(stub, calibrated):
    model = stub.GetModel(pb.GetModelRequest(name="smollm2")).model
    [preset] = model.presets
    assert preset.name == PRESET and preset.description == calibrated["preset"]["description"]
    assert dict(preset.provenance) == calibrated["preset"]["provenance"]
    layers = [lh.layer for lh in preset.interventions[0].selector.layer_heads]
    assert layers == [item["layer"] for item in calibrated["preset"]["interventions"][0]["layer_heads"]]


def test_score_by_preset_name_reproduces_the_recorded_held_out_effect(stub, calibrated):
    provenance = calibrated["preset"]["provenance"]
    validation = [json.loads(line) for line in DATA.read_text().splitlines() if '"validation"' in line]
    assert len(validation) == int(provenance["validation.examples"])
    margins: dict[str, list[float]] = {"before": [], "after": []}
    for example in validation:
        chat = pb.Chat(messages=[pb.ChatMessage(**m) for m in example["messages"]])
        for when, presets in (("before", []), ("after", [PRESET])):
            response = stub.Score(
                pb.ScoreRequest(
                    model="smollm2",
                    chat=chat,
                    candidates=example["candidates"],
                    interventions=ipb.InterventionSpec(presets=presets),
                ),
                timeout=120,
            )
            assert response.interventions_applied == len(presets)
            logprobs = {s.candidate: s.logprob for s in response.scores}
            correct = logprobs.pop(example["answer"])
            margins[when].append(correct - max(logprobs.values()))
    for when, values in margins.items():
        mean = sum(values) / len(values)
        accuracy = sum(m > 0 for m in values) / len(values)
        assert mean == pytest.approx(float(provenance[f"validation.margin_{when}"]), abs=1e-4)
        assert accuracy == pytest.approx(float(provenance[f"validation.accuracy_{when}"]))
    assert margins["before"] != margins["after"]
