"""The conformance table: inference cases every transport must answer alike, and the Transport interface.

A case names a model, its inputs (numpy values plus the protocol datatype), the outputs it asks
for and its parameters, and expects either output values or an error (an ErrorCode name plus
substrings the message must contain). A transport (tritonclient gRPC, plain gRPC stubs, later
REST JSON and REST binary) turns a case into its wire form and the answer back into a ``Reply``
or an ``Error``. Cases that need a wire trick only some transports can play (exact payload bytes,
surplus raw entries, a chosen typed field, reserved parameters the client libraries refuse) say
so through ``Case.needs``; a transport runs the cases whose needs it has.

The expected values are computed here with numpy and ``struct`` only, never with server code.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

# protocol datatype -> numpy dtype of the values a client holds (BF16 values as float32)
VALUE_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.float32), "BYTES": np.dtype(np.object_),
}
DATATYPES = tuple(VALUE_DTYPES)
# little-endian wire element types (BF16: the upper 16 bits of the float32 pattern)
_WIRE = {dt: VALUE_DTYPES[dt].newbyteorder("<") for dt in DATATYPES if dt not in ("BF16", "BYTES")}
_WIRE["BF16"] = np.dtype("<u2")


# ---------------------------------------------------------------- an independent wire codec


def encode(datatype: str, values: np.ndarray) -> bytes:
    """Values -> raw wire bytes, row-major little-endian; BYTES with 4-byte length prefixes."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values.reshape(-1))
    if datatype == "BF16":
        bits = np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16  # exact for BF16 values
        return bits.astype("<u2").tobytes()
    return np.ascontiguousarray(values, dtype=_WIRE[datatype]).tobytes()


