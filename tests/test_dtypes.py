"""server/core/dtypes.py: the BYTES codec, BF16 conversion, raw decode/encode and their errors."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest

from server.core import dtypes
from server.core.errors import ErrorCode, ServingError


def _objects(items) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


# ---------------------------------------------------------------- BYTES


def test_bytes_round_trip():
    items = [b"", b"a", "h\u00e9llo \u65e5\u672c".encode(), b"\x00\xff\x01", b"z" * 70000]
    wire = dtypes.serialize_bytes(_objects(items).reshape(5, 1))
    # the wire form is exactly: 4-byte little-endian length, then the bytes, element by element
    assert wire == b"".join(struct.pack("<I", len(i)) + i for i in items)
    back = dtypes.deserialize_bytes("x", wire, len(items))
    assert back.dtype == np.object_ and back.tolist() == items
    assert dtypes.decode_raw("x", "BYTES", [5, 1], wire).shape == (5, 1)


def test_bytes_from_str_and_empty_tensor():
    wire = dtypes.serialize_bytes(np.array(["\u00e9", "b"], dtype=object))
    assert wire == b"\x02\x00\x00\x00\xc3\xa9\x01\x00\x00\x00b"
    assert dtypes.to_bytes_array(["\u00e9", b"b"], 2).tolist() == ["\u00e9".encode(), b"b"]
    assert dtypes.serialize_bytes(np.empty((0, 3), dtype=object)) == b""
    assert dtypes.decode_raw("x", "BYTES", [0, 3], b"").shape == (0, 3)


@pytest.mark.parametrize("wire, count, says", [
    (b"\x01\x00", 1, "ends after 0"),  # a length prefix cut short
    (b"\x05\x00\x00\x00ab", 1, "element 0 claims 5 bytes but only 2 remain"),
    (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 1, "5 bytes left after 1 elements"),
    (b"\x01\x00\x00\x00a", 2, "expected 2 elements, the data ends after 1"),
    (b"", 1, "ends after 0"),
])
def test_malformed_bytes_name_the_input(wire, count, says):
    with pytest.raises(ServingError) as info:
        dtypes.decode_raw("TEXT", "BYTES", [count], wire)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "malformed BYTES data for input 'TEXT'" in info.value.message and says in info.value.message


# ---------------------------------------------------------------- BF16


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32: the pattern is the float32's upper half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_bf16_round_trip_of_every_non_nan_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    values = _bf16_to_float32(bits)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(dtypes.float32_to_bf16(values)[finite], bits[finite])
    # and it agrees with ml_dtypes (what tritonclient uses) on the value of each pattern
    np.testing.assert_array_equal(values[finite], bits.view(ml_dtypes.bfloat16).astype(np.float32)[finite])


def test_float32_to_bf16_rounds_to_nearest_even():
    one = np.float32(1.0)
    halfway_down = np.float32(1 + 2**-8)  # between 0x3F80 and 0x3F81: ties to even 0x3F80
    halfway_up = np.float32(1 + 3 * 2**-8)  # between 0x3F81 and 0x3F82: ties to even 0x3F82
    above = np.float32(1 + 2**-8 + 2**-20)
    got = dtypes.float32_to_bf16(np.array([one, halfway_down, halfway_up, above, -2.5, np.inf, -0.0]))
    assert got.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0x8000]
    nan = dtypes.float32_to_bf16(np.array([np.nan], dtype=np.float32))
    assert np.isnan(_bf16_to_float32(nan))[0]
    rng = np.random.default_rng(1)
    sample = (rng.standard_normal(10000) * 1e3).astype(np.float32)
    reference = sample.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(dtypes.float32_to_bf16(sample), reference)


# ---------------------------------------------------------------- raw decode / encode


@pytest.mark.parametrize("datatype", [d for d in dtypes.DATATYPES if d != "BYTES"])
def test_raw_round_trip_every_fixed_size_type(datatype):
    dtype = dtypes.NUMPY_DTYPES[datatype]
    values = (np.arange(6) % 2).astype(dtype) if datatype == "BOOL" else np.arange(6).astype(dtype)
    wire = dtypes.encode_raw(values.reshape(2, 3), datatype)
    assert wire == values.astype(dtype.newbyteorder("<")).tobytes()  # row-major little-endian
    assert len(wire) == 6 * dtype.itemsize
    back = dtypes.decode_raw("x", datatype, [2, 3], wire)
    assert back.shape == (2, 3) and back.dtype == dtype
    np.testing.assert_array_equal(back.reshape(-1), values)


def test_decode_raw_is_a_view_without_copy():
    buffer = bytearray(np.arange(4, dtype="<f4").tobytes())
    array = dtypes.decode_raw("x", "FP32", [2, 2], memoryview(buffer))
    buffer[0:4] = np.float32(9).tobytes()
    assert array[0, 0] == 9.0


@pytest.mark.parametrize("datatype, shape, data, says", [
    ("FP32", [2, 2], b"\x00" * 12,
     "input byte size mismatch for input 'IN': expected 16 bytes for shape [2, 2] of FP32, got 12"),
    ("INT64", [1], b"\x00" * 9, "expected 8 bytes"),
    ("FP16", [0, 4], b"\x00\x00", "expected 0 bytes"),
    ("FP32", [-1, 2], b"", "negative dimension"),
    ("INT128", [1], b"\x00", "unsupported datatype 'INT128'"),
    ("BOOL", [2], b"\x01\x07", "BOOL holds a byte other than 0 or 1"),
])
def test_decode_raw_errors_name_the_input(datatype, shape, data, says):
    with pytest.raises(ServingError) as info:
        dtypes.decode_raw("IN", datatype, shape, data)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "'IN'" in info.value.message and says in info.value.message


def test_datatype_names():
    assert dtypes.config_name("BYTES") == "TYPE_STRING" and dtypes.from_config_name("TYPE_STRING") == "BYTES"
    assert dtypes.config_name("BF16") == "TYPE_BF16" and dtypes.from_config_name("TYPE_FP16") == "FP16"
    with pytest.raises(KeyError):
        dtypes.from_config_name("TYPE_INVALID")
