"""PyTorch backend: TorchScript and torch.export models served through tritonclient.grpc.

Models are built into a temporary repository by scripts/torch_models.py; one server serves
them all (module scope). GPU tests carry the ``gpu`` marker and skip without CUDA.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.cases import CASES, check
from tests.harness import ROOT, ServerProcess
from tests.test_conformance import TRANSPORTS

import torch  # noqa: E402 - a dev dependency (the CPU build): missing is a failure, not a skip
import torch_models as tm  # scripts/ is on sys.path via tests.harness

INDEXED = """
max_batch_size: 8
input [
  { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }
]
dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 300000 }
instance_group [ { kind: KIND_CPU count: 2 } ]
"""
NAMED = """
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
"""
SCALE = """
max_batch_size: 4
input [ {{ name: "INPUT__0" data_type: TYPE_{t} dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_{t} dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
BAD = {
    "bad_bytes": SCALE.format(t="STRING"),
    "bad_no_io": "max_batch_size: 4\n",
    # two inputs for forward(x), named neither after it nor by index: nothing to bind by
    "bad_names": SCALE.format(t="FP32").replace(
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]',
        'input [ { name: "WHATEVER" data_type: TYPE_FP32 dims: [ 4 ] },'
        ' { name: "OTHER" data_type: TYPE_FP32 dims: [ 4 ] } ]'),
}


def _write(repo: Path, name: str, config: str, build, filename: str = "model.pt") -> None:
    build(repo / name / "1" / filename)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch_repo")
    _write(repo, "indexed", INDEXED, tm.add_sub_indexed)
    _write(repo, "named", NAMED, tm.add_sub_named)
    for t in ("FP16", "BF16"):
        _write(repo, f"scale_{t.lower()}", SCALE.format(t=t), tm.scale)
    for name, config in BAD.items():
        _write(repo, name, config, tm.scale)
    # twins of the ONNX "simple" model for the shared conformance cases
    _write(repo, "simple_torch", (ROOT / "model_repository" / "simple_torch" / "config.pbtxt").read_text(),
           tm.add_sub_named)
    _write(repo, "simple_export", "max_batch_size: 8\n", tm.add_sub_export, "model.pt2")
    proc = ServerProcess([repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-torch.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(torch_server):
    with grpcclient.InferenceServerClient(torch_server.grpc_url) as c:
        yield c


def _inputs(arrays: dict[str, np.ndarray], datatype: str) -> list[grpcclient.InferInput]:
    out = []
    for name, array in arrays.items():
        i = grpcclient.InferInput(name, list(array.shape), datatype)
        i.set_data_from_numpy(array)
        out.append(i)
    return out


def renamed(case, model: str):
    """A conformance case of the ONNX ``simple`` model, sent to its twin ``model`` instead."""
    fail = case.fail and dataclasses.replace(
        case.fail, says=tuple(s.replace("'simple'", f"'{model}'") for s in case.fail.says))
    return dataclasses.replace(case, model=model, fail=fail)


@pytest.mark.parametrize("transport_cls", TRANSPORTS, ids=lambda t: t.name)
@pytest.mark.parametrize("model", ["simple_torch", "simple_export"])
def test_simple_conformance_cases(torch_server, model, transport_cls):
    """Every conformance case of the ONNX ``simple`` model holds for its TorchScript and
    torch.export twins, through every transport of the conformance suite."""
    transport = transport_cls(torch_server)
    failures = []
    try:
        for case in (renamed(c, model) for c in CASES if c.model == "simple"):
            if transport_cls.accepts(case):
                try:
                    check(case, transport.infer(case))
                except AssertionError as exc:
                    failures.append(f"{case.id}: {exc}")
    finally:
        transport.close()
    assert not failures, "\n".join(failures)


def test_indexed_names_bind_by_position(client):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 0.5, np.float32)
    result = client.infer("indexed", _inputs({"INPUT__0": a, "INPUT__1": b}, "FP32"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), a - b)


def test_forward_argument_names_and_dict_outputs(client):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.arange(32, 64, dtype=np.int32).reshape(2, 16)
    out = [grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("named", _inputs({"INPUT0": a, "INPUT1": b}, "INT32"), outputs=out)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_torch_export_program_autocompletes_config_and_serves(client):
    config = client.get_model_config("simple_export", as_json=True)["config"]
    assert config["platform"] == "torch_aoti" and config["backend"] == "pytorch"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_INT32", ["16"]), ("INPUT1", "TYPE_INT32", ["16"])]
    assert [o["name"] for o in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    a = np.random.default_rng(0).integers(-1000, 1000, (3, 16)).astype(np.int32)
    result = client.infer("simple_export", _inputs({"INPUT0": a, "INPUT1": a * 2}, "INT32"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 3)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), -a)


def test_dynamic_batching_gives_each_request_its_slice(client, torch_server):
    before = client.get_inference_statistics("indexed", as_json=True)["model_stats"][0]
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def send(i: int) -> None:
        try:
            with grpcclient.InferenceServerClient(torch_server.grpc_url) as c:
                a = np.full((1, 4), i, np.float32)
                b = np.arange(4, dtype=np.float32).reshape(1, 4) * i
                r = c.infer("indexed", _inputs({"INPUT__0": a, "INPUT__1": b}, "FP32"))
                results[i] = (r.as_numpy("OUTPUT__0"), r.as_numpy("OUTPUT__1"))
        except Exception as exc:  # surfaced below with the request number
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(8):
        np.testing.assert_array_equal(results[i][0], [[i + j * i for j in range(4)]])
        np.testing.assert_array_equal(results[i][1], [[i - j * i for j in range(4)]])
    after = client.get_inference_statistics("indexed", as_json=True)["model_stats"][0]
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert inferences == 8
    assert executions < 8, "the 8 concurrent requests were never batched together"


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_round_trip(client, datatype):
    dtype = np.float16 if datatype == "FP16" else ml_dtypes.bfloat16
    values = np.array([[1.0, -2.5, 0.15625, 65280.0 if datatype == "BF16" else 600.0]] * 2).astype(dtype)
    result = client.infer(f"scale_{datatype.lower()}", _inputs({"INPUT__0": values}, datatype))
    out = result.as_numpy("OUTPUT__0")
    assert out.dtype == dtype
    # doubling is exact in both formats for these values
    np.testing.assert_array_equal(out.astype(np.float32), values.astype(np.float32) * 2)


@pytest.mark.parametrize("model, words", [
    ("bad_bytes", ["TYPE_STRING", "BYTES", "python model"]),
    ("bad_no_io", ["config.pbtxt must list inputs and outputs", "TorchScript"]),
    ("bad_names", ["cannot bind inputs", "WHATEVER", "__<index>"]),
])
def test_bad_models_fail_to_load_with_a_reason(client, model, words):
    rows = [m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == model]
    assert rows and rows[0]["state"] == "UNAVAILABLE"
    for word in words:
        assert word in rows[0]["reason"], rows[0]["reason"]
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _inputs({"INPUT__0": np.zeros((1, 4), np.float32)}, "FP32"))
    assert words[0] in err.value.message()  # the request learns why the model is not there


def test_registry_reports_missing_torch_in_process(monkeypatch):
    """The registry turns 'import torch' failing into FAILED_PRECONDITION with the install hint.

    Simulated: ``sys.modules['torch'] = None`` makes ``import torch`` raise ImportError here.
    """
    from server.core.errors import ErrorCode, ServingError
    from server.repository import backends

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "backends.pytorch", raising=False)
    with pytest.raises(ServingError) as err:
        backends.find("pytorch")
    assert err.value.code == ErrorCode.FAILED_PRECONDITION
    assert "pip install 'inferd[torch]'" in err.value.message


def test_server_without_torch_serves_onnx_and_explains_pytorch(tmp_path, start_server):
    """A server whose ``import torch`` fails (simulated: a stand-in ``torch`` package that raises
    ImportError comes first on PYTHONPATH) still serves ONNX, and the PyTorch model's load error
    says how to install torch."""
    import onnx_models

    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch' (simulated)\")\n")
    repo = tmp_path / "repo"
    onnx_models.add_sub(repo / "onnx_add_sub" / "1" / "model.onnx")
    (repo / "torch_model" / "1").mkdir(parents=True)
    (repo / "torch_model" / "1" / "model.pt").write_bytes(b"never read")
    (repo / "torch_model" / "config.pbtxt").write_text(SCALE.format(t="FP32"))
    server = start_server([repo], env={"PYTHONPATH": str(tmp_path / "no_torch")})
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        r = c.infer("onnx_add_sub", _inputs({"INPUT0": a, "INPUT1": a}, "INT32"))
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 2)
        row = next(m for m in c.get_model_repository_index(as_json=True)["models"] if m["name"] == "torch_model")
    assert row["state"] == "UNAVAILABLE"
    assert "simulated" in row["reason"] and "pip install 'inferd[torch]'" in row["reason"], row["reason"]


def test_each_instance_keeps_its_thread_count(tmp_path):
    """Two instances with different intra-op sizes, each executed on its own thread, interleaved:
    each thread keeps its instance's team size although torch's default is process-wide."""
    from backends.pytorch import PyTorchBackend
    from server.core.backend import LoadContext
    from server.core.config import ModelConfig, TensorConfig

    path = tm.scale(tmp_path / "1" / "model.pt")
    x = np.ones((2, 4), np.float32)
    seen: dict[int, list[int]] = {1: [], 2: []}
    turns = [threading.Event() for _ in range(4)]

    def instance(threads: int, my_turns: list[int]) -> None:
        config = ModelConfig(name="s", max_batch_size=4, inputs=(TensorConfig("INPUT__0", "FP32", (4,)),),
                             outputs=(TensorConfig("OUTPUT__0", "FP32", (4,)),),
                             parameters={"INTRA_OP_THREAD_COUNT": str(threads)})
        backend = PyTorchBackend.load(LoadContext("s", 1, tmp_path, tmp_path / "1", path, config, "cpu",
                                                  f"s_{threads}", threads, 1))
        for turn in my_turns:
            if turn:
                turns[turn - 1].wait(30)
            np.testing.assert_array_equal(backend.execute({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"], x * 2)
            if turn >= 2:  # read after the other instance has set its own count in between
                seen[threads].append(torch.get_num_threads())
            turns[turn].set()

    workers = [threading.Thread(target=instance, args=(1, [0, 2])), threading.Thread(target=instance, args=(2, [1, 3]))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert seen == {1: [1], 2: [2]}


@pytest.mark.parametrize("cores, share, expected", [(8, 8, 7), (8, 4, 4), (2, 2, 1), (2, 1, 1), (1, 1, 1)])
def test_default_threads_leave_a_core_to_the_server(monkeypatch, cores, share, expected):
    import backends.pytorch as bp

    monkeypatch.setattr(bp.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert bp._default_threads(share) == expected


def test_close_frees_the_module(tmp_path):
    import weakref

    from backends.pytorch import PyTorchBackend
    from server.core.backend import LoadContext
    from server.core.config import ModelConfig, TensorConfig

    path = tm.mlp(tmp_path / "1" / "model.pt")
    config = ModelConfig(name="mlp", max_batch_size=8, inputs=(TensorConfig("INPUT__0", "FP32", (512,)),),
                         outputs=(TensorConfig("OUTPUT__0", "FP32", (16,)),))
    backend = PyTorchBackend.load(LoadContext("mlp", 1, tmp_path, tmp_path / "1", path, config, "cpu", "i", 0, 1))
    x = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    got = backend.execute({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    np.testing.assert_allclose(got, tm.dense_reference(tm.MLP_SIZES, tm.MLP_SEED, x), rtol=1e-4, atol=1e-4)
    module = weakref.ref(backend._module)
    backend.close()
    assert module() is None, "the module (and its weights) outlives close()"


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
def test_gpu_backend_matches_cpu_and_frees_memory(tmp_path):
    from backends.pytorch import PyTorchBackend
    from server.core.backend import LoadContext
    from server.core.config import ModelConfig, TensorConfig

    path = tm.mlp(tmp_path / "1" / "model.pt")
    config = ModelConfig(name="mlp", max_batch_size=64, inputs=(TensorConfig("INPUT__0", "FP32", (512,)),),
                         outputs=(TensorConfig("OUTPUT__0", "FP32", (16,)),))

    def load(device: str) -> PyTorchBackend:
        return PyTorchBackend.load(LoadContext("mlp", 1, tmp_path, tmp_path / "1", path, config, device,
                                               "i", 0, 1))

    x = np.random.default_rng(3).standard_normal((32, 512)).astype(np.float32)
    sizes = tm.MLP_SIZES
    weight_bytes = 4 * sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    baseline = torch.cuda.memory_allocated(0)
    gpu = load("cuda:0")
    assert torch.cuda.memory_allocated(0) - baseline >= weight_bytes  # the weights live on the GPU
    got = gpu.execute({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    np.testing.assert_allclose(got, tm.dense_reference(tm.MLP_SIZES, tm.MLP_SEED, x), rtol=1e-3, atol=2e-3)
    # cuBLAS keeps a workspace per stream after the first matmul; the weights must go at close
    before_close, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
    gpu.close()
    assert before_close - torch.cuda.memory_allocated(0) >= weight_bytes
    # and empty_cache handed the weights' blocks back to the driver
    assert reserved - torch.cuda.memory_reserved(0) >= weight_bytes // 2


@pytest.mark.gpu
def test_gpu_instances_serve_batched_requests(tmp_path, start_server):
    config = INDEXED.replace("KIND_CPU count: 2", "KIND_GPU count: 2 gpus: [ 0 ]")
    _write(tmp_path / "repo", "indexed_gpu", config, tm.add_sub_indexed)
    server = start_server([tmp_path / "repo"])
    rng = np.random.default_rng(5)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        for batch in (1, 3, 8):
            a, b = rng.standard_normal((2, batch, 4)).astype(np.float32)
            r = c.infer("indexed_gpu", _inputs({"INPUT__0": a, "INPUT__1": b}, "FP32"))
            np.testing.assert_allclose(r.as_numpy("OUTPUT__0"), a + b, rtol=1e-6)
            np.testing.assert_allclose(r.as_numpy("OUTPUT__1"), a - b, rtol=1e-6)
