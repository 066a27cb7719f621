"""The system shared-memory extension, driven by tritonclient (grpc and http) with its shared-memory
utilities, as against Triton: register / status / unregister, inputs and outputs in shared memory,
every refusal, and unregistering a region a request is still using."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ROOT, ServerProcess

MODULES = {"grpc": grpcclient, "http": httpclient}
X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    import onnx_models

    repo = tmp_path_factory.mktemp("shm_repo")
    onnx_models.identity(repo / "identity" / "1" / "model.onnx", "FP32")
    (repo / "identity" / "config.pbtxt").write_text("max_batch_size: 8\ninstance_group [ { count: 1 } ]\n")
    onnx_models.identity(repo / "identity_bytes" / "1" / "model.onnx", "BYTES", ("batch", 1))
    (repo / "identity_bytes" / "config.pbtxt").write_text("max_batch_size: 8\ninstance_group [ { count: 1 } ]\n")
    shutil.copytree(ROOT / "tests" / "triton_models" / "slow", repo / "slow")
    proc = ServerProcess([repo], "--allow-client-shm=true", *os.environ.get("INFERD_TEST_SHM_ARGS", "").split())
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-shm.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(shm_server, kind):
    module = MODULES[kind]
    c = module.InferenceServerClient(shm_server.grpc_url if kind == "grpc" else shm_server.http_url)
    yield c
    c.unregister_system_shared_memory()  # every test leaves the registry empty
    c.close()


@pytest.fixture
def regions():
    """Create shared-memory objects (destroyed after the test): make(name, byte_size) -> handle."""
    made = []

    def make(byte_size: int, name: str = ""):
        name = name or f"r{len(made)}"
        key = f"/inferd_test_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return name, key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _error(fn) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def _code(kind: str, exc: InferenceServerException) -> str:
    """The status as one word: gRPC's code name, or the HTTP status number."""
    return str(exc.status()).removeprefix("StatusCode.") if kind == "grpc" else str(exc.status())


BAD_REQUEST = {"grpc": "INVALID_ARGUMENT", "http": "400"}
NOT_FOUND = {"grpc": "NOT_FOUND", "http": "404"}


def _input(kind: str, name: str, shape, datatype: str = "FP32"):
    return MODULES[kind].InferInput(name, list(shape), datatype)


def _output(kind: str, name: str):
    return MODULES[kind].InferRequestedOutput(name)


def _maps(server: ServerProcess, key: str) -> list[str]:
    """The server's mappings of /dev/shm/<key> (permissions column), from /proc/<pid>/maps."""
    lines = Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
    return [line.split()[1] for line in lines if line.endswith("/dev/shm" + key)]


# ---------------------------------------------------------------- happy paths


def test_metadata_lists_the_extension(client):
    meta = client.get_server_metadata()
    extensions = meta.extensions if hasattr(meta, "extensions") else meta["extensions"]
    assert "system_shared_memory" in extensions


def test_register_status_unregister(client, kind, regions):
    name_a, key_a, _ = regions(64, "alpha")
    name_b, key_b, _ = regions(4096, "beta")
    client.register_system_shared_memory(name_a, key_a, 64)
    client.register_system_shared_memory(name_b, key_b, 1024, offset=512)
    status = client.get_system_shared_memory_status()
    if kind == "grpc":
        got = {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()}
    else:
        got = {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status}
    assert got == {"alpha": (key_a, 0, 64), "beta": (key_b, 512, 1024)}
    one = client.get_system_shared_memory_status("beta")
    assert (len(one.regions) if kind == "grpc" else len(one)) == 1
    client.unregister_system_shared_memory("alpha")
    status = client.get_system_shared_memory_status()
    assert (list(status.regions) if kind == "grpc" else [r["name"] for r in status]) == ["beta"]
    client.unregister_system_shared_memory()
    status = client.get_system_shared_memory_status()
    assert (len(status.regions) if kind == "grpc" else len(status)) == 0
    client.unregister_system_shared_memory("never_registered")  # Triton: not an error


