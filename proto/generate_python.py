"""Generate the Python stubs of attnserve.v1 into the client package.

protoc names modules after the proto package (attnserve.v1), which would collide with the
server package `attnserve`; the stubs live in `attnserve_client.v1` instead, so their imports
of each other are rewritten here. (protoletariat does this rewrite but pins protobuf < 6.)
Run: python proto/generate_python.py [OUT_DIR]  (or `make protos`); OUT_DIR defaults to the
client package's v1 folder (another one lets a check compare fresh stubs with the committed ones).
"""

import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
BIN_DIR = pathlib.Path(sys.executable).parent  # mypy-protobuf's plugins sit beside python
OUT_DIR = ROOT / "clients" / "python" / "attnserve_client" / "v1"

_PY_IMPORT = re.compile(r"^from attnserve\.v1 import ", re.MULTILINE)
_STUB_NAME = re.compile(r"\battnserve\.v1\.")


def main(out_dir: pathlib.Path = OUT_DIR) -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "attnserve" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
            f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            return 1
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "__init__.py").write_text(
            '"""Generated protobuf and gRPC stubs of attnserve.v1 (see proto/)."""\n'
        )
        for path in sorted((pathlib.Path(tmp) / "attnserve" / "v1").iterdir()):
            text = path.read_text()
            if "_grpc" in path.name and "Stub" not in text:
                continue  # protos without a service get empty gRPC modules
            text = _PY_IMPORT.sub("from . import ", text)
            if path.suffix == ".pyi":  # type names only, no serialized descriptors to protect
                text = _STUB_NAME.sub("attnserve_client.v1.", text)
            (out_dir / path.name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else OUT_DIR))