def decode(datatype: str, shape: list[int], data: bytes) -> np.ndarray:
    """Raw wire bytes -> values of ``shape`` (the inverse of ``encode``)."""
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        items, offset = [], 0
        for _ in range(count):
            (length,) = struct.unpack_from("<I", data, offset)
            items.append(bytes(data[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        assert offset == len(data), f"{len(data) - offset} bytes after {count} BYTES elements"
        return bytes_array(items).reshape(shape)
    array = np.frombuffer(data, dtype=_WIRE[datatype])
    assert array.size == count, f"{datatype} payload of {len(data)} bytes for shape {shape}"
    if datatype == "BF16":
        array = (array.astype("<u4") << 16).view("<f4")
    return array.astype(VALUE_DTYPES[datatype]).reshape(shape)


def bytes_array(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def bf16(bits: list[int]) -> np.ndarray:
    """float32 values with exactly these BF16 bit patterns (so every conversion is lossless)."""
    return (np.array(bits, dtype="<u4") << 16).view("<f4").astype(np.float32)


# ---------------------------------------------------------------- the case model


@dataclass(frozen=True)
class In:
    """One input: protocol datatype and values; optional wire tricks for error cases."""

    name: str
    datatype: str
    data: np.ndarray
    shape: tuple[int, ...] | None = None  # declared shape when it differs from data.shape
    wire: bytes | None = None  # send exactly these payload bytes instead of encoding ``data``
    typed: str | None = None  # gRPC: send ``data`` in this typed contents field

    @property
    def declared_shape(self) -> list[int]:
        return list(self.shape if self.shape is not None else self.data.shape)


@dataclass(frozen=True)
class Out:
    name: str
    datatype: str
    data: np.ndarray


@dataclass(frozen=True)
class Fail:
    kind: str  # an ErrorCode name, e.g. "INVALID_ARGUMENT"
    says: tuple[str, ...]  # substrings the error message must contain


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    inputs: tuple[In, ...]
    expect: tuple[Out, ...] = ()  # outputs in response order (request order, or config order)
    fail: Fail | None = None
    outputs: tuple[str, ...] = ()  # requested outputs; empty = all
    version: str = ""
    request_id: str = ""
    # python values; transports pick the wire type the real clients use (protocol.md §3.5)
    parameters: Mapping[str, object] = field(default_factory=dict)
    extra_raw: tuple[bytes, ...] = ()  # gRPC: surplus raw_input_contents entries
    served_version: str = "1"
    # needs beyond those read off the inputs: "raw_payload" (tensor data travels as raw bytes,
    # so the error is about byte counts) or "typed_payload" (data travels as typed values)
    requires: frozenset[str] = frozenset()

    @property
    def needs(self) -> frozenset[str]:
        needs = set(self.requires)
        for t in self.inputs:
            if t.shape is not None:
                needs.add("shape_override")
            if t.wire is not None:
                needs.update(("wire_bytes", "raw_payload"))
            if t.typed is not None:
                needs.add("typed_field")
        if self.extra_raw:
            needs.add("extra_raw")
        if any(k.startswith("triton_") for k in self.parameters):
            needs.add("reserved_params")  # tritonclient refuses these before sending
        return frozenset(needs)


@dataclass
class Reply:
    id: str
    model_version: str
    outputs: list[Out]


@dataclass
class Error:
    kind: str
    message: str


class Transport(abc.ABC):
    """One way of sending a case to the server; constructed with the running ServerProcess."""

    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def accepts(cls, case: Case) -> bool:
        return case.needs <= cls.features

    @abc.abstractmethod
    def infer(self, case: Case) -> Reply | Error: ...

    def close(self) -> None:
        pass


def check(case: Case, result: Reply | Error) -> None:
    """Assert that ``result`` is what ``case`` expects."""
    if case.fail is not None:
        assert isinstance(result, Error), f"expected {case.fail.kind}, got a reply: {result}"
        assert result.kind == case.fail.kind, f"expected {case.fail.kind}: {result}"
        for text in case.fail.says:
            assert text in result.message, f"message lacks {text!r}: {result.message!r}"
        return
    assert isinstance(result, Reply), f"expected outputs, got {result}"
    assert result.id == case.request_id
    assert result.model_version == case.served_version
    assert [o.name for o in result.outputs] == [o.name for o in case.expect]
    for got, want in zip(result.outputs, case.expect):
        assert got.datatype == want.datatype, got.name
        assert got.data.shape == want.data.shape, got.name
        assert got.data.dtype == VALUE_DTYPES[want.datatype], got.name
        if want.datatype == "BYTES":
            assert got.data.tolist() == want.data.tolist(), got.name
        else:
            np.testing.assert_array_equal(got.data, want.data, err_msg=got.name)


# ---------------------------------------------------------------- the table

_I32 = np.int32


def _identity(datatype: str, values, case_id: str = "", model: str = "", **kw) -> Case:
    data = values if isinstance(values, np.ndarray) else np.array(values, dtype=VALUE_DTYPES[datatype])
    model = model or f"identity_{datatype.lower()}"
    return Case(case_id or f"dtype-{datatype}", model, (In("INPUT0", datatype, data),),
                expect=(Out("OUTPUT0", datatype, data),), **kw)


_DTYPE_VALUES = {
    "BOOL": [[True, False, True, True], [False, False, True, False]],
    "UINT8": [[0, 1, 127, 255], [2, 3, 254, 128]],
    "UINT16": [[0, 1, 65535, 256], [2, 3, 4, 32768]],
    "UINT32": [[0, 1, 2**32 - 1, 2**16], [2, 3, 4, 2**31]],
    "UINT64": [[0, 1, 2**64 - 1, 2**32], [2, 3, 4, 2**63]],
    "INT8": [[-128, -1, 0, 127], [1, 2, -3, 4]],
    "INT16": [[-32768, -1, 0, 32767], [1, 2, -3, 4]],
    "INT32": [[-(2**31), -1, 0, 2**31 - 1], [1, 2, -3, 4]],
    "INT64": [[-(2**63), -1, 0, 2**63 - 1], [1, 2, -3, 4]],
    "FP16": [[0.0, -0.0, 1.5, -2.25], [65504.0, 6e-08, np.inf, -np.inf]],
    "FP32": [[0.0, 1.5, -3.25, 3.4e38], [1e-45, np.inf, -np.inf, np.nan]],
    "FP64": [[0.0, 1.5, -3.25, 1.7e308], [5e-324, np.inf, -np.inf, np.nan]],
}
_BF16 = bf16([0x3F80, 0xC020, 0x3E20, 0x477F, 0x7F7F, 0x0001, 0x7F80, 0x8000]).reshape(2, 4)
_TEXT = bytes_array([b"", b"a", "h\u00e9llo".encode(), "\u65e5\u672c\u8a9e".encode(),
                     "\U0001f642".encode(), b"x" * 300, b"tab\tnl\n", b"nul\x00inside"]).reshape(2, 4)

DTYPE_CASES = [_identity(dt, v) for dt, v in _DTYPE_VALUES.items()] + [
    _identity("BF16", _BF16),
    _identity("BYTES", _TEXT),
    _identity("BYTES", _TEXT[:1, :2].reshape(2, 1), "bytes-empty-and-utf8-simple_identity",
              model="simple_identity"),
]


def _simple(a: np.ndarray, b: np.ndarray, case_id: str, outputs: tuple[str, ...] = (), **kw) -> Case:
    results = {"OUTPUT0": a + b, "OUTPUT1": a - b}
    names = outputs or ("OUTPUT0", "OUTPUT1")
    return Case(case_id, "simple", (In("INPUT0", "INT32", a), In("INPUT1", "INT32", b)),
                expect=tuple(Out(n, "INT32", results[n]) for n in names), outputs=outputs, **kw)


_A = np.arange(16, dtype=_I32).reshape(1, 16)
_B = np.full((1, 16), 3, dtype=_I32)
_RNG = np.random.default_rng(7)
_A8 = _RNG.integers(-1000, 1000, (8, 16), dtype=_I32)
_B8 = _RNG.integers(-1000, 1000, (8, 16), dtype=_I32)
_F4 = np.array([[1.0, -2.0, 3.5, 0.25]], dtype=np.float32)

SUCCESS_CASES = DTYPE_CASES + [
    _simple(_A, _B, "simple-add-sub"),
    _simple(_A8[:3], _B8[:3], "simple-batch-3"),
    _simple(_A8, _B8, "simple-batch-max-8"),
    _simple(_A, _B, "simple-only-OUTPUT1", outputs=("OUTPUT1",)),
    _simple(_A, _B, "simple-outputs-in-request-order", outputs=("OUTPUT1", "OUTPUT0")),
    _simple(_A, _B, "request-id-echoed", request_id="req-\u00e9-42"),
    _simple(_A, _B, "explicit-version", version="1"),
    _identity("FP32", _F4, "params-as-clients-send",
              parameters={"priority": 1, "timeout": 5_000_000, "tag": "blue", "flag": True,
                          "count": 7, "ratio": 0.5}),
    _identity("FP32", _F4, "params-default-priority-zero", parameters={"priority": 0}),
    # perf_analyzer sends this on every unary request (false unless it streams a decoupled model)
    _identity("FP32", _F4, "params-triton_enable_empty_final_response",
              parameters={"triton_enable_empty_final_response": False}),
    _identity("FP32", np.arange(24, dtype=np.float32).reshape(6, 4), "batch-6-of-8"),
    _identity("FP32", np.arange(10, dtype=np.float32).reshape(2, 5), "dynamic-dims-2x5",
              model="identity_dyn"),
    _identity("FP32", np.array([[7.0]], dtype=np.float32), "dynamic-dims-1x1", model="identity_dyn"),
    _identity("FP32", np.zeros((1, 0), dtype=np.float32), "zero-size-dim", model="identity_dyn"),
    _identity("FP32", np.arange(6, dtype=np.float32).reshape(2, 3), "no-batching-model",
              model="identity_fixed"),
]

_BAD = "INVALID_ARGUMENT"
_IN0 = In("INPUT0", "INT32", _A)
_IN1 = In("INPUT1", "INT32", _B)


def _err(case_id: str, model: str, inputs: tuple[In, ...], kind: str, *says: str, **kw) -> Case:
    return Case(case_id, model, inputs, fail=Fail(kind, says), **kw)


ERROR_CASES = [
    _err("unknown-model", "no_such_model", (_IN0, _IN1), "NOT_FOUND", "no_such_model"),
    _err("unknown-version", "simple", (_IN0, _IN1), "NOT_FOUND", "'simple' version 7",
         "ready versions: 1", version="7"),
    _err("non-numeric-version", "simple", (_IN0, _IN1), _BAD, "'latest'", version="latest"),
    _err("unknown-input", "simple", (_IN0, _IN1, In("INPUT9", "INT32", _A)), _BAD, "'INPUT9'",
         "'INPUT0', 'INPUT1'"),
    _err("missing-input", "simple", (_IN0,), _BAD, "missing 'INPUT1'", "expected 2 inputs"),
    _err("wrong-datatype", "simple", (In("INPUT0", "FP32", _A.astype(np.float32)), _IN1), _BAD,
         "'INPUT0'", "'FP32'", "expects 'INT32'"),
    _err("wrong-rank", "simple", (In("INPUT0", "INT32", _A[0]), In("INPUT1", "INT32", _B[0])), _BAD,
         "'INPUT0'", "[-1, 16]", "got [16]"),
    _err("wrong-rank-extra-dim", "simple",
         (In("INPUT0", "INT32", _A.reshape(1, 1, 16)), In("INPUT1", "INT32", _B.reshape(1, 1, 16))), _BAD,
         "'INPUT0'", "Expected [-1, 16], got [1, 1, 16]"),
    _err("wrong-dims", "simple", (In("INPUT0", "INT32", _A[:, :8]), In("INPUT1", "INT32", _B[:, :8])), _BAD,
         "'INPUT0'", "Expected [-1, 16], got [1, 8]"),
    _err("batch-over-max", "simple",
         (In("INPUT0", "INT32", np.zeros((9, 16), _I32)), In("INPUT1", "INT32", np.zeros((9, 16), _I32))),
         _BAD, "batch-size must be <= 8", "got 9", "'INPUT0'"),
    _err("batch-zero", "simple",
         (In("INPUT0", "INT32", np.zeros((0, 16), _I32)), In("INPUT1", "INT32", np.zeros((0, 16), _I32))),
         _BAD, "'INPUT0'", "batch size 0"),
    _err("batch-sizes-differ", "simple", (In("INPUT0", "INT32", _A8[:2]), In("INPUT1", "INT32", _B8[:3])),
         _BAD, "'INPUT1'", "batch size 3", "has 2"),
    _err("raw-byte-size-mismatch", "simple", (In("INPUT0", "INT32", _A[:, :8], shape=(1, 16)), _IN1), _BAD,
         "byte size mismatch", "'INPUT0'", "expected 64 bytes", "got 32",
         requires=frozenset({"raw_payload"})),
    _err("bool-byte-not-0-or-1", "identity_bool",
         (In("INPUT0", "BOOL", np.zeros((1, 4), bool), wire=b"\x00\x01\x02\x00"),), _BAD, "'INPUT0'", "BOOL"),
    _err("bytes-length-overruns", "simple_identity",
         (In("INPUT0", "BYTES", _TEXT[:1, :1], wire=b"\x05\x00\x00\x00ab"),), _BAD,
         "malformed BYTES", "'INPUT0'", "claims 5 bytes"),
    _err("bytes-truncated-prefix", "simple_identity",
         (In("INPUT0", "BYTES", _TEXT[:1, :1], wire=b"\x01\x00"),), _BAD, "malformed BYTES", "'INPUT0'"),
    _err("bytes-trailing-data", "simple_identity",
         (In("INPUT0", "BYTES", _TEXT[:1, :1], wire=b"\x01\x00\x00\x00a\x01\x00\x00\x00b"),), _BAD,
         "malformed BYTES", "'INPUT0'", "left after 1 elements"),
    _err("bytes-not-utf8-for-onnx-strings", "simple_identity",
         (In("INPUT0", "BYTES", bytes_array([b"\xff\xfe"]).reshape(1, 1)),), _BAD, "'INPUT0'", "not UTF-8",
         "onnxruntime's Python API", "python backend"),
    _err("surplus-raw-entry", "simple", (_IN0, _IN1), _BAD, "raw_input_contents has", "entries but only",
         extra_raw=(encode("INT32", _A),)),
    _err("typed-contents-with-raw-entry", "simple",
         (In("INPUT0", "INT32", _A, typed="int_contents"), In("INPUT1", "INT32", _B, typed="int_contents")),
         _BAD, "raw_input_contents has 1 entries", extra_raw=(encode("INT32", _A),)),
    _err("typed-wrong-field", "simple", (In("INPUT0", "INT32", _A, typed="fp32_contents"), _IN1), _BAD,
         "'INPUT0'", "fp32_contents", "expected int_contents"),
    _err("typed-fp16-has-no-field", "identity_fp16",
         (In("INPUT0", "FP16", np.ones((1, 4), np.float16), typed="fp32_contents"),), _BAD,
         "'INPUT0'", "FP16", "raw_input_contents"),
    _err("typed-element-count", "simple",
         (In("INPUT0", "INT32", _A[:, :8], shape=(1, 16), typed="int_contents"), _IN1), _BAD,
         "'INPUT0'", "8 elements", "needs 16"),
    _err("unknown-output", "simple", (_IN0, _IN1), _BAD, "'OUTPUT7'", "'OUTPUT0', 'OUTPUT1'",
         outputs=("OUTPUT7",)),
    _err("reserved-triton-parameter", "simple", (_IN0, _IN1), _BAD,
         "parameter keys starting with 'triton_' are reserved for Triton usage. Only the following keys "
         "starting with 'triton_' are allowed: triton_enable_empty_final_response",
         parameters={"triton_foo": True}),
    _err("priority-out-of-range", "identity_fp32", (In("INPUT0", "FP32", _F4),), _BAD, "priority 5",
         "1..2", parameters={"priority": 5}),
]

CASES: list[Case] = SUCCESS_CASES + ERROR_CASES
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