def test_input_and_output_in_shared_memory(client, kind, regions, shm_server):
    name_in, key_in, h_in = regions(X.nbytes)
    name_out, key_out, h_out = regions(X.nbytes)
    shm.set_shared_memory_region(h_in, [X])
    client.register_system_shared_memory(name_in, key_in, X.nbytes)
    client.register_system_shared_memory(name_out, key_out, X.nbytes)
    assert _maps(shm_server, key_in) == ["r--s"]  # opened read-only until something writes to it
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory(name_in, X.nbytes)
    out = _output(kind, "OUTPUT0")
    out.set_shared_memory(name_out, X.nbytes)
    result = client.infer("identity", [inp], outputs=[out])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, X.shape), X)
    response = result.get_response()  # it names the output but carries no data for it, as Triton's
    if kind == "grpc":
        assert list(response.outputs[0].shape) == [2, 4] and response.raw_output_contents == [b""]
    else:
        assert response["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 4]}]
    assert _maps(shm_server, key_in) == ["r--s"]  # only read
    assert "rw-s" in _maps(shm_server, key_out)  # written in place


def test_offsets_and_mixed_placement(client, kind, regions):
    """Input at an offset in a region registered at an offset; output in the response."""
    name, key, handle = regions(8192)
    shm.set_shared_memory_region(handle, [X], offset=4096 + 64)
    client.register_system_shared_memory(name, key, 1024, offset=4096)
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory(name, X.nbytes, offset=64)
    result = client.infer("identity", [inp], outputs=[_output(kind, "OUTPUT0")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X)
    # and the other way round: data in the request, the output at an offset of a region
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_data_from_numpy(X * 2)
    out = _output(kind, "OUTPUT0")
    out.set_shared_memory(name, X.nbytes, offset=256)
    client.infer("identity", [inp], outputs=[out])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, X.shape, offset=4096 + 256), X * 2)


def test_bytes_tensors(client, kind, regions):
    values = np.array([[b"one"], [b"three"]], dtype=np.object_)
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values.ravel())  # the length-prefixed form
    size = len(raw)
    name_in, key_in, h_in = regions(size)
    name_out, key_out, h_out = regions(64)
    shm.set_shared_memory_region(h_in, [np.frombuffer(raw, np.uint8)])
    client.register_system_shared_memory(name_in, key_in, size)
    client.register_system_shared_memory(name_out, key_out, 64)
    inp = _input(kind, "INPUT0", values.shape, "BYTES")
    inp.set_shared_memory(name_in, size)
    out = _output(kind, "OUTPUT0")
    out.set_shared_memory(name_out, 64)
    client.infer("identity_bytes", [inp], outputs=[out])
    got = shm.get_contents_as_numpy(h_out, np.object_, values.shape)
    assert got.tolist() == values.tolist()


# ---------------------------------------------------------------- registration errors


@pytest.mark.parametrize("key, says", [
    ("/../../etc/passwd", "invalid shm key"),
    ("/a/b", "invalid shm key"),
    ("/", "invalid shm key"),
    ("..", "invalid shm key"),
    ("/triton_python_backend_shm_region_x", "reserved prefix"),
    ("/inferd_test_does_not_exist", "Unable to open shared memory region"),
])
def test_register_refuses_bad_keys(client, kind, key, says):
    exc = _error(lambda: client.register_system_shared_memory("bad", key, 8))
    assert _code(kind, exc) == BAD_REQUEST[kind] and says in exc.message()


def test_register_refuses_windows_past_the_object(client, kind, regions):
    name, key, _ = regions(64)
    for offset, size in ((0, 65), (60, 8), (64, 1)):
        exc = _error(lambda: client.register_system_shared_memory(name, key, size, offset=offset))
        assert _code(kind, exc) == BAD_REQUEST[kind]
        assert f"failed to register shared memory region '{name}': invalid args" in exc.message()
        assert "past the end" in exc.message()
    exc = _error(lambda: client.register_system_shared_memory(name, key, 0))
    assert _code(kind, exc) == BAD_REQUEST[kind] and "byte_size is 0" in exc.message()


