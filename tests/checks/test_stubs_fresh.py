"""The committed stubs are what proto/generate_python.py makes of the committed protos.

They are regenerated into a temporary folder and compared file by file, which needs no git and
never writes into the checkout.
"""

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python" / "attnserve_client" / "v1"


def test_generated_stubs_are_fresh(tmp_path):
    fresh = tmp_path / "v1"
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate_python.py"), str(fresh)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_file())
    generated = sorted(p.name for p in fresh.iterdir())
    assert committed == generated, "stub files differ: run python proto/generate_python.py"
    _, stale, errors = filecmp.cmpfiles(fresh, COMMITTED, generated, shallow=False)
    assert not stale and not errors, f"stale stubs {stale + errors}: run python proto/generate_python.py"
