"""Time of calibration searches on the default model: a per-layer sweep and a greedy search.

Sink calibration (ACT, tau 0.1, beta 0.4) on SmolLM2-135M-Instruct, the labelled sentiment set
of the tests (chat prompts, one-token answers, so one row per example and head set): the first
`--examples` examples are the calibration split, the rest validation. Both searches (or those of
`--strategies`) run over `--layers` (2-29) with `--budget` (3) and `--batch-size` rows per
forward, scored by `--engine` (transformers, or the vLLM engine started in this process, as
`attnserve calibrate --engine vllm` does). Reported: seconds (the median of `--repeats` runs),
head sets scored, rows and forwards, rows/s, the chosen layers and the margins; also the plain
forward's rows/s at the same batch size (what the searches would cost without interventions).

    python bench/bench_calibration.py [--engine transformers] [--examples 20] [--batch-size 32] \
        [--layers 2-29] [--budget 3] [--strategies layer-sweep greedy] [--repeats 1] \
        [--out bench/results/calibration-cpu.json]

With `--folds K`, instead: K-fold cross-validation of a per-layer sweep (layers 12-16, budget 2)
on all the examples, as `attnserve calibrate` runs it on a small file without a split field.
Reported: wall and process CPU seconds, each fold's chosen layers, the folds' agreement, the
pooled held-out margins, accuracy and change with its interval, and the gate's decision.

    python bench/bench_calibration.py --folds 5 [--out bench/results/calibration-folds-cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from attnserve.attention.plan import RequestPlan
from attnserve.calibration.calibrate import SearchSettings, calibrate, cross_validate, fold_agreement
from attnserve.calibration.command import parse_layers
from attnserve.calibration.data import fold_indices, load_examples
from attnserve.calibration.method import Method, describe_head_set
from attnserve.calibration.objective import Scorer, TransformersScorer, tokenize
from attnserve.engines.hf.engine import load_causal_lm, model_geometry
from attnserve.engines.prompts import pad_token_id
from attnserve.models.builtin import default_cache_dir, ensure_builtin

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sentiment.jsonl"
ACT = Method("sink_calibration", {"tau": 0.1, "beta": 0.4, "min_queries": 0})
FOLD_LAYERS = tuple(range(12, 17))
FOLD_BUDGET = 2


def run_search(
    strategy: str, settings: SearchSettings, repeats: int, scorer: Scorer, geometry, calibration, validation
) -> dict:
    rounds: dict[str, int] = {}

    def on_progress(description: str, done: int, total: int) -> None:
        rounds[description] = total

    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = calibrate(
            scorer,
            geometry,
            [ACT],
            calibration,
            validation,
            settings,
            bootstrap_resamples=2000,
            seed=0,
            on_progress=on_progress,
        )
        runs.append(time.perf_counter() - started)
    seconds = statistics.median(runs)
    # One-token answers: one row per example and head set, scoring every candidate.
    candidates = len(calibration[0].candidate_ids)
    rows = sum(rounds.values()) // candidates
    forwards = sum(math.ceil(total / candidates / scorer.batch_size) for total in rounds.values())
    summary = {
        "seconds": round(seconds, 1),
        "seconds_of_each_run": [round(run, 1) for run in runs],
        "head_sets_scored": len(result.chosen.search.trace),
        "rows": rows,
        "forwards": forwards,
        "rows_per_s": round(rows / seconds, 2),
        "chosen": describe_head_set(result.head_set),
        "calibration_margin": [result.calibration_before.mean_margin, result.calibration_after.mean_margin],
        "validation_margin": [result.validation_before.mean_margin, result.validation_after.mean_margin],
        "validation_change_ci95": [result.change.low, result.change.high],
    }
    print(f"{strategy}: {json.dumps(summary)}", flush=True)
    return summary


def run_folds(folds: int, scorer: Scorer, geometry, examples) -> dict:
    settings = SearchSettings(strategy="layer-sweep", layers=FOLD_LAYERS, budget=FOLD_BUDGET)
    wall, cpu = time.perf_counter(), time.process_time()
    result = cross_validate(
        scorer,
        geometry,
        [ACT],
        examples,
        fold_indices(examples, folds, seed=0),
        settings,
        bootstrap_resamples=2000,
        seed=0,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    before, after, change = result.validation_before, result.validation_after, result.change
    summary = {
        "search": settings.describe(),
        "folds": folds,
        "wall_seconds": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "fold_chosen": [describe_head_set(head_set) for head_set in result.fold_head_sets],
        "chosen": describe_head_set(result.head_set),
        "agreement": fold_agreement(result),
        "held_out_margin": [before.mean_margin, after.mean_margin],
        "held_out_accuracy": [before.accuracy, after.accuracy],
        "held_out_change": change.mean,
        "held_out_change_ci95": [change.low, change.high],
        "turned_wrong": change.turned_wrong,
        "turned_right": change.turned_right,
        "gate": change.gate,
    }
    print(f"{folds}-fold: {json.dumps(summary)}", flush=True)
    return summary


def plain_rows_per_s(scorer: Scorer, examples) -> float:
    plans = [RequestPlan() for _ in range(3)]  # three distinct empty plans: no row is shared
    started = time.perf_counter()
    scorer.evaluate(plans, examples)
    return round(3 * len(examples) / (time.perf_counter() - started), 2)


@contextlib.contextmanager
def loaded_scorer(engine: str, model_path: Path, batch_size: int):
    """(scorer, tokenizer, geometry) on the engine."""
    if engine == "vllm":
        from attnserve.calibration.vllm_scorer import vllm_scorer
        from attnserve.models.config import VllmSettings

        settings = VllmSettings(enforce_eager=True, kv_cache_gib=1)
        with vllm_scorer(
            model_path,
            dtype="float32",
            device="cpu",
            batch_size=batch_size,
            settings=settings,
            cache_dir=None,
        ) as scorer:
            yield scorer, scorer.engine.tokenizer, scorer.engine.info.geometry
        return
    tokenizer, model = load_causal_lm(model_path)
    yield (
        TransformersScorer(model, pad_id=pad_token_id(tokenizer), batch_size=batch_size),
        tokenizer,
        (model_geometry(model)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: the built-in SmolLM2)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--examples", type=int, default=20, help="calibration examples (the rest validate)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", default="2-29")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["layer-sweep", "greedy"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each search (the median is reported)")
    parser.add_argument("--folds", type=int, default=0, help="cross-validate with this many folds instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    out = args.out or results / ("calibration-folds-cpu.json" if args.folds else "calibration-cpu.json")

    model_path = args.model or ensure_builtin("smollm2-135m-instruct", default_cache_dir())
    with loaded_scorer(args.engine, model_path, args.batch_size) as (scorer, tokenizer, geometry):
        write(out, run(args, model_path, scorer, tokenizer, geometry))


def run(args, model_path: Path, scorer: Scorer, tokenizer, geometry) -> dict:
    examples = tokenize(load_examples(DATA), tokenizer)
    calibration, validation = examples[: args.examples], examples[args.examples :]
    assert all(len(c) == 1 for e in examples for c in e.candidate_ids), (
        "the row counts assume one-token answers"
    )
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.folds:
        return {
            "machine": machine,
            "model": str(model_path),
            "engine": args.engine,
            "method": {"operation": ACT.operation, **ACT.parameters},
            "batch_size": args.batch_size,
            "examples": len(examples),
            "cross_validation": run_folds(args.folds, scorer, geometry, examples),
        }

    result = {
        "machine": machine,
        "model": str(model_path),
        "engine": args.engine,
        "method": {"operation": ACT.operation, **ACT.parameters},
        "layers": args.layers,
        "budget": args.budget,
        "batch_size": args.batch_size,
        "calibration_examples": len(calibration),
        "validation_examples": len(validation),
        "plain_forward_rows_per_s": plain_rows_per_s(scorer, calibration),
    }
    print(f"plain forward: {result['plain_forward_rows_per_s']} rows/s", flush=True)
    layers = parse_layers(args.layers, geometry.num_layers)
    for strategy in args.strategies:
        settings = SearchSettings(strategy=strategy, layers=layers, budget=args.budget)
        result[strategy] = run_search(
            strategy, settings, args.repeats, scorer, geometry, calibration, validation
        )
    return result


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
