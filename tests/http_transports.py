"""REST transports for the conformance table (tests/cases.py): tritonclient.http with JSON tensors,
tritonclient.http with the binary tensor extension, and plain HTTP sending exact wire bytes."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.cases import Case, Error, Out, Reply, Transport, decode, encode
from tests.http_helpers import HEADER_LENGTH, call

# the statuses of DESIGN.md's error table, read back (400 also covers FAILED_PRECONDITION)
ERROR_KIND = {
    "400": "INVALID_ARGUMENT",
    "404": "NOT_FOUND",
    "503": "UNAVAILABLE",
    "504": "DEADLINE_EXCEEDED",
    "501": "UNIMPLEMENTED",
    "500": "INTERNAL",
}


def _utf8(values: np.ndarray) -> bool:
    try:
        for v in values.reshape(-1):
            v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TritonHttpBinary(Transport):
    """tritonclient.http with binary tensors both ways (its default)."""

    name = "tritonclient-http-binary"
    features = frozenset({"shape_override", "raw_payload"})
    binary = True

    def __init__(self, server) -> None:
        self.client = httpclient.InferenceServerClient(server.http_url, network_timeout=30)

    def _outputs(self, case: Case) -> list[str]:
        return list(case.outputs)

    def infer(self, case: Case) -> Reply | Error:
        inputs = []
        for t in case.inputs:
            item = httpclient.InferInput(t.name, list(t.data.shape), t.datatype)
            data = t.data.astype(ml_dtypes.bfloat16) if t.datatype == "BF16" else t.data
            item.set_data_from_numpy(data, binary_data=self.binary)
            if t.shape is not None:
                item.set_shape(list(t.shape))
            inputs.append(item)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=self.binary) for n in self._outputs(case)]
        params = dict(case.parameters)
        try:
            result = self.client.infer(
                case.model,
                inputs,
                model_version=case.version,
                request_id=case.request_id,
                outputs=outputs or None,
                priority=params.pop("priority", 0),
                timeout=params.pop("timeout", None),
                parameters=params or None,
            )
        except InferenceServerException as exc:
            return Error(ERROR_KIND.get(exc.status() or "", f"HTTP {exc.status()}"), exc.message())
        response = result.get_response()
        outs = []
        for o in response["outputs"]:
            data = result.as_numpy(o["name"])
            if o["datatype"] == "BF16":
                data = data.astype(np.float32)
            elif o["datatype"] == "BYTES" and "data" in o:  # JSON text comes back as str
                data = np.array([v.encode("utf-8") for v in data.reshape(-1)], dtype=np.object_).reshape(
                    data.shape
                )
            outs.append(Out(o["name"], o["datatype"], data))
        return Reply(response.get("id", ""), response["model_version"], outs)

    def close(self) -> None:
        self.client.close()


class TritonHttpJson(TritonHttpBinary):
    """tritonclient.http with JSON ``data`` both ways: no FP16/BF16 and no non-UTF-8 text, which
    JSON cannot carry (the client refuses them before sending)."""

    name = "tritonclient-http-json"
    features = frozenset({"shape_override", "typed_payload"})
    binary = False

    @classmethod
    def accepts(cls, case: Case) -> bool:
        return (
            super().accepts(case)
            and all(t.datatype not in ("FP16", "BF16") for t in case.inputs)
            and all(_utf8(t.data) for t in case.inputs if t.datatype == "BYTES")
        )

    def _outputs(self, case: Case) -> list[str]:
        # asking for no output makes tritonclient set binary_data_output; listing them keeps JSON
        return list(case.outputs) or [o.name for o in case.expect]


class RestRaw(Transport):
    """Plain HTTP, binary extension, exact payload bytes (the malformed-payload cases)."""

    name = "rest-raw"
    features = frozenset({"shape_override", "raw_payload", "wire_bytes", "reserved_params"})

    def __init__(self, server) -> None:
        self.base = server.http_url

    def infer(self, case: Case) -> Reply | Error:
        blobs = [t.wire if t.wire is not None else encode(t.datatype, t.data) for t in case.inputs]
        doc: dict = {
            "inputs": [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": t.declared_shape,
                    "parameters": {"binary_data_size": len(b)},
                }
                for t, b in zip(case.inputs, blobs)
            ]
        }
        if case.request_id:
            doc["id"] = case.request_id
        if case.outputs:
            doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in case.outputs]
        doc["parameters"] = {**case.parameters, "binary_data_output": True}
        header = json.dumps(doc).encode()
        path = f"/v2/models/{case.model}" + (f"/versions/{case.version}" if case.version else "") + "/infer"
        answer = call(self.base, "POST", path, header + b"".join(blobs), {HEADER_LENGTH: str(len(header))})
        if answer.status != 200:
            return Error(ERROR_KIND.get(str(answer.status), f"HTTP {answer.status}"), answer.error)
        length = int(answer.headers[HEADER_LENGTH.lower()])
        response = json.loads(answer.body[:length])
        outs, offset = [], length
        for o in response["outputs"]:
            size = o["parameters"]["binary_data_size"]
            outs.append(
                Out(
                    o["name"],
                    o["datatype"],
                    decode(o["datatype"], o["shape"], answer.body[offset : offset + size]),
                )
            )
            offset += size
        assert offset == len(answer.body)
        return Reply(response.get("id", ""), response["model_version"], outs)


REST_TRANSPORTS: list[type[Transport]] = [TritonHttpBinary, TritonHttpJson, RestRaw]
