"""One layer's decode step for a batch of planned rows: the folded recompute
(core.attend_decode_rows) against FlexAttention with the logit-level operations in a score_mod
(attention/flex_rows.py), beside the plain SDPA call of the whole batch, side by side in one run.

    PYTHONPATH=server .venv/bin/python bench/bench_flex.py [--rows 16] [--keys 160 512 2048] \
        [--repeats 100] [--threads 1] [--device cpu] [--out bench/results/flex-decode-cpu.json]

Columns, in milliseconds per layer (medians of the repeats, the columns taking turns in each
repeat): plain SDPA; the folded recompute;
the compiled flex path as an engine would call it (parameter tensors, block mask, kernel, output
operations); its compiled kernel alone (parameters and block mask built beforehand, as they
could be once per step for every layer of the same plans); the eager flex path (flex_attention
unfused); and the aten ops (not views) of one call of each, about the kernels a GPU would launch. The compile time is the first call's (dynamic shapes: once per process, then a
short retrace for the first new key length; the inductor cache in /tmp shortens later runs).
Shapes default to SmolLM2-135M's layers (9 query heads, 3 KV heads, head size 64), fp32, row b
with keys b..n-1. On CUDA each timed call ends with a synchronize.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from attnserve.attention.core import attend_decode_rows, effective_ops, plain_attention
from attnserve.attention.flex_rows import (
    attend_decode_rows_flex,
    flex_decode,
    padding_block_mask,
    score_mod_parameters,
)
from attnserve.attention.folded_rows import fold_decode_rows, folded_applied_ops
from attnserve.attention.layout import RowLayout
from attnserve.attention.operations import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    LogitRescale,
    Temperature,
)
from attnserve.attention.plan import KeySet, RowPlan, ScopedOp
from bench_core import synchronized

#: bench_core's plans without sink calibration (not covered), and temperature with a key mask.
PLANS = {
    "key_emphasis (PASTA)": (ScopedOp(KeyEmphasis(0.01), keys=KeySet(ranges=((0, 24),), invert=True)),),
    "logit_rescale x2 (PAINT)": (
        ScopedOp(LogitRescale(0.7), keys=KeySet(ranges=((5, 69),)), last_query_only=True),
        ScopedOp(LogitRescale(0.3), keys=KeySet(ranges=((20, 30),)), last_query_only=True),
    ),
    "temperature + key_mask": (
        ScopedOp(Temperature(0.5), heads=(0, 1, 2), keys=KeySet(ranges=((0, 40),))),
        ScopedOp(KeyMask(), heads=(3, 4), keys=KeySet(ranges=((1, 8),))),
    ),
    "identity_blend + head_output_scale": (
        ScopedOp(IdentityBlend(0.5), heads=(0, 3)),
        ScopedOp(HeadOutputScale(0.0), heads=(5,)),
    ),
}


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median milliseconds of each call, the calls taking turns in every repeat (so the
    machine's noise hits them alike)."""
    calls = {name: synchronized(call, device) for name, call in calls.items()}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


#: Aten ops that only make views or metadata (no kernel on a GPU).
VIEW_OPS = {
    "aten::" + name
    for name in [
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "expand",
        "select",
        "slice",
        "unbind",
        "as_strided",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "detach",
        "alias",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_strided",
        "empty_like",
        "result_type",
        "contiguous",
        "item",
        "_local_scalar_dense",
        "is_nonzero",
    ]
}


def aten_op_count(call: Callable[[], object]) -> int:
    """Top-level aten ops of one call that are not views: about the kernels it would launch on a
    GPU (a compiled flex kernel is no aten op and is not counted)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    return sum(
        1
        for event in profiler.events()
        if event.name.startswith("aten::")
        and event.name not in VIEW_OPS
        and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    )


def measure_keys(args: argparse.Namespace, keys: int) -> dict:
    rows, device = args.rows, args.device
    q = torch.randn(rows, args.heads, args.head_dim, device=device)
    k = torch.randn(rows, args.kv_heads, keys, args.head_dim, device=device)
    v = torch.randn(rows, args.kv_heads, keys, args.head_dim, device=device)
    scale = args.head_dim**-0.5
    layouts = [RowLayout(key_start=row, num_prompt_tokens=keys - row - 8) for row in range(rows)]
    decode = {
        "key_starts": [layout.key_start for layout in layouts],
        "prompt_lengths": [layout.num_prompt_tokens for layout in layouts],
        "scale": scale,
    }
    folded_rows = fold_decode_rows(q, k, v, decode["key_starts"], decode["prompt_lengths"], scale)
    block_mask = padding_block_mask(torch.tensor(folded_rows.key_starts, device=device), keys)
    result = {}
    for name, plan_ops in PLANS.items():
        ops = [effective_ops(RowPlan(ops=plan_ops))] * rows
        started = time.perf_counter()
        synchronized(lambda ops=ops: attend_decode_rows_flex(q, k, v, ops=ops, **decode), device)()
        first_call = time.perf_counter() - started
        edits = score_mod_parameters(folded_rows, folded_applied_ops(folded_rows, ops))
        calls = {
            "plain": lambda: plain_attention(q[:, :, None], k, v, scale=scale, layouts=layouts),
            "folded": lambda ops=ops: attend_decode_rows(q, k, v, ops=ops, **decode),
            "flex": lambda ops=ops: attend_decode_rows_flex(q, k, v, ops=ops, **decode),
            "kernel": lambda edits=edits: flex_decode(folded_rows, edits, block_mask),
        }
        ms = interleaved_medians(calls, args.repeats, device)
        eager = interleaved_medians(
            {"eager": lambda ops=ops: attend_decode_rows_flex(q, k, v, ops=ops, compiled=False, **decode)},
            max(3, args.repeats // 10),
            device,
        )["eager"]
        result[name] = {
            "plain_sdpa_ms": ms["plain"],
            "folded_ms": ms["folded"],
            "flex_compiled_ms": ms["flex"],
            "flex_compiled_kernel_only_ms": ms["kernel"],
            "flex_eager_ms": eager,
            "first_flex_call_s": first_call,
            "aten_ops_folded": aten_op_count(calls["folded"]),
            "aten_ops_flex": aten_op_count(calls["flex"]),
            "aten_ops_flex_kernel_only": aten_op_count(calls["kernel"]),
            "folded_over_flex": ms["folded"] / ms["flex"],
            "flex_over_plain": ms["flex"] / ms["plain"],
            "folded_over_plain": ms["folded"] / ms["plain"],
        }
        print(
            f"{device}, keys {keys}, {name}: plain {ms['plain']:.3f} ms, folded {ms['folded']:.3f} ms, "
            f"flex {ms['flex']:.3f} ms (kernel {ms['kernel']:.3f}, eager {eager:.3f}); "
            f"folded/flex {ms['folded'] / ms['flex']:.2f}; first flex call {first_call:.1f} s",
            flush=True,
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--keys", type=int, nargs="+", default=[160, 512, 2048])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    results = {str(keys): measure_keys(args, keys) for keys in args.keys}
    machine = {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(args.device)
    return {
        "machine": machine,
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "milliseconds_per_layer_by_keys": results,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