def test_register_refuses_a_name_in_use(client, kind, regions):
    name, key, _ = regions(64)
    client.register_system_shared_memory(name, key, 64)
    exc = _error(lambda: client.register_system_shared_memory(name, key, 32))
    assert _code(kind, exc) == BAD_REQUEST[kind] and f"shared memory region '{name}' already in manager" in exc.message()


def test_status_of_an_unknown_region(client, kind):
    exc = _error(lambda: client.get_system_shared_memory_status("nope"))
    assert _code(kind, exc) == NOT_FOUND[kind]
    assert "Unable to find system shared memory region: 'nope'" in exc.message()


def test_http_register_body_errors(shm_server, regions):
    import http.client

    name, key, _ = regions(64)
    for body, says in (({"byte_size": 8}, "no 'key' field"), ({"key": key}, "no 'byte_size' field"),
                       ({"key": 5, "byte_size": 8}, "'key' must be a string"),
                       ({"key": key, "byte_size": -1}, "non-negative"),
                       ({"key": key, "byte_size": 8, "offset": "x"}, "non-negative")):
        conn = http.client.HTTPConnection(shm_server.http_url)
        conn.request("POST", f"/v2/systemsharedmemory/region/{name}/register", json.dumps(body))
        answer = conn.getresponse()
        text = answer.read().decode()
        assert answer.status == 400 and says in json.loads(text)["error"], (body, text)
        conn.close()


# ---------------------------------------------------------------- inference errors


def test_unregistered_region(client, kind):
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory("not_registered", X.nbytes)
    exc = _error(lambda: client.infer("identity", [inp]))
    assert _code(kind, exc) == NOT_FOUND[kind]
    assert "Unable to find shared memory region: 'not_registered'" in exc.message()
    out = _output(kind, "OUTPUT0")
    out.set_shared_memory("not_registered", X.nbytes)
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_data_from_numpy(X)
    exc = _error(lambda: client.infer("identity", [inp], outputs=[out]))
    assert "Unable to find shared memory region: 'not_registered'" in exc.message()


def test_window_past_the_region(client, kind, regions):
    name, key, handle = regions(64)
    client.register_system_shared_memory(name, key, 48)
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory(name, X.nbytes, offset=32)  # 32 + 32 > 48
    exc = _error(lambda: client.infer("identity", [inp]))
    assert _code(kind, exc) == BAD_REQUEST[kind]
    assert f"Invalid offset + byte size for shared memory region: '{name}'" in exc.message()
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory(name, X.nbytes, offset=48)
    exc = _error(lambda: client.infer("identity", [inp]))
    assert f"Invalid offset for shared memory region: '{name}'" in exc.message()


def test_wrong_input_byte_size(client, kind, regions):
    name, key, _ = regions(64)
    client.register_system_shared_memory(name, key, 64)
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_shared_memory(name, 16)  # shape [2, 4] FP32 needs 32
    exc = _error(lambda: client.infer("identity", [inp]))
    assert _code(kind, exc) == BAD_REQUEST[kind]
    assert "input byte size mismatch for input 'INPUT0' for model 'identity'. Expected 32, got 16" in exc.message()


def test_output_region_too_small(client, kind, regions):
    name, key, _ = regions(64)
    client.register_system_shared_memory(name, key, 64)
    inp = _input(kind, "INPUT0", X.shape)
    inp.set_data_from_numpy(X)
    out = _output(kind, "OUTPUT0")
    out.set_shared_memory(name, 16)
    exc = _error(lambda: client.infer("identity", [inp], outputs=[out]))
    assert _code(kind, exc) == BAD_REQUEST[kind]
    assert ("shared memory size specified with the request for output 'OUTPUT0' (16 bytes) should be at "
            "least 32 bytes to hold the results") in exc.message()


