"""What HeadHunter maximises: a score per generated image, higher is better.

An objective is any callable `objective(images, prompts) -> scores`: images a list of RGB PIL
images (the images the server would return), prompts the list of their prompts (same length),
scores a sequence of finite floats, one per image. `--objective module:function` (or
`path/to/file.py:function`) names one; `clip-score` is built in: the cosine similarity of each
image's and its prompt's CLIP embeddings, with a local CLIP model directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

ImageObjective = Callable[[list[Image.Image], list[str]], Sequence[float]]

CLIP_SCORE = "clip-score"


class ObjectiveError(ValueError):
    """An objective that cannot be loaded, or that answered something other than scores."""


class ClipScore:
    """Cosine similarity of image and prompt embeddings of a CLIP model (transformers CLIPModel
    and CLIPProcessor, loaded from a local directory)."""

    def __init__(self, path: Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor  # torch loads here

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ObjectiveError(f"--clip-model: cannot load a CLIP model from {path}: {err}") from None
        self.device = device

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        import torch

        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).tolist()


def load_objective(name: str, clip_model: Path | None, device: str = "cpu") -> ImageObjective:
    """clip-score (needs clip_model), or the callable `module:function` / `file.py:function`."""
    if name == CLIP_SCORE:
        if clip_model is None:
            raise ObjectiveError("--objective clip-score needs --clip-model PATH (a local CLIP directory)")
        return ClipScore(clip_model, device)
    if clip_model is not None:
        raise ObjectiveError("--clip-model is for --objective clip-score")
    module_name, _, function_name = name.rpartition(":")
    if not module_name or not function_name:
        raise ObjectiveError(
            f"--objective: {name!r} is neither clip-score nor a callable module:function (or file.py:function)"
        )
    try:
        module = _import(module_name)
    except (ImportError, OSError, SyntaxError) as err:
        raise ObjectiveError(f"--objective: cannot import {module_name!r}: {err!r}") from None
    objective = getattr(module, function_name, None)
    if not callable(objective):
        raise ObjectiveError(f"--objective: {module_name!r} has no callable {function_name!r}")
    return objective


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None or not path.is_file():
            raise FileNotFoundError(path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path:  # the attnserve script does not put the working directory on the path
        sys.path.insert(0, "")
    return importlib.import_module(module_name)


def scores_of(objective: ImageObjective, images: list[Image.Image], prompts: list[str]) -> list[float]:
    """The objective's scores, checked: one finite number per image."""
    answer = objective(images, prompts)
    try:
        scores = [float(score) for score in answer]
    except (TypeError, ValueError):
        raise ObjectiveError(f"the objective returned {answer!r}, not a sequence of numbers") from None
    if len(scores) != len(images):
        raise ObjectiveError(f"the objective returned {len(scores)} scores for {len(images)} images")
    if not all(math.isfinite(score) for score in scores):
        raise ObjectiveError(f"the objective returned a score that is not finite: {scores}")
    return scores
