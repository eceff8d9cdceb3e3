"""The time of one HeadHunter round on a diffusion model (default the built-in tiny-sd).

One round scores every head of every self-attention layer alone: candidates x --prompts images,
each with SoftPAG (u 1) on its head, denoised by the diffusers engine in batches of --batch-size
requests (the path `attnserve calibrate --method headhunter` takes), scored by the built-in
clip-score on a tiny CLIP built in code (or --clip-model DIR). Also the same number of images
without SoftPAG through the same path, and the objective's share of the round.

    python bench/bench_headhunter.py [--model DIR] [--clip-model DIR] [--prompts 4] [--size 32]
        [--steps 5] [--batch-size 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from attnserve.calibration.image_objectives import ClipScore
from attnserve.calibration.image_scorer import HeadSetScorer, ImageSettings
from attnserve.engines.diffusers.engine import DiffusersEngine
from attnserve.models.builtin import default_cache_dir, ensure_builtin
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from attnserve.models.tiny_diffusion import build_tiny_clip
from attnserve.spec.geometry import AttentionKind

PROMPTS = [
    "a photo of a cat",
    "a red house on a hill",
    "a painting of a river in the style of van gogh",
    "a boat on the sea at sunset",
    "a portrait of a dog",
    "a city street at night",
    "a green tree in a field",
    "a bird over a mountain",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="local Stable Diffusion directory")
    parser.add_argument("--clip-model", type=Path, default=None, help="local CLIP directory")
    parser.add_argument("--prompts", type=int, default=4, help=f"M, at most {len(PROMPTS)}")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = args.model or ensure_builtin("tiny-sd", default_cache_dir())
    prompts = PROMPTS[: args.prompts]

    with tempfile.TemporaryDirectory() as tmp:
        clip_path = args.clip_model
        if clip_path is None:
            clip_path = Path(tmp)
            build_tiny_clip(clip_path)
        clip = ClipScore(clip_path, args.device)
        objective_seconds = 0.0

        def timed_clip(images, texts):
            nonlocal objective_seconds
            started = time.perf_counter()
            scores = clip(images, texts)
            objective_seconds += time.perf_counter() - started
            return scores

        loop = asyncio.new_event_loop()
        engine = DiffusersEngine(path, device=args.device, max_batch_size=args.batch_size)
        loop.run_until_complete(engine.start())
        model = ServedModel("bench", "diffusion", "diffusers", engine, Limits(), {})
        settings = ImageSettings(
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=7.5,
            pag_scale=3.0,
            u=1.0,
            seed=0,
        )
        scorer = HeadSetScorer(model, prompts, settings, timed_clip, loop)
        candidates = [
            (layer.index, head)
            for layer in engine.info.geometry.layers
            if layer.kind is AttentionKind.SELF
            for head in range(layer.num_heads)
        ]
        scorer("warm-up", [frozenset(), frozenset(candidates[:1])])

        objective_seconds = 0.0
        started = time.perf_counter()
        scorer("round 1", [frozenset({head}) for head in candidates])
        round_seconds = time.perf_counter() - started
        round_objective = objective_seconds

        objective_seconds = 0.0
        started = time.perf_counter()
        scorer("plain", [frozenset()] * len(candidates))
        plain_seconds = time.perf_counter() - started
        loop.run_until_complete(engine.shutdown())
        loop.close()

    images = len(candidates) * len(prompts)
    result = {
        "model": str(path),
        "clip_model": str(args.clip_model or "tiny CLIP built in code"),
        "candidates": len(candidates),
        "prompts": len(prompts),
        "images": images,
        "size": args.size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "seconds": {
            "round": round_seconds,
            "round_objective": round_objective,
            "same_images_without_soft_pag": plain_seconds,
        },
        "per_image_seconds": {"round": round_seconds / images, "without_soft_pag": plain_seconds / images},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
