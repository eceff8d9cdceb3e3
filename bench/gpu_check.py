"""What only a GPU can show, in one short run (see bench/README.md for the recorded results).

1. attention.core on CUDA: every operation, readouts, GQA and padding, compared with the same
   call on the CPU (which tests/attention checks against the eager paper references); identity
   plans bit-identical to plain attention on CUDA; timings of attend_rows on both.
2. One layer's decode step for 16 planned rows (bench_core.py): the folded pass against the rows
   one at a time and plain SDPA, on CUDA and on the CPU (one thread).
3. The transformers engine on CUDA: bench_engine's measurements on a randomly initialised model
   of SmolLM2-135M's exact shape (no weights can travel here), with SmolLM2's tokenizer.
4. FlexAttention with the logit-level operations in its score_mod against the folded recompute
   on CUDA (bench_flex.py), the choice the README argues for GPUs.
5. The same engine measurements on the machine's CPU.

Each part's results are written as soon as it ends, and a part that fails records its error and
lets the next one run, so a short device lease keeps whatever finished.

    PYTHONPATH=server:clients/python:bench python bench/gpu_check.py --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import bench_core
import bench_flex
import torch
from attnserve.attention import plan as P
from attnserve.attention.core import attend_rows, plain_attention
from attnserve.attention.layout import RowLayout
from transformers import LlamaConfig, LlamaForCausalLM

READOUT = P.ReadoutNeeds(statistics=True, mass_ranges=((0, 2), (3, 9)), last_query_rows=True)
PLANS = {
    "sink_calibration": P.RowPlan(ops=(P.ScopedOp(P.SinkCalibration(0.1, 0.4, 0), heads=(0, 4)),)),
    "sink_calibration_guarded": P.RowPlan(ops=(P.ScopedOp(P.SinkCalibration(0.05, 0.2, 3)),)),
    "key_emphasis": P.RowPlan(ops=(P.ScopedOp(P.KeyEmphasis(0.01), keys=P.KeySet(((2, 6),), invert=True)),)),
    "logit_rescale_last": P.RowPlan(
        ops=(P.ScopedOp(P.LogitRescale(0.7), keys=P.KeySet(((1, 8),)), last_query_only=True),)
    ),
    "head_output_scale": P.RowPlan(ops=(P.ScopedOp(P.HeadOutputScale(0.3), heads=(1, 2)),)),
    "identity_blend": P.RowPlan(ops=(P.ScopedOp(P.IdentityBlend(0.6)),)),
    "temperature": P.RowPlan(ops=(P.ScopedOp(P.Temperature(0.5), heads=(3,)),)),
    "key_mask": P.RowPlan(ops=(P.ScopedOp(P.KeyMask(), keys=P.KeySet(((0, 3),), include_generated=True)),)),
    "combined_with_readouts": P.RowPlan(
        ops=(
            P.ScopedOp(P.Temperature(1.3)),
            P.ScopedOp(P.KeyEmphasis(3.0), keys=P.KeySet(((4, 7),))),
            P.ScopedOp(P.SinkCalibration()),
            P.ScopedOp(P.IdentityBlend(0.2), heads=(0,)),
        ),
        needs=READOUT,
    ),
    "readouts_only": P.RowPlan(needs=READOUT),
}


def random_batch(num_queries: int, num_keys: int, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 9, num_queries, 64, generator=gen)
    k = torch.randn(4, 3, num_keys, 64, generator=gen)
    v = torch.randn(4, 3, num_keys, 64, generator=gen)
    layouts = [RowLayout(key_start=s, num_prompt_tokens=min(24, num_keys - s)) for s in (0, 3, 7, 1)]
    return q.to(device), k.to(device), v.to(device), layouts


def compare(out_a, out_b, readouts_a, readouts_b, layouts, num_queries, num_keys) -> float:
    worst = 0.0
    for b, layout in enumerate(layouts):
        first = max(0, layout.key_start - (num_keys - num_queries))
        worst = max(worst, (out_a[b, :, first:].cpu() - out_b[b, :, first:].cpu()).abs().max().item())
    for ra, rb in zip(readouts_a, readouts_b):
        if ra is None:
            continue
        sa, sb = ra.statistics, rb.statistics
        if sa is not None:
            for x, y in (
                (sa.entropy, sb.entropy),
                (sa.sink_mass, sb.sink_mass),
                (sa.hidden_sinks, sb.hidden_sinks),
            ):
                worst = max(worst, abs(x - y) / max(1.0, sa.query_count))
        if ra.last_query_rows is not None:
            worst = max(worst, (ra.last_query_rows.cpu() - rb.last_query_rows.cpu()).abs().max().item())
    return worst


def core_checks() -> dict:
    results = {}
    for shape_name, (lq, lk) in {"prefill": (48, 48), "decode": (1, 48)}.items():
        for name, plan in PLANS.items():
            q, k, v, layouts = random_batch(lq, lk, "cpu", seed=hash(name) % 1000)
            plans = [plan, P.RowPlan(), plan, plan]
            cpu = attend_rows(q, k, v, scale=0.125, layouts=layouts, plans=plans)
            gpu = attend_rows(q.cuda(), k.cuda(), v.cuda(), scale=0.125, layouts=layouts, plans=plans)
            results[f"{shape_name}/{name}/max_abs_diff_cuda_vs_cpu"] = compare(
                gpu[0], cpu[0], gpu[1], cpu[1], layouts, lq, lk
            )
        q, k, v, layouts = random_batch(lq, lk, "cuda", seed=7)
        identity = P.RowPlan(ops=(P.ScopedOp(P.SinkCalibration(beta=1.0)), P.ScopedOp(P.KeyEmphasis(1.0))))
        edited, _ = attend_rows(q, k, v, scale=0.125, layouts=layouts, plans=[identity] * 4)
        plain = plain_attention(q, k, v, scale=0.125, layouts=layouts)
        results[f"{shape_name}/identity_bit_identical_on_cuda"] = bool(torch.equal(edited, plain))
    for device in ("cpu", "cuda"):
        q, k, v, layouts = random_batch(256, 256, device, seed=3)
        plans = [PLANS["combined_with_readouts"]] * 4
        times = []
        for _ in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            attend_rows(q, k, v, scale=0.125, layouts=layouts, plans=plans)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[f"attend_rows_4x256_combined_median_s/{device}"] = statistics.median(times[1:])
    return results


def smollm2_shaped_model(tokenizer_dir: Path, into: Path) -> Path:
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(into)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, into / f.name)
    return into


def core_decode(device: str, repeats: int, keys: list[int]) -> dict:
    """bench_core.py's figures for each key count."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as bench/results/core-decode-cpu*.json were measured
    try:
        return {
            str(n): bench_core.run(
                bench_core.parse_args(["--device", device, "--repeats", str(repeats), "--keys", str(n)])
            )
            for n in keys
        }
    finally:
        torch.set_num_threads(threads)


