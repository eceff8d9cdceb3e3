"""How far each bench_vllm.py configuration is from the machine's physical limits.

A decode step of B streams reads every weight once and each stream's keys and values of every
layer, and does about 2 flops per weight per stream plus the attention's 4 per key, head
dimension and head. From a bench_vllm.py result (tokens/s at B streams, so a step takes
B / tokens_per_s), this prints the bytes and flops per step against what this machine measures
now: memory bandwidth (a large tensor copy) and matmul throughput (a large fp32 GEMM), both with
torch's threads as set. Planned configurations also copy their rows' keys and values out of the
paged cache at each planned layer; that traffic is listed separately.

    PYTHONPATH=server:bench .venv/bin/python bench/roofline.py --model DIR \
        --results bench/results/vllm-cpu-batched.json [--streams 16] [--out bench/results/roofline-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_core import median_ms
from bench_engine import prompt_ids
from bench_vllm import heavy_plan, preset_plan
from transformers import AutoConfig, AutoTokenizer

FP32_BYTES = 4


def memory_bandwidth(megabytes: int = 512, repeats: int = 9) -> float:
    """Bytes per second moved by a copy (read + write) of a tensor far larger than the caches."""
    source = torch.ones(megabytes * 2**20 // FP32_BYTES)
    target = torch.empty_like(source)
    return 2 * source.numel() * FP32_BYTES / (median_ms(lambda: target.copy_(source), repeats) / 1000)


def gemm_flops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / (median_ms(lambda: a @ b, repeats) / 1000)


def planned_layers(name: str, num_layers: int) -> int:
    """Layers whose attention a configuration's plan recomputes (bench_vllm.py's plans)."""
    if "heavy" in name:
        return len(heavy_plan(num_layers).layer_ops)
    if "preset" in name or "mixed" in name:
        return len(preset_plan().layer_ops)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    measured = json.loads(args.results.read_text())
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    streams, tokens = args.streams, measured["settings"]["tokens"]
    prompt_tokens = statistics.mean(len(ids) for ids in prompt_ids(tokenizer, streams))
    context = prompt_tokens + tokens / 2  # mean keys per stream over the decode steps
    weight_bytes = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    weights = weight_bytes / FP32_BYTES
    layers, kv_heads, heads = config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads
    head_dim = config.hidden_size // heads
    kv_bytes_per_layer = streams * 2 * kv_heads * head_dim * FP32_BYTES * context
    step_bytes = weight_bytes + layers * kv_bytes_per_layer
    step_flops = streams * (2 * weights + layers * 4 * heads * head_dim * context)

    bandwidth, flops = memory_bandwidth(), gemm_flops()
    print(
        f"machine: {bandwidth / 1e9:.1f} GB/s copy bandwidth, {flops / 1e9:.1f} GFLOP/s fp32 GEMM "
        f"({torch.get_num_threads()} threads)"
    )
    print(
        f"step of {streams} streams, {context:.0f} keys each: {step_bytes / 1e6:.0f} MB read "
        f"({weight_bytes / 1e6:.0f} MB weights), {step_flops / 1e9:.2f} GFLOP"
    )
    rows = {}
    for name, result in measured["results"].items():
        if not name.endswith(f"_{streams}") or "mixed" in name:
            continue  # the mixed configuration's tokens/s counts its plain half only
        step_s = streams / result["tokens_per_s"]
        copied = 2 * planned_layers(name, layers) * kv_bytes_per_layer  # read + write of the gather
        rows[name] = {
            "step_ms": 1000 * step_s,
            "bandwidth_fraction": step_bytes / step_s / bandwidth,
            "gemm_fraction": step_flops / step_s / flops,
            "planned_copy_mb": copied / 1e6,
            "planned_copy_ms_at_bandwidth": 1000 * copied / bandwidth,
        }
        print(
            f"{name:28s} step {1000 * step_s:6.1f} ms  {rows[name]['bandwidth_fraction']:5.1%} of bandwidth  "
            f"{rows[name]['gemm_fraction']:5.1%} of GEMM  plan copies {copied / 1e6:5.1f} MB"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": {"copy_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": flops / 1e9},
                    "step": {
                        "streams": streams,
                        "mean_keys": context,
                        "bytes": step_bytes,
                        "weight_bytes": weight_bytes,
                        "flops": step_flops,
                    },
                    "source": str(args.results),
                    "configurations": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
