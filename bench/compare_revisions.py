"""Run one benchmark script on two revisions of attnserve, alternating, and compare them.

    PYTHONPATH=server .venv/bin/python bench/compare_revisions.py --base 87dcdaf [--head HEAD] \
        [--rounds 3] [--out bench/results/engine-cpu-revisions.json] -- --tokens 16 --repeats 1

Each revision is checked out into a temporary git worktree; every round runs the benchmark
(default bench/bench_engine.py, each revision's own copy, with that revision's server and
client packages first on the path) once per revision, in turn, so the machine's noise hits both
alike. Arguments after `--` go to the benchmark. Reported: per configuration, the median over
rounds of each revision's median tokens/s, and head / base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(revision: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), revision], check=True)
    return into


def run_benchmark(tree: Path, script: str, args: list[str], out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree / 'server'}{os.pathsep}{tree / 'clients' / 'python'}")
    command = [sys.executable, str(tree / script), *args, "--out", str(out)]
    status = subprocess.run(command, check=False, env=env, cwd=tree).returncode
    if status != 0:
        if not out.is_file():
            raise RuntimeError(f"{' '.join(command)} failed with exit status {status}")
        # Seen once: an abort in a native thread's teardown after the results were written.
        print(f"warning: the benchmark exited with status {status} after writing its results", flush=True)
    return json.loads(out.read_text())["median_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--script", default="bench/bench_engine.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine-cpu-revisions.json")
    parser.add_argument("bench_args", nargs="*", help="arguments for the benchmark (after --)")
    args = parser.parse_args()

    revisions = {"base": args.base, "head": args.head}
    commits = {
        name: subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
        ).stdout.strip()
        for name, rev in revisions.items()
    }
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="attnserve-revisions-") as tmp:
        trees = {name: checkout(rev, Path(tmp) / name) for name, rev in revisions.items()}
        try:
            for round_index in range(args.rounds):
                for name, tree in trees.items():
                    print(f"round {round_index + 1}/{args.rounds}: {name} ({commits[name]})", flush=True)
                    out = Path(tmp) / f"{name}-{round_index}.json"
                    runs[name].append(run_benchmark(tree, args.script, args.bench_args, out))
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
                )

    configurations = [c for c in runs["head"][0] if c in runs["base"][0]]
    medians = {
        name: {c: statistics.median(run[c] for run in runs[name]) for c in configurations} for name in runs
    }
    result = {
        "script": args.script,
        "bench_args": args.bench_args,
        "rounds": args.rounds,
        "commits": commits,
        "runs_median_tokens_per_s": runs,
        "median_tokens_per_s": medians,
        "head_over_base": {c: medians["head"][c] / medians["base"][c] for c in configurations},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, configurations))
    print(f"{'configuration':<{width}}  {commits['base']:>9}  {commits['head']:>9}  head/base")
    for c in configurations:
        base, head = medians["base"][c], medians["head"][c]
        print(f"{c:<{width}}  {base:9.1f}  {head:9.1f}  {head / base:9.2f}")


if __name__ == "__main__":
    main()
