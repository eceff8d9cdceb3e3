"""The tiny Stable-Diffusion pipeline, loaded once: a plain diffusers copy, a PAG-pipeline copy,
attnserve's Denoiser over a copy with attnserve's attention processors installed, and the served
model the API layer validates requests against."""

from __future__ import annotations

import pytest
from attnserve.engines.diffusers.attention import install_processors
from attnserve.engines.diffusers.denoise import Denoiser
from attnserve.engines.diffusers.engine import DiffusersEngine
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline


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
