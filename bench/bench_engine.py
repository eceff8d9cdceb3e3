"""attnserve's transformers engine against transformers' generate(), side by side in one run.

Measures generated tokens/s (greedy, fixed length) for:
- generate(): batch 1, and one batched call for 16 prompts (left padding);
- the engine, in-process (no gRPC): 1 and 16 concurrent requests, plain; 16 with every request
  intervened (sink calibration on layers 2-29; key emphasis on every layer); 16 with attention
  statistics sampled on 5% and on 100% of steps.
Each configuration runs `--repeats` times; medians are reported, with ratios to the plain engine.

    python bench/bench_engine.py [--device cpu] [--tokens 32] [--repeats 3] [--out bench/results/engine-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from attnserve.attention import plan as P
from attnserve.engines.base import EngineRequest, SamplingConfig
from attnserve.engines.hf.engine import TransformersEngine
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about rain.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What does a compiler do?",
    "List two uses of copper.",
    "Why is the sky blue? Answer briefly, in plain words a child would understand.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a small bakery that sells sourdough bread and pastries.",
    "How many legs does a spider have?",
    "What is the largest planet in our solar system?",
]

ACT_ALL = P.RequestPlan(
    layer_ops={layer: ((P.ALL_STEPS, P.ScopedOp(P.SinkCalibration(0.1, 0.4))),) for layer in range(2, 30)},
    applied_operations=("sink_calibration",),
)


def emphasis_plan(num_layers: int) -> P.RequestPlan:
    op = P.ScopedOp(P.KeyEmphasis(0.01), keys=P.KeySet(ranges=((3, 9),), invert=True))
    return P.RequestPlan(
        layer_ops={layer: ((P.ALL_STEPS, op),) for layer in range(num_layers)},
        applied_operations=("key_emphasis",),
    )


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    out = []
    for text in (PROMPTS * (n // len(PROMPTS) + 1))[:n]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer(rendered, add_special_tokens=False).input_ids)
    return out


@torch.inference_mode()
def time_generate(model, tokenizer, prompts: list[list[int]], tokens: int, device: str) -> float:
    """tokens/s of one generate() call over these prompts (left padded)."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    _sync(device)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / elapsed


def time_engine(engine: TransformersEngine, prompts, tokens: int, plan: P.RequestPlan) -> float:
    """tokens/s with all prompts submitted at once."""

    async def one(i: int, ids: list[int]) -> int:
        request = EngineRequest(str(i), tuple(ids), SamplingConfig(max_tokens=tokens, ignore_eos=True), plan)
        return sum([1 async for _ in engine.generate(request)])

    async def run() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
        return sum(counts) / (time.perf_counter() - start)

    return asyncio.run(run())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_all(model_path: Path, device: str, tokens: int, repeats: int, dtype: str = "float32") -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts16, prompts1 = prompt_ids(tokenizer, 16), prompt_ids(tokenizer, 1)
    results: dict[str, list[float]] = {}

    def measure(name: str, fn) -> None:
        fn()  # warm-up
        results[name] = [fn() for _ in range(repeats)]
        print(
            f"{name:42s} median {statistics.median(results[name]):8.1f} tok/s  runs {results[name]}",
            flush=True,
        )

    torch_dtype = getattr(torch, dtype)
    model = (
        AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, attn_implementation="sdpa")
        .eval()
        .to(device)
    )
    measure("generate() batch 1", lambda: time_generate(model, tokenizer, prompts1, tokens, device))
    measure("generate() batch 16", lambda: time_generate(model, tokenizer, prompts16, tokens, device))

    engines = {
        rate: TransformersEngine(model_path, dtype=dtype, device=device, statistics_sample_rate=rate)
        for rate in (0.0, 0.05, 1.0)
    }
    plain = engines[0.0]
    num_layers = plain.info.geometry.num_layers

    async def start_all():
        for e in engines.values():
            await e.start()

    asyncio.run(start_all())
    # The engines' scheduler threads are bound to no loop; each asyncio.run gets a fresh one.
    measure("engine 1 request", lambda: time_engine(plain, prompts1, tokens, P.EMPTY_PLAN))
    measure("engine 16 concurrent", lambda: time_engine(plain, prompts16, tokens, P.EMPTY_PLAN))
    measure("engine 16, all sink calibration (L2-29)", lambda: time_engine(plain, prompts16, tokens, ACT_ALL))
    measure(
        "engine 16, all key emphasis (every layer)",
        lambda: time_engine(plain, prompts16, tokens, emphasis_plan(num_layers)),
    )
    measure(
        "engine 16, statistics on 5% of steps",
        lambda: time_engine(engines[0.05], prompts16, tokens, P.EMPTY_PLAN),
    )
    measure(
        "engine 16, statistics on every step",
        lambda: time_engine(engines[1.0], prompts16, tokens, P.EMPTY_PLAN),
    )

    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians["engine 16 concurrent"]
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "dtype": dtype,
        "tokens_per_request": tokens,
        "repeats": repeats,
        "runs_tokens_per_s": results,
        "median_tokens_per_s": medians,
        "ratios": {
            "engine16_over_generate16": base / medians["generate() batch 16"],
            "engine16_over_generate1": base / medians["generate() batch 1"],
            "sink_calibration_over_plain": medians["engine 16, all sink calibration (L2-29)"] / base,
            "key_emphasis_over_plain": medians["engine 16, all key emphasis (every layer)"] / base,
            "statistics_5pct_over_plain": medians["engine 16, statistics on 5% of steps"] / base,
            "statistics_every_step_over_plain": medians["engine 16, statistics on every step"] / base,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: the built-in SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine-cpu.json")
    args = parser.parse_args()
    if args.model is None:
        from attnserve.models.builtin import default_cache_dir, ensure_builtin

        args.model = ensure_builtin("smollm2-135m-instruct", default_cache_dir())
    result = run_all(args.model, args.device, args.tokens, args.repeats, args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
