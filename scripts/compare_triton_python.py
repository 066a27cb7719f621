"""Side-by-side: Triton-style Python models (tests/triton_models) on real Triton and on inferd, the
same tritonclient calls against each, printing what differs (Triton is the ground truth).

    ../shared/anchors/triton/setup.sh                      # once
    .venv/bin/python scripts/compare_triton_python.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from triton_side import side_by_side  # noqa: E402

# where inferd answers differently on purpose
KNOWN = {
    "misbehave shape": "Triton passes an output of the wrong shape on; inferd checks outputs against the "
                       "configuration (issue 14) and fails the request naming the output",
    "misbehave two": "Triton 2.51 fails the request ('expected a single response, got 2'); current Triton, like "
                     "inferd, refuses the second send inside the model ('Non-decoupled model cannot send more than "
                     "one response')",
    "add_sub": "the model sets response parameters, which Triton 2.51's python backend does not have yet",
    "bls": "BLS calls hang in the Triton 2.51 build of the anchor kit (no answer in 15 s)",
    "async_bls": "BLS calls hang in the Triton 2.51 build of the anchor kit",
    "misbehave raise": "same text; Triton 2.51 names the default group's only instance 'misbehave_0', inferd "
                       "'misbehave_0_0' (group name + index, as Triton does for explicit groups: 'count_0_0')",
    "misbehave short": "same text; the instance name differs as above",
}


def _inp(mod, name, array, datatype):
    t = mod.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _calls(grpc_url: str, http_url: str) -> dict:
    out: dict = {}
    g = grpcclient.InferenceServerClient(grpc_url)
    h = httpclient.InferenceServerClient(http_url, network_timeout=15, connection_timeout=15)
    x4 = np.arange(4, dtype=np.float32)

    def record(name, fn):
        try:
            out[name] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - the error is what is compared
            status = getattr(exc, "status", lambda: "")()
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            out[name] = ("error", status, message.split("\n")[0])

    for client, tag in ((g, "grpc"), (h, "http")):
        mod = grpcclient if client is g else httpclient
        infer = client.infer
        if client is g:  # a call that hangs must not stop the comparison
            client = type("Timed", (), {"infer": staticmethod(
                lambda *a, **k: infer(*a, client_timeout=15, **k))})()
        record(f"add_sub {tag}", lambda: client.infer("add_sub", [
            _inp(mod, "INPUT0", x4[None], "FP32"), _inp(mod, "INPUT1", np.ones((1, 4), np.float32), "FP32")
        ]).as_numpy("OUTPUT0").tolist())
        record(f"add_sub fail {tag}", lambda: client.infer("add_sub", [
            _inp(mod, "INPUT0", x4[None], "FP32"), _inp(mod, "INPUT1", x4[None], "FP32")],
            parameters={"fail": True}).as_numpy("OUTPUT0").tolist())
        for mode in ("sync", "stream", "missing"):
            record(f"bls {mode} {tag}", lambda mode=mode: client.infer("bls", [
                _inp(mod, "MODE", np.array([mode.encode()], dtype=np.object_), "BYTES"),
                _inp(mod, "INPUT0", x4, "FP32"), _inp(mod, "INPUT1", np.ones(4, np.float32), "FP32")
            ]).as_numpy("OUTPUT0").tolist())
        record(f"async_bls {tag}", lambda: client.infer("async_bls", [_inp(mod, "INPUT0", x4, "FP32")])
               .as_numpy("OUTPUT0").tolist())
        record(f"auto_complete {tag}", lambda: client.infer("auto_complete", [
            _inp(mod, "X", np.ones((1, 3), np.float32), "FP32")]).as_numpy("Y").tolist())
        for how in ("two", "sender", "shape", "raise", "short", "ok"):
            record(f"misbehave {how} {tag}", lambda how=how: client.infer("misbehave", [
                _inp(mod, "HOW", np.array([how.encode()], dtype=np.object_), "BYTES")]).as_numpy("Y").tolist())
        record(f"repeat unary {tag}", lambda: client.infer("repeat", [
            _inp(mod, "IN", np.array([1], np.int32), "INT32"), _inp(mod, "DELAY_MS", np.array([0], np.int32), "INT32")
        ]).as_numpy("OUT").tolist())
    config = g.get_model_config("auto_complete", as_json=True)["config"]
    out["auto_complete config"] = (config["max_batch_size"], [(i["name"], i["data_type"], i["dims"])
                                                              for i in config["input"]], "dynamic_batching" in config)
    g.close()
    h.close()
    return out


def main() -> int:
    repo = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(ROOT / "tests" / "triton_models", repo)
    return side_by_side(repo, _calls, KNOWN)


if __name__ == "__main__":
    raise SystemExit(main())