def test_grpc_parameter_errors(shm_server, regions):
    """What tritonclient cannot send: half the parameters, wrong types, data and a region at once."""
    name, key, _ = regions(64)
    with grpc.insecure_channel(shm_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=64))

        def infer(params: dict, raw: bool = False, contents: bool = False) -> str:
            request = pb.ModelInferRequest(model_name="identity")
            tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 4])
            for k, v in params.items():
                if isinstance(v, str):
                    tensor.parameters[k].string_param = v
                else:
                    tensor.parameters[k].int64_param = v
            if raw:
                request.raw_input_contents.append(X.tobytes())
            if contents:
                tensor.contents.fp32_contents.extend([0.0] * 8)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            return info.value.details()

        assert "only valid with 'shared_memory_region'" in infer({"shared_memory_byte_size": 32}, raw=True)
        assert "only valid with 'shared_memory_region'" in infer({"shared_memory_offset": 0}, raw=True)
        assert "needs 'shared_memory_byte_size'" in infer({"shared_memory_region": name})
        assert "must be a non-negative integer" in infer({"shared_memory_region": name,
                                                          "shared_memory_byte_size": -4})
        assert "both contents and shared_memory_region" in infer(
            {"shared_memory_region": name, "shared_memory_byte_size": 32}, contents=True)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())


def test_http_output_cannot_be_binary_and_in_shared_memory(shm_server, regions):
    import http.client

    name, key, _ = regions(64)
    with httpclient.InferenceServerClient(shm_server.http_url) as c:
        c.register_system_shared_memory(name, key, 64)
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}],
                "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": name,
                                                                "shared_memory_byte_size": 32, "binary_data": True}}]}
        conn = http.client.HTTPConnection(shm_server.http_url)
        conn.request("POST", "/v2/models/identity/infer", json.dumps(body))
        answer = conn.getresponse()
        text = answer.read().decode()
        conn.close()
        c.unregister_system_shared_memory()
    assert answer.status == 400 and "can't set both 'shared_memory_region' and 'binary_data'" in text


# ---------------------------------------------------------------- unregistering a region in use


def test_unregister_while_in_flight(client, kind, regions, shm_server):
    """The request that uses the region finishes and writes its output; the region is gone for new
    requests at once, and unmapped when that request is done."""
    ms = np.array([1500], dtype=np.int32)
    name_in, key_in, h_in = regions(4)
    name_out, key_out, h_out = regions(4)
    shm.set_shared_memory_region(h_in, [ms])
    client.register_system_shared_memory(name_in, key_in, 4)
    client.register_system_shared_memory(name_out, key_out, 4)
    inp = _input(kind, "MS", [1], "INT32")
    inp.set_shared_memory(name_in, 4)
    out = _output(kind, "MS_OUT")
    out.set_shared_memory(name_out, 4)
    result: dict = {}

    def run() -> None:
        module = MODULES[kind]
        with module.InferenceServerClient(shm_server.grpc_url if kind == "grpc" else shm_server.http_url) as c:
            try:
                result["response"] = c.infer("slow", [inp], outputs=[out])
            except Exception as exc:  # noqa: BLE001 - asserted below
                result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # the request is running (it sleeps 1.5 s)
    client.unregister_system_shared_memory()
    status = client.get_system_shared_memory_status()
    assert (len(status.regions) if kind == "grpc" else len(status)) == 0
    assert _maps(shm_server, key_out), "still mapped while its request runs"
    again = _input(kind, "MS", [1], "INT32")
    again.set_shared_memory(name_in, 4)
    exc = _error(lambda: client.infer("slow", [again]))
    assert "Unable to find shared memory region" in exc.message()
    thread.join(30)
    assert "error" not in result, result.get("error")
    assert shm.get_contents_as_numpy(h_out, np.int32, [1]).tolist() == [1500]
    deadline = time.monotonic() + 5
    while (_maps(shm_server, key_in) or _maps(shm_server, key_out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _maps(shm_server, key_in) and not _maps(shm_server, key_out), "unmapped after the request"


def test_cuda_shared_memory_says_why_not(client, kind):
    exc = _error(lambda: client.get_cuda_shared_memory_status())
    assert _code(kind, exc) == ("UNIMPLEMENTED" if kind == "grpc" else "501")
    assert "CUDA" in exc.message() and "system shared memory" in exc.message()


def test_stream_infer_with_shared_memory(shm_server, regions):
    """ModelStreamInfer: the output is written in place before its response is sent."""
    import queue

    name_in, key_in, h_in = regions(X.nbytes)
    name_out, key_out, h_out = regions(X.nbytes)
    shm.set_shared_memory_region(h_in, [X * 3])
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(shm_server.grpc_url) as c:
        c.register_system_shared_memory(name_in, key_in, X.nbytes)
        c.register_system_shared_memory(name_out, key_out, X.nbytes)
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        inp = grpcclient.InferInput("INPUT0", list(X.shape), "FP32")
        inp.set_shared_memory(name_in, X.nbytes)
        out = grpcclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(name_out, X.nbytes)
        c.async_stream_infer("identity", [inp], outputs=[out], request_id="shm-stream")
        result, error = answers.get(timeout=20)
        c.stop_stream()
        c.unregister_system_shared_memory()
    assert error is None, error
    assert result.get_response().raw_output_contents == [b""]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, X.shape), X * 3)


