#!/usr/bin/env bash
# GPU check: serve the TorchScript mlp on KIND_GPU with dynamic batching (and the ONNX mlp with
# onnxruntime's CUDA provider when it has one), send concurrent requests, compare every answer
# with the CPU (numpy float32) reference, and print throughput next to raw torch on the same GPU.
#
#   scripts/gpu_check.sh                  # on a CUDA machine, from anywhere; no inferd install needed
#   scripts/gpu_check.sh --cpu            # dry run of the same path on the CPU (no GPU needed)
#   scripts/gpu_check.sh --seconds 5      # other flags go to scripts/bench_torch.py
#   scripts/gpu_check.sh --prepare-deps DIR [PYTHON_VERSION]
#       on a machine with a package index: download the server's dependencies that a GPU image
#       may lack (grpcio 1.81.1 line, protobuf 6.33+, aiohttp, prometheus-client, onnx) for that
#       Python version into DIR; copy DIR to the GPU machine and run with GPU_CHECK_DEPS=DIR.
#
# Needs python3 with torch (CUDA build), numpy and onnxruntime; the rest comes from
# $GPU_CHECK_DEPS (default .cache/gpu-deps in the repo), installed there with pip when missing
# and an index is reachable. Exit status: 0 all checks passed, 1 a check failed, 2 not runnable.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEPS=${GPU_CHECK_DEPS:-$ROOT/.cache/gpu-deps}
# inferd's runtime dependencies as pyproject.toml pins them, less what the GPU image brings (numpy,
# onnxruntime: onnxruntime-gpu must stay the only one), plus onnx to build the ONNX mlp
mapfile -t PACKAGES < <($PY - "$ROOT/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
for spec in re.findall(r'^\s*"([^"]+)"', block, re.M):
    if re.match(r"(numpy|onnxruntime)\b", spec) is None:
        print(spec)
print("onnx")
PYEOF
)

if [[ "${1:-}" == "--prepare-deps" ]]; then
  target=${2:?usage: --prepare-deps DIR [PYTHON_VERSION]}
  version=${3:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  $PY -m pip install --quiet --target "$target" --only-binary=:all: --python-version "$version" \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 "${PACKAGES[@]}"
  # numpy comes with the GPU image (torch needs it); a second copy would shadow it
  rm -rf "$target"/numpy "$target"/numpy-* "$target"/numpy.libs "$target"/bin
  echo "dependencies for Python $version in $target"
  exit 0
fi

export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c 'import torch, numpy, onnxruntime' 2>/dev/null; then
  echo "gpu_check: $PY needs torch, numpy and onnxruntime (the GPU image's own); set PYTHON=..." >&2
  exit 2
fi
probe='
import importlib
missing = []
# server.app imports every frontend and the metrics; the stubs check the grpcio/protobuf versions
for module in ("server.app", "server.protos.grpc_service_pb2_grpc", "onnx"):
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing.append(f"{module}: {type(exc).__name__}: {exc}")
print("\n".join(missing))
'
missing=$($PY -c "$probe")
if [[ -n "$missing" ]]; then
  echo "gpu_check: installing into $DEPS what is missing or too old:"
  echo "$missing" | sed 's/^/  /'
  mkdir -p "$DEPS"
  if ! $PY -m pip install --quiet --target "$DEPS" --upgrade "${PACKAGES[@]}" >/dev/null 2>&1; then
    echo "gpu_check: pip could not install them (no index reachable?); prepare them elsewhere with" >&2
    echo "  scripts/gpu_check.sh --prepare-deps DIR $($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" >&2
    echo "and run with GPU_CHECK_DEPS=DIR" >&2
    exit 2
  fi
  rm -rf "$DEPS"/numpy "$DEPS"/numpy-* "$DEPS"/numpy.libs
  missing=$($PY -c "$probe")
  if [[ -n "$missing" ]]; then
    echo "gpu_check: still missing: $missing" >&2
    exit 2
  fi
fi

device=cuda
args=()
for arg in "$@"; do
  if [[ "$arg" == "--cpu" ]]; then device=cpu; else args+=("$arg"); fi
done
if [[ "$device" == "cuda" ]] && ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; running the CPU dry run instead"
  device=cpu
fi
if [[ "$device" == "cuda" ]]; then
  $PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, "providers:", ", ".join(o.get_available_providers()))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
# a GPU outruns one Python client process; on a CPU dry run the client shares the cores
clients=${GPU_CHECK_CLIENTS:-$([[ "$device" == cuda ]] && echo 4 || echo 1)}
exec $PY scripts/bench_torch.py --device "$device" --check --onnx --processes "$clients" ${args[@]+"${args[@]}"}
