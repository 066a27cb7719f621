"""Conformance: every case of tests/cases.py through every gRPC transport against a real inferd.

Transports: ``tritonclient.grpc`` (what users run), plain stubs generated from ``proto/`` with
``raw_input_contents`` (what perf_analyzer and KServe send), and plain stubs with typed
``contents`` for the datatypes that have a typed field. REST transports join the same table.
"""

from __future__ import annotations

import queue

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.cases import CASES, SUCCESS_CASES, Case, Error, Out, Reply, Transport, check, decode, encode
from tests.http_transports import REST_TRANSPORTS, TritonHttpJson

_MAX = 2**31 - 1
# datatype -> the typed contents field that carries it (FP16 and BF16 have none: raw only)
TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_PY = {"bool_contents": bool, "uint_contents": int, "uint64_contents": int, "int_contents": int,
       "int64_contents": int, "fp32_contents": float, "fp64_contents": float, "bytes_contents": bytes}


def error_kind(status: str | None) -> str:
    """tritonclient's "StatusCode.INVALID_ARGUMENT" -> "INVALID_ARGUMENT"."""
    return (status or "CLIENT_SIDE").removeprefix("StatusCode.")


class TritonGrpc(Transport):
    """tritonclient.grpc.InferenceServerClient.infer, used as its users use it."""

    name = "tritonclient-grpc"
    features = frozenset({"shape_override", "raw_payload"})

    def __init__(self, server) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)

    @staticmethod
    def _array(t) -> np.ndarray:
        # tritonclient 2.73 takes BF16 as ml_dtypes.bfloat16 arrays (float32 is refused)
        return t.data.astype(ml_dtypes.bfloat16) if t.datatype == "BF16" else t.data

    def infer(self, case: Case) -> Reply | Error:
        inputs = []
        for t in case.inputs:
            item = grpcclient.InferInput(t.name, list(t.data.shape), t.datatype)
            item.set_data_from_numpy(self._array(t))
            if t.shape is not None:
                item.set_shape(list(t.shape))  # a declared shape that disagrees with the data
            inputs.append(item)
        params = dict(case.parameters)
        try:
            result = self.client.infer(
                case.model, inputs, model_version=case.version, request_id=case.request_id,
                outputs=[grpcclient.InferRequestedOutput(n) for n in case.outputs] or None,
                priority=params.pop("priority", 0), timeout=params.pop("timeout", None),
                parameters=params or None, client_timeout=30)
        except InferenceServerException as exc:
            return Error(error_kind(exc.status()), exc.message())
        response = result.get_response()
        outs = []
        for o in response.outputs:
            data = result.as_numpy(o.name)
            if o.datatype == "BF16":
                data = data.astype(np.float32)
            outs.append(Out(o.name, o.datatype, data))
        return Reply(response.id, response.model_version, outs)

    def close(self) -> None:
        self.client.close()


def set_param(p: pb.InferParameter, key: str, value) -> None:
    """The oneof the real clients use: priority uint64, timeout int64, custom by Python type."""
    if key == "priority":
        p.uint64_param = value
    elif isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


class GrpcRaw(Transport):
    """Plain stubs from server/protos, every input in raw_input_contents."""

    name = "grpc-raw"
    features = frozenset({"shape_override", "raw_payload", "wire_bytes", "extra_raw", "reserved_params"})

    def __init__(self, server) -> None:
        options = [("grpc.max_send_message_length", _MAX), ("grpc.max_receive_message_length", _MAX)]
        self.channel = grpc.insecure_channel(server.grpc_url, options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def _fill(self, request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor, t) -> None:
        request.raw_input_contents.append(t.wire if t.wire is not None else encode(t.datatype, t.data))

    def request(self, case: Case) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=case.model, model_version=case.version, id=case.request_id)
        for t in case.inputs:
            tensor = request.inputs.add(name=t.name, datatype=t.datatype, shape=t.declared_shape)
            self._fill(request, tensor, t)
        request.raw_input_contents.extend(case.extra_raw)
        for name in case.outputs:
            request.outputs.add(name=name)
        for key, value in case.parameters.items():
            set_param(request.parameters[key], key, value)
        return request

    def infer(self, case: Case) -> Reply | Error:
        try:
            response = self.stub.ModelInfer(self.request(case), timeout=30)
        except grpc.RpcError as exc:
            return Error(exc.code().name, exc.details())
        # the protocol's promise: outputs only in raw_output_contents, one entry per output, in order
        assert len(response.raw_output_contents) == len(response.outputs)
        assert not any(o.HasField("contents") for o in response.outputs)
        outs = [Out(o.name, o.datatype, decode(o.datatype, list(o.shape), raw))
                for o, raw in zip(response.outputs, response.raw_output_contents)]
        return Reply(response.id, response.model_version, outs)

    def close(self) -> None:
        self.channel.close()


