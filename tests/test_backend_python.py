"""Python backend: model.py models (the documented example included) served through tritonclient.grpc."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.cases import CASES, check
from tests.harness import ROOT, ServerProcess
from tests.test_conformance import TRANSPORTS

FP32_IO = """
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# the ONNX "simple" model's twin, for the shared conformance cases
SIMPLE = (ROOT / "model_repository" / "simple" / "config.pbtxt").read_text().replace(
    'name: "simple"', 'name: "simple_python"').replace('platform: "onnxruntime_onnx"', 'backend: "python"')
SIMPLE_PY = """
class TritonPythonModel:
    def execute(self, inputs):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
"""
MODELS = {
    # fails its batch on negative input, serves everything else
    "faulty": (FP32_IO, """
import numpy as np
class TritonPythonModel:
    def execute(self, inputs):
        x = inputs["X"]
        if (x < 0).any():
            raise ValueError(f"negative input: {x.min()}")
        return {"Y": x * 2}
"""),
    # the class may be called Model; a float64 result is cast to the configured FP32
    "plain_model": (FP32_IO, """
import numpy as np
class Model:
    def initialize(self, config):
        self.offset = float(config["parameters"]["offset"]["string_value"])
        self.info = (config["model_name"], config["model_version"], config["device"])
    def execute(self, inputs):
        return {"Y": inputs["X"].astype(np.float64) + self.offset}
"""),
    # initialize's config: Triton's JSON field names plus where and what was loaded
    "echo_config": (FP32_IO.replace("output [", 'output [ { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] },'), """
import json
import numpy as np
class TritonPythonModel:
    def initialize(self, config):
        self.text = json.dumps({k: config[k] for k in (
            "name", "max_batch_size", "model_name", "model_version", "model_repository", "device")}
            | {"inputs": [i["name"] + ":" + i["data_type"] for i in config["input"]]})
    def execute(self, inputs):
        n = len(inputs["X"])
        return {"INFO": np.array([[self.text]] * n, dtype=object), "Y": inputs["X"]}
"""),
    "bad_return": (FP32_IO, """
class TritonPythonModel:
    def execute(self, inputs):
        return [inputs["X"]]
"""),
    "exits": (FP32_IO, """
import sys
class TritonPythonModel:
    def execute(self, inputs):
        sys.exit(3)
"""),
    "no_class": (FP32_IO, "x = 1\n"),
    "simple_python": (SIMPLE, SIMPLE_PY),
    "init_fails": (FP32_IO, """
class TritonPythonModel:
    def initialize(self, config):
        raise RuntimeError("weights file missing")
    def execute(self, inputs):
        return {}
"""),
    "no_io": ('backend: "python"\n', "class TritonPythonModel:\n    def execute(self, inputs):\n        return {}\n"),
    # BYTES are bytes, UTF-8 or not: each element comes back reversed, plus its length
    "bytes_reverse": ("""
backend: "python"
max_batch_size: 8
input [ { name: "B" data_type: TYPE_STRING dims: [ 3 ] } ]
output [
  { name: "REVERSED" data_type: TYPE_STRING dims: [ 3 ] },
  { name: "SIZE" data_type: TYPE_INT32 dims: [ 3 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
""", """
import numpy as np
class TritonPythonModel:
    def execute(self, inputs):
        b = inputs["B"]
        assert all(type(v) is bytes for v in b.reshape(-1)), [type(v) for v in b.reshape(-1)]
        reversed_ = np.array([v[::-1] for v in b.reshape(-1)], dtype=object).reshape(b.shape)
        return {"REVERSED": reversed_, "SIZE": np.vectorize(len, otypes=[np.int32])(b)}
"""),
}
# two versions of one model, each with its own module-level state
VERSIONED = """
VERSION_CONSTANT = {v}
class TritonPythonModel:
    def execute(self, inputs):
        return {{"Y": inputs["X"] + VERSION_CONSTANT}}
"""


