"""Labelled data files: parsing, errors naming the line and field, splits, hashes; the report."""

from __future__ import annotations

import json

import pytest
from attnserve.calibration.command import UsageError, parse_layers
from attnserve.calibration.data import (
    DataError,
    directory_sha256,
    fold_indices,
    load_examples,
    load_tasks,
    split_examples,
)
from attnserve.calibration.objective import SplitMetrics, margin
from attnserve.calibration.report import margin_change

GOOD = {"prompt": "2 + 2 =", "candidates": [" 4", " 5"], "answer": " 4"}


def write_lines(tmp_path, *items) -> object:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(item if isinstance(item, str) else json.dumps(item) for item in items) + "\n")
    return path


def test_prompt_and_chat_lines(tmp_path):
    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "candidates": ["yes", "no", "maybe"],
        "answer": "maybe",
    }
    examples = load_examples(write_lines(tmp_path, GOOD, "", chat))
    assert [e.line for e in examples] == [1, 3]
    assert examples[0].prompt == "2 + 2 =" and examples[0].answer == 0
    assert examples[1].messages == (("system", "Be brief."), ("user", "Hi?")) and examples[1].answer == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "2: not valid JSON"),
        ("[1, 2]", "2: expected a JSON object"),
        ({**GOOD, "label": 1}, "2: label: unknown field"),
        ({"candidates": ["a", "b"], "answer": "a"}, "2: set exactly one of prompt and messages"),
        ({**GOOD, "prompt": "  "}, "2: prompt: expected a non-empty string"),
        ({**GOOD, "candidates": ["a"]}, "2: candidates: expected a list of at least two answers"),
        ({**GOOD, "candidates": ["a", ""], "answer": "a"}, "2: candidates[1]: expected a non-empty string"),
        ({**GOOD, "candidates": ["a", "a"], "answer": "a"}, "2: candidates: answers must be distinct"),
        ({"prompt": "x", "candidates": ["a", "b"]}, "2: answer: missing"),
        ({**GOOD, "answer": " 6"}, "2: answer: ' 6' is not one of the candidates"),
        ({**GOOD, "split": "test"}, "2: split: expected one of calibration, validation"),
        (
            {"messages": [{"role": "bot", "content": "x"}], "candidates": ["a", "b"], "answer": "a"},
            "2: messages[0].role: expected one of system, user, assistant",
        ),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path, GOOD, line)
    with pytest.raises(DataError, match="data.jsonl:" + message.replace("[", r"\[").replace("]", r"\]")):
        load_examples(path)


def test_split_on_some_lines_only_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data.jsonl:1: split: set split on every line or on none"):
        load_examples(write_lines(tmp_path, GOOD, {**GOOD, "split": "validation"}))


def test_splits(tmp_path):
    explicit = load_examples(
        write_lines(tmp_path, {**GOOD, "split": "validation"}, {**GOOD, "split": "calibration"})
    )
    split = split_examples(explicit, validation_fraction=0.9, seed=1)
    assert [e.line for e in split.validation] == [1] and "split field" in split.description

    drawn = load_examples(write_lines(tmp_path, *[GOOD] * 10))
    first, again = (split_examples(drawn, 0.3, seed=5) for _ in range(2))
    assert len(first.validation) == 3 and len(first.calibration) == 7
    assert first == again and split_examples(drawn, 0.3, seed=6) != first
    with pytest.raises(DataError, match="0 validation"):
        split_examples(drawn, 0.0, seed=0)


def write_task(folder, name, count, split=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    lines = [{**GOOD, **({"split": split[i % len(split)]} if split else {})} for i in range(count)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_several_files_are_several_tasks(tmp_path):
    arithmetic, trivia = write_task(tmp_path, "arithmetic", 4), write_task(tmp_path, "trivia", 2)
    assert [e.task for e in load_tasks([arithmetic])] == [""] * 4
    examples = load_tasks([arithmetic, trivia])
    assert [(e.task, e.line) for e in examples] == [("arithmetic", i) for i in (1, 2, 3, 4)] + [
        ("trivia", 1),
        ("trivia", 2),
    ]
    # Two files of one name are told apart by their paths.
    other = write_task(tmp_path / "other", "trivia", 2)
    assert {e.task for e in load_tasks([trivia, other])} == {str(trivia), str(other)}
    with pytest.raises(DataError, match="given twice"):
        load_tasks([trivia, trivia])


def test_each_task_is_split_and_folded_on_its_own(tmp_path):
    big = write_task(tmp_path, "big", 10)
    small = write_task(tmp_path, "small", 4, split=["calibration", "validation"])
    examples = load_tasks([big, small])
    split = split_examples(examples, validation_fraction=0.3, seed=2)
    assert [e.task for e in split.validation].count("big") == 3
    assert [(e.task, e.line) for e in split.validation if e.task == "small"] == [("small", 2), ("small", 4)]
    assert (
        split.description.startswith("big: seeded")
        and "small: from the data file's split field" in split.description
    )

    unsplit = load_tasks([big, write_task(tmp_path, "four", 4)])
    folds = fold_indices(unsplit, 2, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(14))
    for fold in folds:  # every fold holds half of each task
        assert [unsplit[i].task for i in fold].count("big") == 5
        assert [unsplit[i].task for i in fold].count("four") == 2
    with pytest.raises(DataError, match="task four: 5-fold cross-validation needs"):
        fold_indices(unsplit, 5, seed=3)


def test_directory_hash_follows_content(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.bin").write_bytes(b"\0\1")
    before = directory_sha256(tmp_path)
    assert directory_sha256(tmp_path) == before
    (tmp_path / "b.bin").write_bytes(b"\0\2")
    assert directory_sha256(tmp_path) != before


def test_margin_and_metrics():
    assert margin([-1.0, -3.0, -2.0], answer=0) == pytest.approx(1.0)
    assert margin([-1.0, -3.0, -2.0], answer=2) == pytest.approx(-1.0)
    metrics = SplitMetrics((1.0, -0.5, 2.0, 0.0))
    assert metrics.mean_margin == pytest.approx(0.625) and metrics.accuracy == 0.5


def test_bootstrap_change():
    before = SplitMetrics((1.0, -0.05, 2.0, 0.3, 0.7, 1.2))
    same = margin_change(before, before, resamples=500, seed=0)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and same.within_noise
    assert same.verdict.startswith("within noise")

    better = SplitMetrics(tuple(m + 0.1 + 0.01 * i for i, m in enumerate(before.margins)))
    up = margin_change(before, better, resamples=500, seed=0)
    assert 0.1 < up.low <= up.mean <= up.high < 0.16 and not up.within_noise
    assert up.verdict.startswith("improves") and up.turned_right == 1 and up.turned_wrong == 0

    noisy = SplitMetrics(tuple(m + d for m, d in zip(before.margins, (0.5, -0.6, 0.4, -0.35, 0.1, -0.2))))
    mixed = margin_change(before, noisy, resamples=500, seed=0)
    assert mixed.within_noise and mixed.turned_wrong == 1  # 0.3 -> -0.05


def test_parse_layers():
    assert parse_layers(None, 4) == (0, 1, 2, 3)
    assert parse_layers("3,0-1, 2-2", 4) == (0, 1, 2, 3)
    for bad, message in [("5", "layer 5 is out of range"), ("3-1", "not a layer"), ("a", "not a layer")]:
        with pytest.raises(UsageError, match=message):
            parse_layers(bad, 4)