class GrpcTyped(GrpcRaw):
    """Plain stubs with typed ``contents`` (only for datatypes that have a typed field)."""

    name = "grpc-typed"
    features = frozenset({"shape_override", "typed_payload", "typed_field", "extra_raw", "reserved_params"})

    @classmethod
    def accepts(cls, case: Case) -> bool:
        return super().accepts(case) and all(t.typed or t.datatype in TYPED_FIELD for t in case.inputs)

    def _fill(self, request, tensor, t) -> None:
        name = t.typed or TYPED_FIELD[t.datatype]
        getattr(tensor.contents, name).extend(_PY[name](v) for v in t.data.reshape(-1).tolist())


TRANSPORTS: list[type[Transport]] = [TritonGrpc, GrpcRaw, GrpcTyped, *REST_TRANSPORTS]
PAIRS = [pytest.param(t, c, id=f"{t.name}:{c.id}") for t in TRANSPORTS for c in CASES if t.accepts(c)]


@pytest.fixture(scope="module")
def transports(models_server):
    made = {t.name: t(models_server) for t in TRANSPORTS}
    yield made
    for transport in made.values():
        transport.close()


def test_every_case_runs_somewhere():
    for case in CASES:
        assert any(t.accepts(case) for t in TRANSPORTS), case.id
    for t in TRANSPORTS:  # each gRPC transport covers the datatypes it can carry
        ran = {c.inputs[0].datatype for c in SUCCESS_CASES if c.id.startswith("dtype-") and t.accepts(c)}
        assert ran == (set(TYPED_FIELD) if t in (GrpcTyped, TritonHttpJson) else set(TYPED_FIELD) | {"FP16", "BF16"}), t.name


@pytest.mark.parametrize("transport, case", PAIRS)
def test_case(transports, transport, case):
    check(case, transports[transport.name].infer(case))


# runs after the cases above (pytest keeps definition order): the errors damaged nothing
@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.name)
def test_server_unharmed_after_errors(transports, models_server, transport):
    for case in SUCCESS_CASES:
        if case.id in ("simple-add-sub", "dtype-BYTES", "dtype-FP32") and transport.accepts(case):
            check(case, transports[transport.name].infer(case))
    assert "Traceback" not in models_server.log(), models_server.log()[-4000:]


def test_bad_request_does_not_fail_its_batch_mates(models_server):
    """A request the backend rejects (non-UTF-8 text for ONNX strings) shares a batch with good
    ones (bytes_batched waits 300 ms to fill batches): only the bad one fails."""
    texts = [b"good-0", b"\xff\xfe", b"good-2", "g\u00f6\u00f6d-3".encode()]
    done: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(models_server.grpc_url) as client:
        for i, text in enumerate(texts):
            item = grpcclient.InferInput("INPUT0", [1, 4], "BYTES")
            item.set_data_from_numpy(np.array([[text] * 4], dtype=np.object_))
            client.async_infer("bytes_batched", [item],
                               lambda result, error, i=i: done.put((i, result, error)),
                               request_id=str(i), client_timeout=30)
        answers = {i: (r, e) for i, r, e in (done.get(timeout=30) for _ in texts)}
        stats = client.get_inference_statistics("bytes_batched").model_stats[0]
    for i, text in enumerate(texts):
        result, error = answers[i]
        if i == 1:
            assert result is None and error_kind(error.status()) == "INVALID_ARGUMENT"
            assert "'INPUT0'" in error.message() and "UTF-8" in error.message()
        else:
            assert error is None, f"request {i}: {error}"
            assert result.as_numpy("OUTPUT0").tolist() == [[text] * 4]
    # the four arrive well within the 300 ms batching delay, so they form one batch by construction
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (3, 1)
    assert stats.inference_count == 3
