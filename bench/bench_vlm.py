"""Image requests through attnserve's vLLM engine against raw vLLM, side by side in one run.

A vision-language model (by default the built-in tiny-llava), one image per request, greedy
fixed-length generation. Raw vLLM (AsyncLLM) runs with only the `attnserve-pil-processors`
plugin (the PIL image-processor redirect that lets vLLM's LLaVA module import without
torchvision; no attnserve backend); attnserve's engine runs in-process (no gRPC). Both engines
stay up and each repeat runs every configuration once, in turn. Measures generated tokens/s and
time to first token at 1 and 8 concurrent streams for:
- plain image requests (raw vLLM and attnserve);
- PAINT on every request (its local and summary tokens chosen from the vision tower's attention
  per request, then two logit rescales on the language model's layers 2..N).
Medians over `--repeats`, with ratios to raw vLLM.

    python bench/bench_vlm.py [--model DIR] [--tokens 32] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import uuid
from pathlib import Path

from attnserve.api.inputs import to_engine_request
from attnserve.engines.vllm.engine import VllmEngine, set_cpu_environment, vllm_prompt
from attnserve.models.builtin import default_cache_dir, ensure_builtin
from attnserve.models.config import Limits, VllmSettings
from attnserve.models.registry import ServedModel
from attnserve_client.spec import intervention_spec_from_dict
from attnserve_client.v1 import inference_service_pb2 as pb
from bench_vllm import Stream, run_once
from PIL import Image

KV_CACHE_GIB = 1
CONCURRENCY = (1, 8)
QUESTIONS = (
    "What is in the image?",
    "Describe the picture.",
    "Which colour is the square?",
    "Is there a circle?",
    "What is in the corner?",
    "Describe the shapes.",
    "What colour is the background?",
    "How many shapes are there?",
)
COLOURS = ("navy", "maroon", "darkgreen", "purple", "teal", "olive", "black", "gray")


def paint_spec(num_layers: int):
    """PAINT with the authors' weights: alpha 0.7 on local tokens, beta 0.3 on summary tokens,
    on the query that predicts the next token, layers 2..N."""
    return intervention_spec_from_dict(
        {
            "interventions": [
                {
                    "layers": list(range(2, num_layers)),
                    "queries": "last",
                    "keys": {"image_tokens": {"tokens": part}},
                    "logit_rescale": {"alpha": alpha},
                }
                for part, alpha in (("paint_local", 0.7), ("paint_summary", 0.3))
            ]
        }
    )


def png(colour: str) -> bytes:
    image = Image.new("RGB", (64, 48), colour)
    image.paste((240, 200, 0), (10, 8, 30, 28))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def requests(served: ServedModel, tokens: int, interventions=None):
    """One engine request per question, each with its own image."""
    out = []
    for question, colour in zip(QUESTIONS, COLOURS):
        parts = [pb.ContentPart(image=png(colour)), pb.ContentPart(text=question)]
        request = pb.GenerateRequest(
            model=served.name,
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
            sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True),
            interventions=interventions,
        )
        out.append(to_engine_request(request, served))
    return out


async def raw_stream(llm, request) -> Stream:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=request.sampling.max_tokens,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    stream = Stream()
    async for output in llm.generate(vllm_prompt(request), params, uuid.uuid4().hex):
        for _ in output.outputs[0].token_ids:
            stream.token()
    stream.end()
    return stream


async def engine_stream(engine: VllmEngine, request) -> Stream:
    stream = Stream()
    async for _ in engine.generate(request):
        stream.token()
    stream.end()
    return stream


async def start_raw(model: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_PLUGINS"] = "attnserve-pil-processors"  # no attnserve backend
    try:
        args = AsyncEngineArgs(
            model=str(model),
            dtype="float32",
            max_num_seqs=max(CONCURRENCY),
            enforce_eager=True,
            seed=0,
            max_model_len=512,
            limit_mm_per_prompt={"image": 1},
        )
        return AsyncLLM.from_engine_args(args)
    finally:
        del os.environ["VLLM_PLUGINS"]


async def run_all(model: Path, tokens: int, repeats: int) -> dict:
    set_cpu_environment(KV_CACHE_GIB, cache_dir=None)  # the same CPU settings for both engines
    raw = await start_raw(model)
    ours = VllmEngine(
        model,
        max_batch_size=max(CONCURRENCY),
        settings=VllmSettings(enforce_eager=True, kv_cache_gib=KV_CACHE_GIB, max_model_len=512),
        max_images=1,
    )
    await ours.start()
    served = ServedModel("vlm", "vlm", "vllm", ours, Limits(max_images=1), {})
    plain = requests(served, tokens)
    paint = requests(served, tokens, paint_spec(ours.info.geometry.num_layers))

    def raw_streams(n: int):
        return lambda: [raw_stream(raw, request) for request in plain[:n]]

    def streams(batch, n: int):
        return lambda: [engine_stream(ours, request) for request in batch[:n]]

    configurations = {}
    for n in CONCURRENCY:
        configurations[f"raw_plain_{n}"] = raw_streams(n)
        configurations[f"attnserve_plain_{n}"] = streams(plain, n)
        configurations[f"attnserve_paint_{n}"] = streams(paint, n)
    try:
        for warm_up in (raw_streams(1), streams(plain, 1), streams(paint, 1)):
            await run_once(warm_up)
        runs = {name: [] for name in configurations}
        for repeat in range(repeats):
            for name, make_streams in configurations.items():
                runs[name].append(await run_once(make_streams))
                rate, ttft = runs[name][-1]
                print(f"repeat {repeat} {name}: {rate:.1f} tok/s, TTFT p50 {1000 * ttft:.0f} ms", flush=True)
    finally:
        raw.shutdown()
        await ours.shutdown()

    results = {
        name: {
            "tokens_per_s": statistics.median(r for r, _ in values),
            "ttft_p50_s": statistics.median(t for _, t in values),
            "runs_tokens_per_s": [r for r, _ in values],
        }
        for name, values in runs.items()
    }
    ratios = {
        name: results[name]["tokens_per_s"] / results[f"raw_plain_{name.rsplit('_', 1)[-1]}"]["tokens_per_s"]
        for name in results
        if not name.startswith("raw_")
    }
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": str(model),
        "settings": {"tokens": tokens, "repeats": repeats, "dtype": "float32", "images_per_request": 1},
        "results": results,
        "ratio_to_raw_plain": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="a local VLM directory (default: tiny-llava)"
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    model = args.model or ensure_builtin("tiny-llava", default_cache_dir())
    results = asyncio.run(run_all(model, args.tokens, args.repeats))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
