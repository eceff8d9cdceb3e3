"""What a visual recipe request costs: engine passes and wall time of CARVE and Visual Funnel
against a plain request for the same image and question, in-process (no gRPC).

Each round runs every configuration once, in turn, so the machine's noise hits them alike;
medians over --repeats rounds, and ratios to the plain request. The default model is the built-in
tiny-llava (random weights): its figures count passes and overhead, not a real model's cost.

    PYTHONPATH=server:clients/python python bench/bench_visual_recipes.py [--engine transformers|vllm]
        [--tokens 16] [--repeats 5] [--out bench/results/visual-recipes-tiny-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from attnserve.api.inputs import to_engine_request
from attnserve.api.visual_recipes import to_visual_recipe
from attnserve.models.builtin import ensure_builtin
from attnserve.models.config import Limits, VllmSettings
from attnserve.models.registry import ServedModel
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import visual_recipe_pb2 as vpb
from PIL import Image

CASES = {
    "plain": {},
    "carve": {"carve": vpb.CarveRecipe()},
    "visual_funnel": {"visual_funnel": vpb.VisualFunnelRecipe()},
}


def scene() -> bytes:
    image = Image.new("RGB", (320, 240), "navy")
    image.paste((240, 200, 0), (60, 50, 140, 130))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def request(tokens: int, **recipe) -> pb.GenerateRequest:
    parts = [pb.ContentPart(image=scene()), pb.ContentPart(text="What colour is the square?")]
    return pb.GenerateRequest(
        model="tiny-llava",
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
        sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True),
        **recipe,
    )


async def one(served: ServedModel, tokens: int, recipe: dict) -> int:
    """Runs one request; returns the engine passes it took."""
    if not recipe:
        async for _ in served.engine.generate(to_engine_request(request(tokens), served)):
            pass
        return 1
    run = to_visual_recipe(request(tokens, **recipe), served)
    async for _ in run.generate(served.engine):
        pass
    return run.outcome.passes


def engine_for(kind: str, path: Path, cache: Path):
    if kind == "vllm":
        from attnserve.engines.vllm.engine import VllmEngine

        settings = VllmSettings(enforce_eager=True, kv_cache_gib=1, max_model_len=512)
        return VllmEngine(path, max_batch_size=8, settings=settings, cache_dir=cache, max_images=4)
    from attnserve.engines.hf.engine import TransformersEngine

    return TransformersEngine(path, max_batch_size=8)


async def measure(args) -> dict:
    path = ensure_builtin("tiny-llava", Path(".cache/test-models"))
    with tempfile.TemporaryDirectory() as cache:
        engine = engine_for(args.engine, path, Path(cache))
        await engine.start()
        try:
            served = ServedModel("tiny-llava", "vlm", args.engine, engine, Limits(), {})
            passes = {
                name: await one(served, args.tokens, recipe) for name, recipe in CASES.items()
            }  # warm-up
            times: dict[str, list[float]] = {name: [] for name in CASES}
            for _ in range(args.repeats):
                for name, recipe in CASES.items():
                    started = time.perf_counter()
                    await one(served, args.tokens, recipe)
                    times[name].append(time.perf_counter() - started)
        finally:
            await engine.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "engine": args.engine,
        "model": "tiny-llava",
        "final_tokens": args.tokens,
        "reading_pass_tokens": 32,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "passes": passes,
        "median_seconds": medians,
        "ratio_to_plain": {name: medians[name] / medians["plain"] for name in CASES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--tokens", type=int, default=16, help="tokens of the final answer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
