"""Side-by-side: the same ModelStreamInfer and generate_stream calls against real Triton and inferd,
on the same Triton-style Python models, printing where the answers differ (Triton is the ground truth).

    ../shared/anchors/triton/setup.sh                      # once
    .venv/bin/python scripts/compare_triton_streams.py     # starts both servers, one at a time

Compares every stream message field by field except timing, and the SSE bytes of generate_stream.
"""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from server.protos import grpc_service_pb2 as pb  # noqa: E402
from server.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from triton_side import side_by_side  # noqa: E402



def _request(model: str, rid: str, inputs: dict[str, list[int]], **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=rid)
    for name, values in inputs.items():
        array = np.asarray(values, dtype=np.int32)
        request.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


CASES = {
    "count, plain": [_request("count", "a", {"COUNT": [3], "DELAY_MS": [0]})],
    "count, empty final": [_request("count", "b", {"COUNT": [2], "DELAY_MS": [0]},
                                    triton_enable_empty_final_response=True)],
    "count, zero responses + empty final": [_request("count", "c", {"COUNT": [0], "DELAY_MS": [0]},
                                                     triton_enable_empty_final_response=True)],
    "count, backend error": [_request("count", "d", {"COUNT": [-1], "DELAY_MS": [0]})],
    "reserved parameter": [_request("count", "e", {"COUNT": [1], "DELAY_MS": [0]}, triton_x=True)],
    "empty final not bool": [_request("count", "f", {"COUNT": [1], "DELAY_MS": [0]},
                                      triton_enable_empty_final_response="yes")],
    "unknown model": [_request("nope", "g", {"COUNT": [1]})],
    "missing input": [_request("count", "h", {"DELAY_MS": [0]})],
}
# where inferd answers differently on purpose (the reason is printed with the difference)
KNOWN = {"missing input": "Triton 2.51 hands a request without a required input to the Python model (which "
                          "fails on None); inferd refuses it before the model runs, naming the input"}
SSE = {"count 2": {"COUNT": 2, "DELAY_MS": 0}, "count error": {"COUNT": -1}, "count 0": {"COUNT": 0},
       "with id": {"id": "r7", "COUNT": 1}, "parameters object": {"parameters": {"COUNT": 1, "x": 1}},
       "bad parameter type": {"COUNT": 1, "x": [1]}, "bad shape": {"COUNT": [1, 2]}}


def _run(grpc_url: str, http_url: str) -> dict:
    out = {}
    with grpc.insecure_channel(grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, requests in CASES.items():
            replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
            out[name] = [_plain(r) for r in replies]
    host, port = http_url.split(":")
    for path in ("count/generate_stream", "count/generate", "nope/generate_stream"):
        for name, body in SSE.items():
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/v2/models/" + path, json.dumps(body))
            reply = conn.getresponse()
            out[f"{path} {name}"] = (reply.status, reply.getheader("Content-Type"), reply.read().decode())
            conn.close()
    return out


def _plain(reply: pb.ModelStreamInferResponse) -> dict:
    r = reply.infer_response
    return {"error_message": reply.error_message, "id": r.id, "model_name": r.model_name,
            "model_version": r.model_version,
            "outputs": [(o.name, o.datatype, list(o.shape)) for o in r.outputs],
            "raw": [bytes(b).hex() for b in r.raw_output_contents],
            "parameters": {k: str(v).strip() for k, v in r.parameters.items()}}


def main() -> int:
    repo = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(ROOT / "model_repository" / "count", repo / "count")
    return side_by_side(repo, _run, KNOWN)


if __name__ == "__main__":
    raise SystemExit(main())
