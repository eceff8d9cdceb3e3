"""attention.core alone: one decode step of one layer for a batch of planned rows, folded into one
pass (attention/folded_rows.py) against the same rows one at a time (the per-row path), beside
the plain SDPA call of the whole batch. No engine: this is the arithmetic plus the core's own
Python, per layer, which the engines pay once per planned layer and step. "folded" is a step's
first layer, which prepares the rows' operations (core.prepare); its later layers reuse them
through the step's StepMemo ("later layers"). The last two plans read out (statistics and the
last query rows, as a readout or a sampled statistics row asks).

    PYTHONPATH=server .venv/bin/python bench/bench_core.py [--rows 16] [--keys 160] [--repeats 200] \
        [--threads 1] [--device cpu] [--out bench/results/core-decode-cpu.json]

Shapes default to SmolLM2-135M's layers (9 query heads, 3 KV heads, head size 64), fp32, each
row with its own length (keys - row .. keys). Medians of the repeats, in milliseconds per layer
(on CUDA each timed call ends with a synchronize, so the figures include the kernels' time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from attnserve.attention.core import attend, attend_rows, effective_ops, plain_attention, prepare
from attnserve.attention.interventions import applied_ops
from attnserve.attention.layout import RowLayout
from attnserve.attention.operations import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    LogitRescale,
    SinkCalibration,
)
from attnserve.attention.plan import KeySet, ReadoutNeeds, RowPlan, ScopedOp
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.step_memo import StepMemo

#: Statistics as a sampled row reads them, with the last query rows as readouts add.
READOUTS = ReadoutNeeds(statistics=True, mass_ranges=((0, 24),), last_query_rows=True)
PLANS = {
    "sink_calibration (ACT)": RowPlan(ops=(ScopedOp(SinkCalibration(tau=0.1, beta=0.4)),)),
    "key_emphasis (PASTA)": RowPlan(
        ops=(ScopedOp(KeyEmphasis(0.01), keys=KeySet(ranges=((0, 24),), invert=True)),)
    ),
    "logit_rescale x2 (PAINT)": RowPlan(
        ops=(
            ScopedOp(LogitRescale(0.7), keys=KeySet(ranges=((5, 69),)), last_query_only=True),
            ScopedOp(LogitRescale(0.3), keys=KeySet(ranges=((20, 30),)), last_query_only=True),
        )
    ),
    "identity_blend + head_output_scale": RowPlan(
        ops=(
            ScopedOp(IdentityBlend(0.5), heads=(0, 3)),
            ScopedOp(HeadOutputScale(0.0), heads=(5,)),
        )
    ),
    "readouts only (statistics, last query rows)": RowPlan(needs=READOUTS),
    "key_emphasis + readouts": RowPlan(
        ops=(ScopedOp(KeyEmphasis(0.01), keys=KeySet(ranges=((0, 24),), invert=True)),), needs=READOUTS
    ),
}


def median_ms(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def synchronized(fn, device: str):
    """fn, then waiting for the device's queued kernels, so a timer sees their time too."""
    if not device.startswith("cuda"):
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--keys", type=int, default=160)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rows, keys, device = args.rows, args.keys, args.device
    q = torch.randn(rows, args.heads, 1, args.head_dim, device=device)
    k = torch.randn(rows, args.kv_heads, keys, args.head_dim, device=device)
    v = torch.randn(rows, args.kv_heads, keys, args.head_dim, device=device)
    scale = args.head_dim**-0.5
    layouts = [RowLayout(key_start=row, num_prompt_tokens=keys - row - 8) for row in range(rows)]

    def timed(fn) -> float:
        return median_ms(synchronized(fn, device), args.repeats)

    def one_at_a_time(plans):
        for b, plan in enumerate(plans):
            row = RowAttention.from_batch(q, k, v, b, layouts[b], scale)
            attend(row, prepare(row, applied_ops(row, effective_ops(plan)), plan.needs), plan.needs)

    results = {
        "plain SDPA of the batch": timed(lambda: plain_attention(q, k, v, scale=scale, layouts=layouts))
    }
    print(f"{device}: plain SDPA of the batch: {results['plain SDPA of the batch']:.3f} ms", flush=True)
    for name, plan in PLANS.items():
        plans = [plan] * rows
        folded = timed(lambda plans=plans: attend_rows(q, k, v, scale=scale, layouts=layouts, plans=plans))
        memo = StepMemo()
        later_layers = timed(
            lambda plans=plans, memo=memo: attend_rows(
                q, k, v, scale=scale, layouts=layouts, plans=plans, memo=memo
            )
        )
        alone = timed(lambda plans=plans: one_at_a_time(plans))
        results[name] = {
            "folded_ms": folded,
            "folded_later_layers_ms": later_layers,
            "one_at_a_time_ms": alone,
            "speedup": alone / folded,
        }
        print(
            f"{device}: {name}: folded {folded:.3f} ms (a step's later layers {later_layers:.3f} ms), "
            f"one at a time {alone:.3f} ms ({alone / folded:.1f}x)",
            flush=True,
        )
    machine = {"cpus": torch.get_num_threads(), "platform": platform.platform()}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {
        "machine": machine,
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "milliseconds_per_layer": results,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