@pytest.fixture(scope="module")
def python_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("python_repo")
    shutil.copytree(ROOT / "model_repository" / "preprocess_text", repo / "preprocess_text")
    for name, (config, code) in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(code)
        extra = 'parameters { key: "offset" value: { string_value: "0.5" } }\n' if name == "plain_model" else ""
        (repo / name / "config.pbtxt").write_text(config + extra)
    for v in (1, 2):
        (repo / "versioned" / str(v)).mkdir(parents=True)
        (repo / "versioned" / str(v) / "model.py").write_text(VERSIONED.format(v=v * 100))
    (repo / "versioned" / "config.pbtxt").write_text(FP32_IO + "version_policy: { all: { } }\n")
    proc = ServerProcess([repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-python.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(python_server):
    with grpcclient.InferenceServerClient(python_server.grpc_url) as c:
        yield c


def _x(values) -> list[grpcclient.InferInput]:
    array = np.asarray(values, dtype=np.float32)
    i = grpcclient.InferInput("X", list(array.shape), "FP32")
    i.set_data_from_numpy(array)
    return [i]


def _text(texts: list[bytes]) -> list[grpcclient.InferInput]:
    array = np.array([[t] for t in texts], dtype=np.object_)
    i = grpcclient.InferInput("TEXT", list(array.shape), "BYTES")
    i.set_data_from_numpy(array)
    return [i]


def _expected_ids(text: bytes, width: int = 8, vocab: int = 30000) -> tuple[list[int], int]:
    words = re.findall(r"\w+", text.decode().lower())
    ids = [zlib.crc32(w.encode()) % vocab + 1 for w in words[:width]]
    return ids + [0] * (width - len(ids)), len(words)


@pytest.mark.parametrize("transport_cls", TRANSPORTS, ids=lambda t: t.name)
def test_simple_conformance_cases(python_server, transport_cls):
    """Every conformance case of the ONNX ``simple`` model holds for its Python-backend twin."""
    transport = transport_cls(python_server)
    failures = []
    try:
        for case in CASES:
            if case.model != "simple" or not transport_cls.accepts(case):
                continue
            fail = case.fail and dataclasses.replace(
                case.fail, says=tuple(s.replace("'simple'", "'simple_python'") for s in case.fail.says))
            case = dataclasses.replace(case, model="simple_python", fail=fail)
            try:
                check(case, transport.infer(case))
            except AssertionError as exc:
                failures.append(f"{case.id}: {exc}")
    finally:
        transport.close()
    assert not failures, "\n".join(failures)


def test_documented_example_serves_batches(client):
    texts = [b"Hello, World!", b"The quick brown fox jumps over the lazy dog again today", b""]
    result = client.infer("preprocess_text", _text(texts))
    ids, lengths = result.as_numpy("IDS"), result.as_numpy("LENGTH")
    assert ids.dtype == np.int64 and ids.shape == (3, 8)
    for row, text in enumerate(texts):
        expected, count = _expected_ids(text)
        assert ids[row].tolist() == expected
        assert lengths[row, 0] == count


def test_concurrent_requests_each_get_their_own_rows(client, python_server):
    texts = [f"request number {i} ".encode() + b"word " * i for i in range(12)]
    results: dict[int, tuple] = {}
    errors: list[Exception] = []

    def send(i: int) -> None:
        try:
            with grpcclient.InferenceServerClient(python_server.grpc_url) as c:
                r = c.infer("preprocess_text", _text([texts[i]]))
                results[i] = (r.as_numpy("IDS")[0].tolist(), int(r.as_numpy("LENGTH")[0, 0]))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, text in enumerate(texts):
        assert results[i] == tuple(_expected_ids(text)), i


def test_the_docs_show_the_tested_example():
    doc = (ROOT / "docs" / "backends.md").read_text()
    code = (ROOT / "model_repository" / "preprocess_text" / "1" / "model.py").read_text()
    assert code.strip() in doc, "docs/backends.md must quote model_repository/preprocess_text/1/model.py"


def test_user_exception_fails_only_that_request_with_internal(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("faulty", _x([[1, -4, 2]]))
    assert err.value.status() == "StatusCode.INTERNAL"
    assert "ValueError: negative input: -4.0" in err.value.message()
    result = client.infer("faulty", _x([[1, 2, 3]]))  # the model and the server keep serving
    np.testing.assert_array_equal(result.as_numpy("Y"), [[2, 4, 6]])
    assert client.is_model_ready("faulty")


def test_sys_exit_in_user_code_is_a_failed_request(client):
    for _ in range(2):  # the instance thread survives it
        with pytest.raises(InferenceServerException) as err:
            client.infer("exits", _x([[1, 2, 3]]))
        assert err.value.status() == "StatusCode.INTERNAL"
        assert "SystemExit" in err.value.message()
    assert client.is_server_live()


def test_model_class_initialize_config_and_cast(client):
    result = client.infer("plain_model", _x([[1, 2, 3]]))
    y = result.as_numpy("Y")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[1.5, 2.5, 3.5]])


def test_initialize_gets_the_config_and_load_facts(client, python_server):
    out = [grpcclient.InferRequestedOutput("INFO")]
    info = json.loads(client.infer("echo_config", _x([[1, 2, 3]]), outputs=out).as_numpy("INFO")[0, 0])
    assert info["name"] == info["model_name"] == "echo_config"
    assert info["max_batch_size"] == 8 and info["model_version"] == "1" and info["device"] == "cpu"
    assert info["inputs"] == ["X:TYPE_FP32"]
    assert info["model_repository"].endswith("/echo_config")


def test_bad_return_value_is_internal(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("bad_return", _x([[1, 2, 3]]))
    assert err.value.status() == "StatusCode.INTERNAL"
    assert "must return a dict" in err.value.message()


def test_versions_load_in_separate_modules(client):
    for version in ("1", "2"):
        result = client.infer("versioned", _x([[1, 2, 3]]), model_version=version)
        np.testing.assert_array_equal(result.as_numpy("Y"), np.array([[1, 2, 3]]) + int(version) * 100)


@pytest.mark.parametrize("model, words", [
    ("no_class", ["no class named TritonPythonModel or Model"]),
    ("init_fails", ["initialize raised RuntimeError: weights file missing"]),
    ("no_io", ["must list its inputs and outputs"]),
])
def test_bad_models_report_why(client, model, words):
    rows = [m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == model]
    assert rows and rows[0]["state"] == "UNAVAILABLE"
    for word in words:
        assert word in rows[0]["reason"], rows[0]["reason"]


# bytes that are not UTF-8 (a lone continuation byte, an invalid start byte, NUL, a truncated sequence)
NOT_UTF8 = [b"\xff\xfe\x00\x80", b"\xc3\x28", b"", b"ok\xe2\x82"]


def test_bytes_that_are_not_utf8_reach_the_model_unchanged(client, python_server):
    import tritonclient.http as httpclient

    data = np.array([NOT_UTF8[:3], NOT_UTF8[1:]], dtype=np.object_)
    expected = np.array([[v[::-1] for v in row] for row in data.tolist()], dtype=np.object_)
    sizes = [[len(v) for v in row] for row in data.tolist()]
    item = grpcclient.InferInput("B", [2, 3], "BYTES")
    item.set_data_from_numpy(data)
    result = client.infer("bytes_reverse", [item])
    assert result.as_numpy("REVERSED").tolist() == expected.tolist()
    assert result.as_numpy("SIZE").tolist() == sizes
    with httpclient.InferenceServerClient(python_server.http_url) as http:
        item = httpclient.InferInput("B", [2, 3], "BYTES")
        item.set_data_from_numpy(data, binary_data=True)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("REVERSED", "SIZE")]
        result = http.infer("bytes_reverse", [item], outputs=outputs)
        assert result.as_numpy("REVERSED").tolist() == expected.tolist()
        assert result.as_numpy("SIZE").tolist() == sizes
