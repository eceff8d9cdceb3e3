"""The offline linters of the API and the image pass."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_buf_lint(run_tool, tmp_path):
    run_tool("buf", "lint", cwd=ROOT / "proto", env=os.environ | {"BUF_CACHE_DIR": str(tmp_path)})


def test_hadolint(run_tool):
    run_tool("hadolint", "Dockerfile", cwd=ROOT)
