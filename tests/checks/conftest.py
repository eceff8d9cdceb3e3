import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest


def _run_tool(name: str, *args: str, cwd: pathlib.Path, env: dict[str, str] | None = None) -> None:
    """Run a dev tool (the venv's binary beside this interpreter, else one on PATH); fail with
    its output when it reports anything."""
    search_path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ["PATH"]])
    binary = shutil.which(name, path=search_path)
    if binary is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    result = subprocess.run(
        [binary, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"{name} {' '.join(args)} (exit {result.returncode}):\n{output}"


@pytest.fixture
def run_tool() -> Callable[..., None]:
    return _run_tool
