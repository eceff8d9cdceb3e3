"""`attnserve calibrate` refuses bad options and data before loading a model (exit status 2)."""

from __future__ import annotations

import json

import pytest
import yaml
from attnserve.calibration.command import AUTO_FOLDS, CalibrationRequest, UsageError, folds_of
from attnserve.calibration.data import LabelledExample
from attnserve.cli import app
from typer.testing import CliRunner

GOOD = {"prompt": "2 + 2 =", "candidates": [" 4", " 5"], "answer": " 4"}


@pytest.fixture
def config(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = tmp_path / "server.yaml"
    model = {"name": "m", "kind": "llm", "engine": "transformers", "path": str(model_dir)}
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def calibrate(tmp_path, config, lines, *options):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    args = ["calibrate", str(data), "--config", str(config), "--output", str(tmp_path / "p.yaml"), *options]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(
    ("lines", "options", "message"),
    [
        ([GOOD, {**GOOD, "answer": " 6"}], (), "data.jsonl:2: answer: ' 6' is not one of the candidates"),
        ([GOOD, GOOD], ("--model", "other"), "--model: 'other' is not in the config"),
        ([GOOD, GOOD], ("--keys", "0:2"), "--keys and --invert-keys are for key-emphasis"),
        ([GOOD, GOOD], ("--method", "key-emphasis", "--keys", "0-2"), "--keys: '0-2' is not a token range"),
        ([GOOD], (), "both splits need examples: 1 calibration, 0 validation"),
        ([GOOD, GOOD], ("--engine", "diffusers"), "Invalid value for '--engine'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, config, lines, options, message):
    result = calibrate(tmp_path, config, lines, *options)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "p.yaml").exists()


def examples(count: int, split: str | None = None) -> list[LabelledExample]:
    return [LabelledExample(i + 1, "2 + 2 =", None, (" 4", " 5"), 0, split) for i in range(count)]


def request(folds: int | None) -> CalibrationRequest:
    fields = {name: None for name in CalibrationRequest.__dataclass_fields__}
    return CalibrationRequest(**{**fields, "folds": folds})


@pytest.mark.parametrize(
    ("count", "split", "folds", "expected"),
    [
        (24, None, None, AUTO_FOLDS),  # small and unsplit: cross-validated by default
        (9, None, None, 0),  # too few for 5 folds: one split
        (200, None, None, 0),  # large: one split is enough
        (24, "calibration", None, 0),  # the file's split is kept
        (24, None, 0, 0),
        (24, None, 3, 3),
    ],
)
def test_folds_default_to_cross_validation_on_small_unsplit_data(count, split, folds, expected):
    assert folds_of(request(folds), examples(count, split)) == expected


@pytest.mark.parametrize(
    ("split", "folds", "message"),
    [(None, 1, "or 2 or more folds"), ("validation", 3, "split field fixes")],
)
def test_bad_folds(split, folds, message):
    with pytest.raises(UsageError, match=message):
        folds_of(request(folds), examples(24, split))
