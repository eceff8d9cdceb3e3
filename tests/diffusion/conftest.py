"""The tiny Stable-Diffusion pipelines (tiny-sd, tiny-sd3, tiny-sdxl, tiny-pixart), loaded once each: a plain diffusers
copy, a PAG-pipeline copy, attnserve's Denoiser over a copy with attnserve's attention processors
installed, and tiny-sd as the API layer sees it (the served model requests are validated against)."""

from __future__ import annotations

import pytest
from attnserve.engines.diffusers.attention import install_processors
from attnserve.engines.diffusers.denoise import Denoiser
from attnserve.engines.diffusers.engine import DiffusersEngine, load_pipeline
from attnserve.engines.diffusers.families import family_of
from attnserve.engines.diffusers.joint_attention import install_joint_processors
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from diffusers import (
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)


def _load(cls, path, **kwargs):
    pipe = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def plain_pipe(tiny_sd_path):
    return _load(StableDiffusionPipeline, tiny_sd_path)


@pytest.fixture(scope="session")
def pag_pipe(tiny_sd_path):
    """diffusers' own PAG pipeline on its default layers ("mid")."""
    return _load(StableDiffusionPAGPipeline, tiny_sd_path, pag_applied_layers=["mid"])


@pytest.fixture(scope="session")
def served(tiny_sd_path):
    """(Denoiser, geometry) over a pipeline whose attention runs through attnserve's processors."""
    pipe = _load(StableDiffusionPipeline, tiny_sd_path)
    geometry, call = install_processors(pipe.unet)
    return Denoiser(pipe, call, geometry), geometry


@pytest.fixture(scope="session")
def served_model(tiny_sd_path):
    """tiny-sd as the API layer sees it (its engine's worker thread never started: the tests use
    its request inputs, and run them on `served`)."""
    return ServedModel("tiny-sd", "diffusion", "diffusers", DiffusersEngine(tiny_sd_path), Limits(), {})


@pytest.fixture(scope="session")
def sd3_plain_pipe(tiny_sd3_path):
    """diffusers' SD3 pipeline on tiny-sd3 (no T5, as attnserve loads it)."""
    return _load(StableDiffusion3Pipeline, tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="session")
def sd3_pag_pipe(tiny_sd3_path):
    """diffusers' SD3 PAG pipeline on its default layers ("blocks.1")."""
    return _load(StableDiffusion3PAGPipeline, tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="session")
def sd3_served(tiny_sd3_path):
    """(Denoiser, geometry) over tiny-sd3 with attnserve's joint attention processors installed."""
    pipe = _load(StableDiffusion3Pipeline, tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    geometry, call = install_joint_processors(pipe.transformer, pipe.tokenizer.model_max_length)
    return Denoiser(pipe, call, geometry), geometry


@pytest.fixture(scope="session")
def pixart_plain_pipe(tiny_pixart_path):
    return _load(PixArtSigmaPipeline, tiny_pixart_path)


@pytest.fixture(scope="session")
def pixart_pag_pipe(tiny_pixart_path):
    """diffusers' PixArt-Sigma PAG pipeline on its default layers ("blocks.1")."""
    return _load(PixArtSigmaPAGPipeline, tiny_pixart_path)


@pytest.fixture(scope="session")
def pixart_served(tiny_pixart_path):
    """(Denoiser, geometry) over tiny-pixart with attnserve's processors installed."""
    pipe = _load(PixArtSigmaPipeline, tiny_pixart_path)
    geometry, call = family_of(pipe).install_processors()
    return Denoiser(pipe, call, geometry), geometry


@pytest.fixture(scope="session")
def pixart_served_model(tiny_pixart_path):
    """tiny-pixart as the API layer sees it (its engine's worker thread never started)."""
    engine = DiffusersEngine(tiny_pixart_path)
    return ServedModel("tiny-pixart", "diffusion", "diffusers", engine, Limits(), {})


@pytest.fixture(scope="session")
def sdxl_plain_pipe(tiny_sdxl_path):
    """diffusers' SDXL pipeline on tiny-sdxl (no watermarker, as attnserve loads it)."""
    return _load(StableDiffusionXLPipeline, tiny_sdxl_path, add_watermarker=False)


@pytest.fixture(scope="session")
def sdxl_pag_pipe(tiny_sdxl_path):
    """diffusers' SDXL PAG pipeline on its default layers ("mid")."""
    return _load(StableDiffusionXLPAGPipeline, tiny_sdxl_path, add_watermarker=False)


@pytest.fixture(scope="session")
def sdxl_served(tiny_sdxl_path):
    """(Denoiser, geometry) over tiny-sdxl as the engine loads it, with attnserve's processors."""
    pipe = load_pipeline(tiny_sdxl_path)
    geometry, call = install_processors(pipe.unet)
    return Denoiser(pipe, call, geometry), geometry
