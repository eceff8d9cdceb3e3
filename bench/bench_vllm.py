"""attnserve's vLLM engine against raw vLLM (AsyncLLM), side by side in one run.

Same model, prompts and greedy fixed-length generation. Raw vLLM runs with attnserve's plugin
switched off (VLLM_PLUGINS); attnserve's engine runs in-process (no gRPC). The engines stay up
together and each repeat runs every configuration once, in turn. Measures generated tokens/s
and time to first token at 1 and 16 concurrent streams for:
- plain requests (raw vLLM and attnserve);
- every request intervened: sink calibration (3 layers) + key emphasis (4 layers), the size of
  a calibrated preset, and a heavy case (sink calibration on layers 2-29 + key emphasis on all);
- a mixed batch: 8 plain + 8 intervened (preset) streams; the plain streams are compared, per
  stream, with raw vLLM serving 16 plain streams;
- attention statistics sampled on 5% of steps (a second attnserve engine; plain requests);
- every stream reading out its layer statistics on every layer and step (the layer_statistics
  readout), 16 streams.
Each configuration runs `--repeats` times; medians are reported, with ratios to raw vLLM.

    python bench/bench_vllm.py --model DIR [--tokens 32] [--repeats 3] [--compiled] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

from attnserve.attention import plan as P
from attnserve.engines.base import EngineRequest, SamplingConfig
from attnserve.engines.vllm.engine import VllmEngine, set_cpu_environment
from attnserve.models.config import VllmSettings
from attnserve.readouts.layer_statistics import LayerStatisticsSettings
from bench_engine import PROMPTS, emphasis_plan

KV_CACHE_GIB = 2
CONCURRENCY = (1, 16)


def preset_plan() -> P.RequestPlan:
    """Sink calibration on 3 layers and key emphasis on 4, about what a calibrated preset holds."""
    act = P.ScopedOp(P.SinkCalibration(0.1, 0.4))
    emphasis = P.ScopedOp(P.KeyEmphasis(0.01), keys=P.KeySet(ranges=((3, 9),), invert=True))
    layer_ops = {layer: ((P.ALL_STEPS, act),) for layer in (3, 4, 5)}
    layer_ops.update({layer: ((P.ALL_STEPS, emphasis),) for layer in (8, 9, 10, 11)})
    return P.RequestPlan(layer_ops=layer_ops, applied_operations=("sink_calibration", "key_emphasis"))


def heavy_plan(num_layers: int) -> P.RequestPlan:
    act = P.ScopedOp(P.SinkCalibration(0.1, 0.4))
    emphasis = emphasis_plan(num_layers).layer_ops
    layer_ops = {
        layer: ((P.ALL_STEPS, act), *emphasis[layer]) if layer >= 2 else emphasis[layer] for layer in emphasis
    }
    return P.RequestPlan(layer_ops=layer_ops, applied_operations=("sink_calibration", "key_emphasis"))


class Stream:
    """One timed request: time to first token and tokens generated."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first = None
        self.tokens = 0
        self.ended = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.started
        self.tokens += 1

    def end(self) -> None:
        self.ended = time.perf_counter()


async def raw_stream(llm, ids, tokens: int) -> Stream:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    stream = Stream()
    async for output in llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
        for _ in output.outputs[0].token_ids:
            stream.token()
    stream.end()
    return stream


async def engine_stream(engine: VllmEngine, ids, tokens: int, plan: P.RequestPlan) -> Stream:
    request = EngineRequest(
        uuid.uuid4().hex, tuple(ids), SamplingConfig(max_tokens=tokens, ignore_eos=True), plan
    )
    stream = Stream()
    async for _ in engine.generate(request):
        stream.token()
    stream.end()
    return stream


async def run_once(make_streams, plain_rows: int | None = None) -> tuple[float, float]:
    """(tokens/s of all streams, or of the first plain_rows; their median time to first token)."""
    started = time.perf_counter()
    streams = await asyncio.gather(*make_streams())
    counted = streams if plain_rows is None else streams[:plain_rows]
    elapsed = max(s.ended for s in counted) - started
    return sum(s.tokens for s in counted) / elapsed, statistics.median(s.first for s in counted)


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False
        )
        for p in PROMPTS[:n]
    ]


async def start_raw(model: Path, compiled: bool):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_PLUGINS"] = ""  # an empty allow-list: raw vLLM, no attnserve backend
    try:
        args = AsyncEngineArgs(
            model=str(model), dtype="float32", max_num_seqs=16, enforce_eager=not compiled, seed=0
        )
        return AsyncLLM.from_engine_args(args)
    finally:
        del os.environ["VLLM_PLUGINS"]


