"""The held-out gate: `attnserve calibrate` writes a preset only when held-out evidence supports
it, and --write-anyway records that it did not."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from attnserve.calibration.calibrate import CalibrationResult, TaskResult
from attnserve.calibration.objective import SplitMetrics
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


def result_with_tasks(pooled: Change, *tasks: Change) -> CalibrationResult:
    metrics = SplitMetrics((0.5,))
    return CalibrationResult(
        variants=(),
        chosen=None,
        validation_before=metrics,
        validation_after=metrics,
        change=pooled,
        tasks=tuple(TaskResult(f"t{i}", metrics, metrics, c) for i, c in enumerate(tasks)),
    )


def test_every_task_must_pass_the_gate():
    good, bad = change(0.1, 0, 1), change(-0.1, 2, 0)
    assert result_with_tasks(good, good, good).passes_gate
    assert result_with_tasks(good, good, good).gate.endswith("on all examples and on every task")
    trade = result_with_tasks(good, good, bad)  # one task traded for another
    assert not trade.passes_gate
    assert trade.gate.startswith("not passed: task t1: the 95% interval")
    assert "t0" not in trade.gate and "all examples" not in trade.gate
    assert result_with_tasks(bad, good, bad).gate.startswith("not passed: all examples: ")
    assert result_with_tasks(good).gate == good.gate  # one task: the pooled gate


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
    """data: one data file or a list of them (tasks)."""
    files = [str(path) for path in (data if isinstance(data, list) else [data])]
    folder = output.parent
    config = folder / "server.yaml"
    model = {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}
    config.write_text(yaml.safe_dump({"models": [model]}))
    return subprocess.run(
        [sys.executable, "-m", "attnserve.cli", "calibrate", *files, "--config", str(config)]
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


def test_a_task_traded_for_another_is_reported_per_task(smollm2_path, tmp_path):
    """The sentiment set and a small contrary task (its validation answers flipped): each task's
    held-out change is in the report and the preset's provenance, and the gate names the task."""
    lines = [json.loads(line) for line in DATA.read_text().splitlines()]
    calibration = [line for line in lines if line["split"] == "calibration"][:3]
    flipped = [
        {**line, "answer": next(c for c in line["candidates"] if c != line["answer"])}
        for line in lines
        if line["split"] == "validation"
    ][:3]
    contrary = tmp_path / "contrary.jsonl"
    contrary.write_text("\n".join(json.dumps(line) for line in calibration + flipped) + "\n")
    output = tmp_path / "preset.yaml"
    result = run_calibrate(smollm2_path, [DATA, contrary], output, "--write-anyway")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "task sentiment: held-out margin" in result.stdout
    assert "task contrary: held-out margin" in result.stdout
    provenance = yaml.safe_load(output.read_text())["provenance"]
    assert provenance["tasks[sentiment].validation.examples"] == "12"
    assert provenance["tasks[contrary].validation.examples"] == "3"
    # The pooled figures are the tasks' figures, weighted by their examples.
    for figure in ("margin_before", "margin_after"):
        pooled = float(provenance[f"validation.{figure}"])
        per_task = [float(provenance[f"tasks[{t}].validation.{figure}"]) for t in ("sentiment", "contrary")]
        assert pooled == pytest.approx((12 * per_task[0] + 3 * per_task[1]) / 15, abs=1e-9)
    # Flipped answers: whatever the search found on the calibration lines cannot help them.
    assert float(provenance["tasks[contrary].validation.margin_after"]) < 0
    assert "task contrary: " in provenance["validation.gate"]
