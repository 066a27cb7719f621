"""The control table: the non-inference endpoints (server metadata, model metadata, model config,
statistics, repository index) as cases every transport must answer alike.

A case names an endpoint and its arguments and expects either an answer or an error (an ErrorCode
name plus substrings of the message). A transport (tests/test_control_conformance.py: gRPC stubs
and plain REST) calls the endpoint and brings the answer into one neutral form, so that a single
expectation holds both transports to the same protocol rules:

    server_metadata   {"name", "version", "extensions": sorted list}
    model_metadata    {"name", "versions", "platform", "inputs": [(name, datatype, shape)], "outputs": ...}
    model_config      the configuration as Triton renders it in JSON (proto field names, enum names,
                      64-bit integers as numbers); the cases look at the fields they name
    statistics        [(name, version, inference_count, success_count)]
    repository_index  [(name, version, state, reason)]

Expectations are written here from the test repository (tests/conftest.py ``test_models``), never
computed with server code.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES")
# every model of the test repository, each with the one version 1
MODELS = sorted(["simple", "simple_identity", "dense", "bytes_batched", "identity_dyn", "identity_fixed"]
                + [f"identity_{d.lower()}" for d in DATATYPES])
EXTENSIONS = sorted(["model_configuration", "statistics", "schedule_policy", "model_repository",
                     "binary_tensor_data", "trace"])


@dataclass(frozen=True)
class Failure:
    kind: str  # ErrorCode name as the transport reports it (REST's 400 reads INVALID_ARGUMENT)
    message: str


@dataclass(frozen=True)
class ControlCase:
    id: str
    endpoint: str  # a Transport method name
    args: dict = field(default_factory=dict)
    expect: Callable[[Any], None] | Any = None  # an exact neutral answer, or a check on it
    error: str | None = None  # expected ErrorCode name
    says: tuple[str, ...] = ()  # substrings of the error message


class Transport(abc.ABC):
    name: str

    @abc.abstractmethod
    def server_metadata(self) -> dict: ...

    @abc.abstractmethod
    def model_metadata(self, model: str, version: str = "") -> dict: ...

    @abc.abstractmethod
    def model_config(self, model: str, version: str = "") -> dict: ...

    @abc.abstractmethod
    def statistics(self, model: str = "", version: str = "") -> list[tuple]: ...

    @abc.abstractmethod
    def repository_index(self, ready: bool = False) -> list[tuple]: ...

    def close(self) -> None:
        pass


def run(transport: Transport, case: ControlCase) -> None:
    """Call the case's endpoint and hold the answer (or the Failure) to the case."""
    try:
        answer = getattr(transport, case.endpoint)(**case.args)
    except FailureRaised as raised:
        failure = raised.failure
        assert case.error is not None, f"{case.id}: unexpected error {failure}"
        assert failure.kind == case.error, f"{case.id}: {failure.kind} != {case.error}: {failure.message}"
        for text in case.says:
            assert text in failure.message, f"{case.id}: {text!r} not in {failure.message!r}"
        return
    assert case.error is None, f"{case.id}: expected {case.error}, got the answer {answer}"
    if callable(case.expect):
        case.expect(answer)
    else:
        assert answer == case.expect, f"{case.id}: {answer} != {case.expect}"


class FailureRaised(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.kind}: {failure.message}")
        self.failure = failure


# ---------------------------------------------------------------- checks


def _server_metadata(answer: dict) -> None:
    assert answer["name"] == "inferd" and answer["version"], answer
    assert answer["extensions"] == EXTENSIONS, answer


def _tensors(config_entries: list[dict]) -> list[tuple]:
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config_entries]


def _dense_config(doc: dict) -> None:
    # dense's config.pbtxt has max_batch_size and dynamic_batching only: the rest is completed
    assert (doc["name"], doc["platform"], doc["backend"]) == ("dense", "onnxruntime_onnx", "onnxruntime")
    assert doc["default_model_filename"] == "model.onnx" and doc["max_batch_size"] == 16
    assert _tensors(doc["input"]) == [("INPUT", "TYPE_FP32", [4])]
    assert _tensors(doc["output"]) == [("OUTPUT", "TYPE_FP32", [3])]
    assert doc["dynamic_batching"]["preferred_batch_size"] == [16]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert [g["kind"] for g in doc["instance_group"]] == ["KIND_CPU"]
    assert doc["version_policy"] == {"latest": {"num_versions": 1}}


