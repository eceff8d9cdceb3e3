"""The held-out gate: `attnserve calibrate` writes a preset only when held-out evidence supports
it, and --write-anyway records that it did not."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from attnserve.calibration.report import Change

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "sentiment.jsonl"


def change(low: float, wrong: int, right: int) -> Change:
    return Change(
        mean=low + 0.1, low=low, high=low + 0.2, resamples=100, turned_wrong=wrong, turned_right=right
    )


@pytest.mark.parametrize(
    ("low", "wrong", "right", "passes"),
    [
        (0.01, 0, 0, True),
        (0.01, 1, 1, True),
        (0.0, 0, 3, False),  # the interval touches 0
        (-0.2, 0, 0, False),
        (0.3, 2, 1, False),  # more items turned wrong than right
    ],
)
def test_gate(low, wrong, right, passes):
    assert change(low, wrong, right).passes_gate is passes
    assert change(low, wrong, right).gate.startswith("passed" if passes else "not passed")


@pytest.fixture(scope="module")
def adversarial_data(tmp_path_factory) -> pathlib.Path:
    """The sentiment set with every validation answer flipped: whatever raises the calibration
    margin lowers the held-out one, so no head set can pass the gate."""
    lines = []
    for line in DATA.read_text().splitlines():
        example = json.loads(line)
        if example["split"] == "validation":
            [other] = [c for c in example["candidates"] if c != example["answer"]]
            example["answer"] = other
        lines.append(json.dumps(example))
    path = tmp_path_factory.mktemp("gate") / "flipped.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_calibrate(smollm2_path, data, output, *options):
    folder = output.parent
    config = folder / "server.yaml"
    model = {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}
    config.write_text(yaml.safe_dump({"models": [model]}))
    return subprocess.run(
        [sys.executable, "-m", "attnserve.cli", "calibrate", str(data), "--config", str(config)]
        + ["--output", str(output), "--layers", "12-16", "--budget", "1", "--search", "layer-sweep"]
        + ["--bootstrap-resamples", "500", *options],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_unsupported_head_set_is_not_written(smollm2_path, adversarial_data, tmp_path):
    output = tmp_path / "preset.yaml"
    result = run_calibrate(smollm2_path, adversarial_data, output)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "held-out gate not passed" in result.stdout
    assert "no preset written" in " ".join(result.stderr.split())
    assert not output.exists()


def test_write_anyway_records_the_failed_gate(smollm2_path, adversarial_data, tmp_path):
    output = tmp_path / "preset.yaml"
    result = run_calibrate(smollm2_path, adversarial_data, output, "--write-anyway")
    assert result.returncode == 0, result.stdout + result.stderr
    provenance = yaml.safe_load(output.read_text())["provenance"]
    assert provenance["validation.gate"].startswith("not passed")
    assert provenance["validation.gate"].endswith("(written with --write-anyway)")
    assert float(provenance["validation.margin_after"]) < float(provenance["validation.margin_before"])