def test_client_shared_memory_is_off_by_default(start_server, tmp_path, regions):
    """Triton's default: without --allow-client-shm=true nothing can be registered (its text);
    the extension is still listed, status answers, and unregistering all succeeds."""
    import onnx_models

    onnx_models.identity(tmp_path / "repo" / "identity" / "1" / "model.onnx", "FP32")
    (tmp_path / "repo" / "identity" / "config.pbtxt").write_text("max_batch_size: 8\n")
    proc = start_server([tmp_path / "repo"])
    name, key, _ = regions(64)
    for kind, module in MODULES.items():
        with module.InferenceServerClient(proc.grpc_url if kind == "grpc" else proc.http_url) as c:
            exc = _error(lambda: c.register_system_shared_memory(name, key, 64))
            assert _code(kind, exc) == ("UNIMPLEMENTED" if kind == "grpc" else "501")
            assert "Start the server with '--allow-client-shm=true' to enable" in exc.message()
            exc = _error(lambda: c.unregister_system_shared_memory(name))
            assert "--allow-client-shm=true" in exc.message()
            c.unregister_system_shared_memory()
            status = c.get_system_shared_memory_status()
            assert (len(status.regions) if kind == "grpc" else len(status)) == 0
            inp = _input(kind, "INPUT0", X.shape)
            inp.set_shared_memory(name, X.nbytes)
            exc = _error(lambda: c.infer("identity", [inp]))
            assert "Unable to find shared memory region" in exc.message()


def test_register_refuses_links_fifos_and_folders(client, kind):
    """A key is one shared-memory object: a symlink out of /dev/shm, a fifo or a folder is refused."""
    import os

    tag = uuid.uuid4().hex[:8]
    made = [Path(f"/dev/shm/inferd_link_{tag}"), Path(f"/dev/shm/inferd_fifo_{tag}"), Path(f"/dev/shm/inferd_dir_{tag}")]
    made[0].symlink_to("/etc/hostname")
    os.mkfifo(made[1])
    made[2].mkdir()
    try:
        for path in made:
            exc = _error(lambda: client.register_system_shared_memory("bad", "/" + path.name, 4))
            assert _code(kind, exc) == BAD_REQUEST[kind], exc.message()
            assert "Unable to open shared memory region" in exc.message()
    finally:
        made[0].unlink()
        made[1].unlink()
        made[2].rmdir()
