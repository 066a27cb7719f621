#!/usr/bin/env python3
"""Generate the protobuf / gRPC Python stubs in server/protos from proto/*.proto.

    python scripts/gen_proto.py           # (re)write server/protos
    python scripts/gen_proto.py --check   # exit 1 if the committed stubs are stale

protoc emits absolute imports between the generated modules (``import model_config_pb2``);
they are rewritten into package-relative ones so the stubs work as ``server.protos``.
Needs only the standard library and grpcio-tools (which provides grpc_tools.protoc).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "server" / "protos"

PROTOS = ("model_config.proto", "grpc_service.proto")
GENERATED = (
    "__init__.py",
    "model_config_pb2.py",
    "model_config_pb2.pyi",
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
)
INIT_TEXT = '"""Generated protobuf and gRPC stubs; regenerate with scripts/gen_proto.py, never edit."""\n'

_MODULES = "|".join(re.escape(Path(p).stem + "_pb2") for p in PROTOS)
# "import model_config_pb2 as x"  ->  "from . import model_config_pb2 as x"
_IMPORT_RE = re.compile(rf"^import ({_MODULES})\b", re.MULTILINE)
# "from model_config_pb2 import x"  ->  "from .model_config_pb2 import x"
_FROM_RE = re.compile(rf"^from ({_MODULES}) import\b", re.MULTILINE)


def _run_protoc(out_dir: Path) -> None:
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_proto: grpcio-tools is not installed (pip install grpcio-tools)")
    import importlib.resources

    # grpc_tools ships the well-known types (google/protobuf/*.proto) in its _proto folder.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"gen_proto: protoc failed with exit status {rc}")


def _make_imports_relative(text: str) -> str:
    text = _IMPORT_RE.sub(r"from . import \1", text)
    return _FROM_RE.sub(r"from .\1 import", text)


def render() -> dict[str, bytes]:
    """Run protoc in a scratch folder and return {file name: content} for GENERATED."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        scratch = Path(tmp)
        _run_protoc(scratch)
        for name in GENERATED:
            if name == "__init__.py":
                files[name] = INIT_TEXT.encode("utf-8")
                continue
            path = scratch / name
            if not path.is_file():
                sys.exit(f"gen_proto: protoc did not produce {name}")
            text = path.read_text(encoding="utf-8")
            files[name] = _make_imports_relative(text).encode("utf-8")
    # protoc also emits an empty model_config_pb2_grpc.py (no services there); it is dropped.
    return files


def generate(out_dir: Path) -> None:
    """Write every file of GENERATED into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in render().items():
        (out_dir / name).write_bytes(content)


def check(out_dir: Path) -> int:
    """Return 0 when the files in out_dir equal freshly generated ones, else 1."""
    stale = []
    for name, content in render().items():
        committed = out_dir / name
        if not committed.is_file():
            stale.append(f"{name} (missing)")
        elif committed.read_bytes() != content:
            stale.append(name)
    if stale:
        rel = out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir
        print(f"gen_proto: stale generated files in {rel}:", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        print("regenerate with: python scripts/gen_proto.py", file=sys.stderr)
        return 1
    print("gen_proto: generated stubs are up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary folder and compare with server/protos; exit 1 if stale",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(OUT_DIR)
    generate(OUT_DIR)
    print(f"gen_proto: wrote {', '.join(GENERATED)} to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
