import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """The built-in SmolLM2-135M-Instruct (fp32, safetensors), converted once into the git-ignored
    <repo>/.cache/test-models and reused by later sessions."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("smollm2-135m-instruct", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_llava_path() -> pathlib.Path:
    """The built-in tiny-llava (seeded random weights built in code), built once into
    <repo>/.cache/test-models (a few seconds) and reused."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("tiny-llava", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_sd_path() -> pathlib.Path:
    """The built-in tiny Stable-Diffusion pipeline (built in code, seeded), built once into the
    git-ignored <repo>/.cache/test-models and reused by later sessions."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("tiny-sd", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_sd3_path() -> pathlib.Path:
    """The built-in tiny SD3-style DiT pipeline (built in code, seeded), built once like tiny-sd."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("tiny-sd3", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_pixart_path() -> pathlib.Path:
    """The built-in tiny PixArt-Sigma-style DiT pipeline (built in code, seeded), built once."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("tiny-pixart", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_sdxl_path() -> pathlib.Path:
    """The built-in tiny SDXL-style UNet pipeline (built in code, seeded), built once like tiny-sd."""
    from attnserve.models.builtin import ensure_builtin

    return ensure_builtin("tiny-sdxl", REPO_ROOT / ".cache" / "test-models")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> pathlib.Path:
    """A tiny CLIP model and processor (models/tiny_diffusion.py, seeded), for HeadHunter's
    clip-score objective; a few seconds to build."""
    from attnserve.models.tiny_diffusion import build_tiny_clip

    path = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(path)
    return path