async def start_attnserve(model: Path, compiled: bool, sample_rate: float) -> VllmEngine:
    engine = VllmEngine(
        model,
        statistics_sample_rate=sample_rate,
        on_statistics=lambda layer, stats: None,
        settings=VllmSettings(enforce_eager=not compiled, kv_cache_gib=KV_CACHE_GIB),
    )
    await engine.start()
    return engine


def per_stream_ratio(name: str, results: dict, plain_rows: int | None) -> float:
    """Tokens/s per counted stream over raw vLLM's with the same number of streams in the batch
    (names end in it); the mixed batch counts its plain rows only."""
    streams = int(name.rsplit("_", 1)[-1])
    raw = results[f"raw_plain_{streams}"]["tokens_per_s"] / streams
    return results[name]["tokens_per_s"] / (plain_rows or streams) / raw


async def run_all(model: Path, tokens: int, repeats: int, compiled: bool) -> dict:
    """All three engines stay up; every repeat runs each configuration once, in turn, so machine
    noise hits raw vLLM and attnserve alike."""
    from transformers import AutoTokenizer

    set_cpu_environment(KV_CACHE_GIB, cache_dir=None)  # the same CPU settings for every engine
    prompts = prompt_ids(AutoTokenizer.from_pretrained(model, local_files_only=True), 16)
    raw = await start_raw(model, compiled)
    ours = await start_attnserve(model, compiled, 0.0)
    sampled = await start_attnserve(model, compiled, 0.05)
    preset, heavy = preset_plan(), heavy_plan(ours.info.geometry.num_layers)

    def raw_streams(n: int):
        return lambda: [raw_stream(raw, ids, tokens) for ids in prompts[:n]]

    def streams(engine: VllmEngine, n: int, plan: P.RequestPlan):
        return lambda: [engine_stream(engine, ids, tokens, plan) for ids in prompts[:n]]

    def mixed():
        plans = [P.EMPTY_PLAN] * 8 + [preset] * 8
        return [engine_stream(ours, ids, tokens, plan) for ids, plan in zip(prompts, plans)]

    # name -> (streams, plain_rows); names end in the number of streams of the raw baseline.
    configurations = {}
    for n in CONCURRENCY:
        configurations[f"raw_plain_{n}"] = (raw_streams(n), None)
        configurations[f"attnserve_plain_{n}"] = (streams(ours, n, P.EMPTY_PLAN), None)
        configurations[f"attnserve_preset_{n}"] = (streams(ours, n, preset), None)
        configurations[f"statistics_5pct_plain_{n}"] = (streams(sampled, n, P.EMPTY_PLAN), None)
    configurations["attnserve_heavy_16"] = (streams(ours, 16, heavy), None)
    configurations["attnserve_mixed_plain_rows_16"] = (mixed, 8)
    readouts = P.RequestPlan(readouts=(LayerStatisticsSettings(),))
    configurations["attnserve_layer_statistics_16"] = (streams(ours, 16, readouts), None)
    try:
        for warm_up in (raw_streams(1), streams(ours, 1, preset), streams(sampled, 1, P.EMPTY_PLAN)):
            await run_once(warm_up)
        runs = {name: [] for name in configurations}
        for repeat in range(repeats):
            for name, (make_streams, plain_rows) in configurations.items():
                runs[name].append(await run_once(make_streams, plain_rows))
                rate, ttft = runs[name][-1]
                print(f"repeat {repeat} {name}: {rate:.1f} tok/s, TTFT p50 {1000 * ttft:.0f} ms", flush=True)
    finally:
        raw.shutdown()
        await ours.shutdown()
        await sampled.shutdown()

    results = {
        name: {
            "tokens_per_s": statistics.median(r for r, _ in values),
            "ttft_p50_s": statistics.median(t for _, t in values),
            "runs_tokens_per_s": [r for r, _ in values],
        }
        for name, values in runs.items()
    }
    ratios = {
        name: per_stream_ratio(name, results, configurations[name][1])
        for name in results
        if not name.startswith("raw_")
    }
    ttft_overhead_ms = {
        n: 1000 * (results[f"attnserve_plain_{n}"]["ttft_p50_s"] - results[f"raw_plain_{n}"]["ttft_p50_s"])
        for n in CONCURRENCY
    }
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"tokens": tokens, "repeats": repeats, "compiled": compiled, "dtype": "float32"},
        "results": results,
        "ratio_to_raw_plain": ratios,
        "ttft_p50_overhead_ms": ttft_overhead_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a local model directory")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="vLLM's compiled mode (minutes to start)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    results = asyncio.run(run_all(args.model, args.tokens, args.repeats, args.compiled))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
