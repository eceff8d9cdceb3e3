"""The vLLM engine's planned-rows pass alone: one step of every layer, as the attention backends
run it after vLLM's kernel (engines/vllm/planned_rows.py), on a paged cache laid out as vLLM's
CPU "vec" kernel keeps it. No vLLM engine: the pass's own cost per step, split into the
paged-cache gathers and the rest (the folded pass and its Python), which bench_vllm.py measures
only as a share of a whole engine step. Two steps: a decode step (one query per row) and the
rows' prefill (every prompt token a query).

    PYTHONPATH=server:bench .venv/bin/python bench/bench_planned_rows.py [--rows 16] [--keys 95] \
        [--threads 2] [--repeats 40] [--out bench/results/planned-rows-cpu.json]

Shapes are SmolLM2-135M's (30 layers, 9 query heads, 3 KV heads, head size 64, fp32, blocks of
128 tokens); the rows' lengths spread down from --keys. Plans are bench_vllm.py's: the
preset-sized one (ACT on 3 layers, key emphasis on 4) and the heavy one (ACT on layers 2-29, key
emphasis on all). Medians of the repeats, in milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from attnserve.engines.vllm.paged_kv import read_cpu_vec
from attnserve.engines.vllm.planned_rows import apply_row_plans, step_kv_slots
from attnserve.engines.vllm.worker import PlannedRow, StepContext
from bench_core import median_ms
from bench_vllm import heavy_plan, preset_plan

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 9, 3, 64, 128
NEW_TOKENS = 30


class PlannedStep:
    """One step of `rows` planned requests, each in its own cache block: a decode step, or the
    requests' prefill (every prompt token a query)."""

    def __init__(self, rows: int, keys: int, plan, prefill: bool):
        generator = torch.Generator().manual_seed(0)
        self.plan = plan
        self.prefill = prefill
        self.kv_cache = torch.randn(2 * rows, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=generator)
        self.seq_lens = [keys - 2 * row for row in range(rows)]
        self.block_table = torch.randperm(2 * rows, generator=generator)[:rows, None].int()
        queries = self.seq_lens if prefill else [1] * rows
        self.query_start_loc = torch.tensor([0, *queries], dtype=torch.int32).cumsum(0).int()
        self.query = torch.randn(sum(queries), NUM_HEADS, HEAD_DIM, generator=generator)
        self.output = torch.zeros(sum(queries), NUM_HEADS, HEAD_DIM)

    def context(self) -> StepContext:
        return StepContext(
            [
                PlannedRow(
                    row,
                    str(row),
                    self.plan,
                    seq_len - (0 if self.prefill else NEW_TOKENS),
                    None,
                    False,
                    False,
                )
                for row, seq_len in enumerate(self.seq_lens)
            ]
        )

    def read_kv(self, step: StepContext, rows: list[int], seq_lens: list[int]):
        slots = step_kv_slots(step, 0, self.block_table, rows, seq_lens, BLOCK_SIZE)
        return read_cpu_vec(self.kv_cache, slots)

    def run(self) -> None:
        """Every layer's planned rows, as the backends run them after the engine's kernel."""
        step = self.context()
        for layer in range(NUM_LAYERS):
            apply_row_plans(
                step,
                layer,
                self.query,
                self.output,
                scale=HEAD_DIM**-0.5,
                query_start_loc=self.query_start_loc,
                seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32),
                metadata_id=0,
                read_kv=lambda rows, seq_lens, step=step: self.read_kv(step, rows, seq_lens),
            )

    def gathers(self) -> None:
        """The same step's gathers alone: one per layer some row's plan acts on."""
        step = self.context()
        rows = list(range(len(self.seq_lens)))
        for _ in self.plan.layer_ops:
            self.read_kv(step, rows, self.seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--keys", type=int, default=95, help="the longest row's keys (at most 128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not 2 * args.rows < args.keys <= BLOCK_SIZE:
        parser.error(f"--keys must be in ({2 * args.rows}, {BLOCK_SIZE}]: each row keeps one block")
    torch.set_num_threads(args.threads)

    results = {}
    for kind in ("decode", "prefill"):
        for name, plan in (("preset", preset_plan()), ("heavy", heavy_plan(NUM_LAYERS))):
            step = PlannedStep(args.rows, args.keys, plan, prefill=kind == "prefill")
            total = median_ms(step.run, args.repeats)
            gathers = median_ms(step.gathers, args.repeats)
            results[f"{kind}_{name}"] = {
                "planned_layers": len(plan.layer_ops),
                "step_ms": total,
                "gathers_ms": gathers,
                "rest_ms": total - gathers,
                "per_planned_layer_ms": total / len(plan.layer_ops),
            }
            print(
                f"{kind}, {name}: {total:.2f} ms per step over {len(plan.layer_ops)} planned layers "
                f"(gathers {gathers:.2f} ms, the rest {total - gathers:.2f} ms)"
            )
    report = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform()},
        "milliseconds_per_step": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