PARTS = (
    "core",
    "core_decode_cuda",
    "core_decode_cpu",
    "engine_cuda_fp32",
    "flex_decode_cuda",
    "engine_cpu_fp32",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--core-keys", type=int, nargs="+", default=[160, 2048])
    parser.add_argument("--cuda-repeats", type=int, default=3)
    parser.add_argument("--cpu-repeats", type=int, default=1)
    args = parser.parse_args()
    from bench_engine import run_all

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "errors": {}}

    def part(name: str, measure: Callable[[], object]) -> None:
        if name not in args.parts:
            return
        started = time.perf_counter()
        try:
            report[name] = measure()
        except Exception:  # noqa: BLE001 - recorded in the report; the next part still runs
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], flush=True)
        report.setdefault("seconds", {})[name] = time.perf_counter() - started
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"== {name} done in {report['seconds'][name]:.0f} s", flush=True)

    part("core", core_checks)
    part("core_decode_cuda", lambda: core_decode("cuda", 100, args.core_keys))
    part("core_decode_cpu", lambda: core_decode("cpu", 50, args.core_keys))
    with tempfile.TemporaryDirectory() as tmp:
        model = smollm2_shaped_model(args.tokenizer, Path(tmp))
        part("engine_cuda_fp32", lambda: run_all(model, "cuda", tokens=32, repeats=args.cuda_repeats))
        flex_args = ["--device", "cuda", "--keys", "160", "512", "2048", "--repeats", "50"]
        part("flex_decode_cuda", lambda: bench_flex.run(bench_flex.parse_args(flex_args)))
        part("engine_cpu_fp32", lambda: run_all(model, "cpu", tokens=32, repeats=args.cpu_repeats))


if __name__ == "__main__":
    main()