def _autocompleted_config(doc: dict) -> None:
    # nothing but an instance group in config.pbtxt: Triton's auto-complete from the ONNX file
    assert doc["name"] == "identity_bytes" and doc["max_batch_size"] == 4
    assert _tensors(doc["input"]) == [("INPUT0", "TYPE_STRING", [4])]
    assert _tensors(doc["output"]) == [("OUTPUT0", "TYPE_STRING", [4])]
    assert doc["dynamic_batching"]["preferred_batch_size"] == [4]
    assert [(g["kind"], g["count"]) for g in doc["instance_group"]] == [("KIND_CPU", 1)]


def _fp32_config(doc: dict) -> None:
    # a full config.pbtxt: the scheduling fields come back as written, 64-bit values as numbers
    batching = doc["dynamic_batching"]
    assert (batching["priority_levels"], batching["default_priority_level"]) == (2, 2)
    assert batching["default_queue_policy"]["allow_timeout_override"] is True
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 0
    assert batching["max_queue_delay_microseconds"] == 0


def _stats_rows(expected: list[tuple[str, str]]) -> Callable[[list[tuple]], None]:
    def check(rows: list[tuple]) -> None:
        assert sorted((n, v) for n, v, _, _ in rows) == sorted(expected), rows
        for _, _, inferences, successes in rows:
            assert isinstance(inferences, int) and isinstance(successes, int) and 0 <= successes
    return check


_SIMPLE_META = {
    "name": "simple", "versions": ["1"], "platform": "onnxruntime_onnx",
    "inputs": [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])],
    "outputs": [("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])],
}
_INDEX = [(m, "1", "READY", "") for m in MODELS]


CONTROL_CASES: list[ControlCase] = [
    ControlCase("server-metadata", "server_metadata", expect=_server_metadata),
    # model metadata
    ControlCase("metadata", "model_metadata", {"model": "simple"}, expect=_SIMPLE_META),
    ControlCase("metadata-version", "model_metadata", {"model": "simple", "version": "1"},
                expect=_SIMPLE_META),
    ControlCase("metadata-no-batching", "model_metadata", {"model": "identity_fixed"}, expect={
        "name": "identity_fixed", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [("INPUT0", "FP32", [2, 3])], "outputs": [("OUTPUT0", "FP32", [2, 3])]}),
    ControlCase("metadata-bytes", "model_metadata", {"model": "simple_identity"}, expect={
        "name": "simple_identity", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [("INPUT0", "BYTES", [-1, 1])], "outputs": [("OUTPUT0", "BYTES", [-1, 1])]}),
    ControlCase("metadata-bf16", "model_metadata", {"model": "identity_bf16"}, expect={
        "name": "identity_bf16", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [("INPUT0", "BF16", [-1, 4])], "outputs": [("OUTPUT0", "BF16", [-1, 4])]}),
    ControlCase("metadata-unknown-model", "model_metadata", {"model": "nope"},
                error="NOT_FOUND", says=("'nope'",)),
    ControlCase("metadata-unknown-version", "model_metadata", {"model": "simple", "version": "3"},
                error="NOT_FOUND", says=("'simple'", "version 3")),
    ControlCase("metadata-bad-version", "model_metadata", {"model": "simple", "version": "one"},
                error="INVALID_ARGUMENT", says=("'one'",)),
    # model config
    ControlCase("config", "model_config", {"model": "dense"}, expect=_dense_config),
    ControlCase("config-version", "model_config", {"model": "dense", "version": "1"}, expect=_dense_config),
    ControlCase("config-autocompleted", "model_config", {"model": "identity_bytes"},
                expect=_autocompleted_config),
    ControlCase("config-scheduling", "model_config", {"model": "identity_fp32"}, expect=_fp32_config),
    ControlCase("config-unknown-model", "model_config", {"model": "nope"},
                error="NOT_FOUND", says=("'nope'",)),
    ControlCase("config-unknown-version", "model_config", {"model": "dense", "version": "2"},
                error="NOT_FOUND", says=("'dense'", "version 2")),
    # statistics
    ControlCase("stats", "statistics", {"model": "simple"}, expect=_stats_rows([("simple", "1")])),
    ControlCase("stats-version", "statistics", {"model": "simple", "version": "1"},
                expect=_stats_rows([("simple", "1")])),
    ControlCase("stats-all", "statistics", {}, expect=_stats_rows([(m, "1") for m in MODELS])),
    ControlCase("stats-unknown-model", "statistics", {"model": "nope"}, error="NOT_FOUND", says=("'nope'",)),
    ControlCase("stats-unknown-version", "statistics", {"model": "simple", "version": "9"},
                error="INVALID_ARGUMENT", says=("'simple'", "version 9")),
    # repository index
    ControlCase("index", "repository_index", {}, expect=_INDEX),
    ControlCase("index-ready", "repository_index", {"ready": True}, expect=_INDEX),
]
