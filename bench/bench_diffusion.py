"""attnserve's diffusion path beside diffusers' own pipelines, in one run on one model.

Side by side, same prompt, seed, size and steps (median seconds of --repeats rounds, each
running every configuration once, in turn):
- diffusers' pipeline vs attnserve's denoiser with no plans (the processors' cost);
- diffusers' PAG pipeline (its default layers: "mid" for a UNet, "blocks.1" for SD3 and PixArt) vs
  attnserve's PAG on the same layers (goal <= 1.0x);
- attnserve with DAAM word heatmaps vs without (goal <= 1.10x);
- --batch requests denoised as one batch vs one at a time.
Any local Stable Diffusion, SDXL, SD3 or PixArt-Sigma directory works (--model; --builtin
tiny-sdxl, tiny-sd3 or tiny-pixart for the built-in ones); the default is the built-in tiny-sd,
whose ratios say little about a real model's (its UNet is tiny). --wide DIR builds (once) and
runs a pipeline at Stable Diffusion 1.5's width with random weights (wide_sd.py): a real model's
cost at the size asked.

    python bench/bench_diffusion.py [--model DIR | --builtin NAME | --wide DIR] [--size 64] [--steps 10] [--repeats 3] [--batch 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from attnserve.attention.plan import IdentityBlend, ScopedOp
from attnserve.engines.base import ImageRequest
from attnserve.engines.diffusers.denoise import Denoiser
from attnserve.engines.diffusers.engine import load_pipeline
from attnserve.engines.diffusers.families import PixArtFamily, SD3Family, SDXLFamily, family_of
from attnserve.models.builtin import default_cache_dir, ensure_builtin
from attnserve.readouts.word_heatmaps import compile_words
from attnserve.spec.errors import Violations
from attnserve.spec.guidance import PerturbedGuidance, default_pag_layers, pag_layers
from attnserve_client.v1 import image_generation_pb2 as gpb
from diffusers import (
    PixArtSigmaPAGPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
)
from wide_sd import build_wide_sd

PROMPT = "a photo of a cat"


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run; every round runs each once, in turn, so the machine's noise
    hits them alike."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="local Stable Diffusion, SDXL or SD3 directory"
    )
    parser.add_argument("--builtin", default="tiny-sd", help="built-in pipeline when --model is not given")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--wide", type=Path, default=None, help="SD 1.5-width pipeline directory (built if missing)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = args.model or ensure_builtin(args.builtin, default_cache_dir())
    if args.wide is not None:
        if not args.wide.exists():
            build_wide_sd(args.wide, ensure_builtin("tiny-sd", default_cache_dir()))
        path = args.wide

    plain_pipe = load_pipeline(path, device=args.device)
    served = load_pipeline(path, device=args.device)
    family = family_of(served)
    geometry, call = family.install_processors()
    denoiser = Denoiser(served, call, geometry)
    # PixArt: the asked size, the caption as it is (as attnserve runs it).
    pipeline_options = {}
    if isinstance(family, SD3Family):
        pag_pipe = StableDiffusion3PAGPipeline.from_pretrained(
            path, local_files_only=True, use_safetensors=True, text_encoder_3=None, tokenizer_3=None
        ).to(args.device)
    elif isinstance(family, PixArtFamily):
        pag_pipe = PixArtSigmaPAGPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
        pag_pipe = pag_pipe.to(args.device)
        pipeline_options = {"use_resolution_binning": False, "clean_caption": False}
    elif isinstance(family, SDXLFamily):
        pag_pipe = StableDiffusionXLPAGPipeline.from_pretrained(
            path, local_files_only=True, use_safetensors=True, add_watermarker=False
        ).to(args.device)
    else:
        pag_pipe = StableDiffusionPAGPipeline.from_pretrained(
            path, local_files_only=True, use_safetensors=True, pag_applied_layers=["mid"], safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        ).to(args.device)  # fmt: skip
    pag_pipe.set_progress_bar_config(disable=True)

    tokenizer = family.tokenizer
    request = ImageRequest(
        request_id="bench",
        prompt_token_ids=tuple(tokenizer(PROMPT).input_ids),
        negative_token_ids=tuple(tokenizer("").input_ids),
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=7.5,
        seed=0,
        num_images=1,
    )
    violations = Violations()
    layers = pag_layers(default_pag_layers(geometry), "pag.layers", geometry, violations)
    pag = PerturbedGuidance(3.0, 0.0, {layer.index: (ScopedOp(IdentityBlend(1.0)),) for layer in layers})
    words = compile_words(
        gpb.WordHeatmapsSpec(words=["cat"]),
        request.prompt_token_ids,
        tokenizer,
        args.size**2,
        10**9,
        violations,
    )
    assert not violations.items, violations.items

    def ours(*requests):
        jobs = [denoiser.start(r) for r in requests]
        denoiser.run(jobs, args.steps, lambda job, step, timestep: None)
        for job in jobs:
            denoiser.images(job, "np")
            for heatmap in job.heatmaps:
                heatmap.heatmaps(job.request.heatmap_words, (args.size, args.size))

    def theirs(pipe, **kwargs):
        pipe(
            PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=7.5,
            generator=torch.Generator(args.device).manual_seed(0), output_type="np", **pipeline_options,
            **kwargs,
        )  # fmt: skip

    batch = [dataclasses.replace(request, seed=i) for i in range(args.batch)]
    times = median_seconds(
        {
            "diffusers_plain": lambda: theirs(plain_pipe),
            "attnserve_plain": lambda: ours(request),
            "diffusers_pag": lambda: theirs(pag_pipe, pag_scale=3.0),
            "attnserve_pag": lambda: ours(dataclasses.replace(request, perturbed=pag)),
            "attnserve_heatmaps": lambda: ours(dataclasses.replace(request, heatmap_words=words)),
            f"attnserve_{args.batch}_batched": lambda: ours(*batch),
            f"attnserve_{args.batch}_one_at_a_time": lambda: [ours(r) for r in batch],
        },
        args.repeats,
    )
    result = {
        "model": str(path),
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "seconds": times,
        "ratios": {
            "plain: attnserve / diffusers": times["attnserve_plain"] / times["diffusers_plain"],
            "pag: attnserve / diffusers (goal <= 1.0)": times["attnserve_pag"] / times["diffusers_pag"],
            "heatmaps on / off (goal <= 1.10)": times["attnserve_heatmaps"] / times["attnserve_plain"],
            "batched / one at a time": times[f"attnserve_{args.batch}_batched"]
            / times[f"attnserve_{args.batch}_one_at_a_time"],
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
