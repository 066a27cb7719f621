#!/usr/bin/env bash
# Creates the virtualenvs of the peer servers used in side-by-side benchmarks:
#   .bench/kserve-venv    kserve==0.21.0  + onnxruntime + numpy  (scripts/peers/kserve_onnx.py)
#   .bench/mlserver-venv  mlserver==1.7.1 + onnxruntime + numpy  (scripts/peers/mlserver_onnx.py)
# They get separate venvs because their dependencies conflict (with each other and with
# inferd's pinned grpcio/protobuf line). Idempotent: a venv whose marker file matches the
# requested package list is left alone; PEERS_FORCE=1 rebuilds both.
#
#   scripts/peers/setup.sh            # both
#   scripts/peers/setup.sh kserve     # only one of: kserve mlserver
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$REPO_ROOT/.bench
PYTHON=${PYTHON:-python3}

KSERVE_PKGS=(kserve==0.21.0 onnxruntime numpy)
MLSERVER_PKGS=(mlserver==1.7.1 onnxruntime numpy)

# pip, quietly; drops the "Location 'file:///...' is ignored" warnings that an extra-index-url
# pointing at a missing local folder (a pip.conf of this machine) prints per package.
pip_q() {
    local pip=$1; shift
    "$pip" install -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

make_venv() {
    local name=$1; shift
    local venv=$BENCH/$name-venv marker want
    marker=$venv/.peer-ready
    want="$*"
    if [ "${PEERS_FORCE:-0}" != 1 ] && [ "$(cat "$marker" 2>/dev/null)" = "$want" ]; then
        echo "peers/setup.sh: $venv is up to date ($want)"
        return 0
    fi
    echo "peers/setup.sh: building $venv ($want) ..."
    rm -rf "$venv"
    mkdir -p "$BENCH"
    "$PYTHON" -m venv "$venv"
    pip_q "$venv/bin/pip" --upgrade pip
    pip_q "$venv/bin/pip" "$@"
    "$venv/bin/python" -c 'import onnxruntime, numpy' # fails loudly on a broken install
    echo "$want" >"$marker"
    echo "peers/setup.sh: $venv ready"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(kserve mlserver)
for t in "${targets[@]}"; do
    case "$t" in
        kserve)   make_venv kserve "${KSERVE_PKGS[@]}" ;;
        mlserver) make_venv mlserver "${MLSERVER_PKGS[@]}" ;;
        *) echo "peers/setup.sh: unknown peer '$t' (kserve|mlserver)" >&2; exit 2 ;;
    esac
done
