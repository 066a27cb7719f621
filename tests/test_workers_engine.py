"""The engine's side of the worker hand-off as a client sees it: a request shape the engine has
checked once (its template) is checked again after a reload changes the configuration, and a bad
request is refused, every time, with the words a single-process server uses."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ROOT, ServerProcess
from tests.test_dataplane_submit import SIMPLE_JSON


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("engine") / "repo"
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")
    proc = ServerProcess([repo], "--frontend-workers", "1", "--model-control-mode", "explicit",
                         "--load-model", "simple")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    proc.stop()


def _request(rows: int, value: int = 1) -> pb.ModelInferRequest:
    a = np.full((rows, 16), value, dtype=np.int32)
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[rows, 16])
        request.raw_input_contents.append(a.tobytes())
    return request


def _sum(response: pb.ModelInferResponse, rows: int) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.int32).reshape(rows, 16)


def _load(stub, max_batch_size: int) -> None:
    request = pb.RepositoryModelLoadRequest(model_name="simple")
    request.parameters["config"].string_param = json.dumps({**SIMPLE_JSON, "max_batch_size": max_batch_size})
    stub.RepositoryModelLoad(request, timeout=60)


def test_a_reload_that_changes_the_configuration_checks_a_known_shape_again(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for value in (1, 2, 3):  # the first one describes the shape to the engine, the next ones name it
            response = stub.ModelInfer(_request(6, value), timeout=10)
            np.testing.assert_array_equal(_sum(response, 6), np.full((6, 16), 2 * value, np.int32))
        try:
            _load(stub, 4)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(_request(6), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # check_inputs' own words (validation.py), as a server without workers says them
                assert refused.value.details() == ("inference request batch-size must be <= 4 for 'simple', "
                                                   "got 6 for input 'INPUT0'")
            response = stub.ModelInfer(_request(4, 5), timeout=10)
            np.testing.assert_array_equal(_sum(response, 4), np.full((4, 16), 10, np.int32))
        finally:
            _load(stub, 8)
        response = stub.ModelInfer(_request(6, 7), timeout=10)  # allowed again
        np.testing.assert_array_equal(_sum(response, 6), np.full((6, 16), 14, np.int32))


def test_a_bad_request_shape_is_refused_every_time_with_the_same_words(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        details = set()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_request(9), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.add(refused.value.details())
        assert details == {"inference request batch-size must be <= 8 for 'simple', got 9 for input 'INPUT0'"}
        assert stub.ModelInfer(_request(1), timeout=10).raw_output_contents  # the server goes on
