"""Protocol datatypes <-> numpy, the BYTES length-prefix codec, and the BF16 bit-pattern convention.

Inside the server every tensor is a numpy array. BYTES tensors are object arrays of ``bytes``.
BF16 tensors are carried as ``uint16`` arrays holding the bfloat16 bit patterns (numpy has no
bfloat16), which is exactly their wire form; backends convert at their edge.
"""

from __future__ import annotations

import struct
from typing import Iterable

import numpy as np

from .errors import invalid

# protocol datatype -> numpy dtype (BF16: raw bit patterns; BYTES: object)
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(np.object_),
}

DATATYPES = tuple(NUMPY_DTYPES)

# model_config.proto DataType enum names <-> protocol strings
_CONFIG_NAMES = {dt: f"TYPE_{dt}" for dt in DATATYPES if dt != "BYTES"} | {"BYTES": "TYPE_STRING"}
_FROM_CONFIG = {v: k for k, v in _CONFIG_NAMES.items()}

_LITTLE = np.dtype("<u4")


def config_name(datatype: str) -> str:
    """'FP32' -> 'TYPE_FP32'; 'BYTES' -> 'TYPE_STRING'."""
    return _CONFIG_NAMES[datatype]


def from_config_name(name: str) -> str:
    """'TYPE_FP32' -> 'FP32'; raises KeyError for TYPE_INVALID and unknown names."""
    return _FROM_CONFIG[name]


def num_elements(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


MAX_RANK = 64  # numpy's limit; Triton's tensors have no more either in practice
_INT64_MAX = 2**63 - 1


def check_shape(name: str, shape: list[int]) -> int:
    """The element count of a request's declared ``shape``, after checking it can describe an array:
    rank at most 64, no negative dimension, and no product beyond int64 (zero dims aside, so that
    numpy can build the view). Says nothing about the data: callers compare it with what arrived."""
    if len(shape) > MAX_RANK:
        raise invalid(f"input '{name}' has a shape of rank {len(shape)}; at most {MAX_RANK} dimensions are supported")
    count, nonzero = 1, 1
    for dim in shape:
        if dim < 0:
            raise invalid(f"input '{name}' has a negative dimension in shape {list(shape)}")
        count *= dim
        if dim:
            nonzero *= dim
        if nonzero > _INT64_MAX:
            raise invalid(f"input '{name}' has shape {list(shape)} whose element count exceeds the int64 range")
    return count


def decode_raw(name: str, datatype: str, shape: list[int], data: bytes | memoryview) -> np.ndarray:
    """Raw wire bytes -> array of ``shape``; a view over ``data`` for fixed-size types (no copy)."""
    if datatype not in NUMPY_DTYPES:
        raise invalid(f"input '{name}' has unsupported datatype '{datatype}'")
    count = check_shape(name, shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, data, count).reshape(shape)
    expected = count * NUMPY_DTYPES[datatype].itemsize
    if len(data) != expected:
        raise invalid(
            f"input byte size mismatch for input '{name}': expected {expected} bytes "
            f"for shape {list(shape)} of {datatype}, got {len(data)}"
        )
    array = np.frombuffer(data, dtype=NUMPY_DTYPES[datatype])
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise invalid(f"input '{name}' of BOOL holds a byte other than 0 or 1")
    return array.reshape(shape)


def deserialize_bytes(name: str, data: bytes | memoryview, count: int) -> np.ndarray:
    """Length-prefixed (4-byte little-endian) elements -> object array of ``count`` bytes.

    ``count`` comes from a declared shape, so nothing is allocated from it: the elements are read
    first (each takes 4 bytes of length prefix at least, so the walk is bounded by the data), and
    the array is made once they all arrived."""
    view = memoryview(data)
    offset, total = 0, len(view)
    items: list[bytes] = []
    for i in range(count):
        if offset + 4 > total:
            raise invalid(
                f"malformed BYTES data for input '{name}': expected {count} elements, "
                f"the data ends after {i}"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > total:
            raise invalid(
                f"malformed BYTES data for input '{name}': element {i} claims {length} bytes "
                f"but only {total - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != total:
        raise invalid(
            f"malformed BYTES data for input '{name}': {total - offset} bytes left after {count} elements"
        )
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    return str(item).encode("utf-8")


def serialize_bytes(array: np.ndarray) -> bytes:
    """Object/bytes/str array -> length-prefixed wire form, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = _as_bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def to_bytes_array(items: Iterable[object], count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    for i, item in enumerate(items):
        out[i] = _as_bytes(item)
    return out


def encode_raw(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """Array -> its raw wire bytes (row-major, little-endian; BYTES length-prefixed): a view over the
    array when it is already contiguous and of the datatype's dtype (no copy), else a converted copy.
    The one encoding both transports use (gRPC raw_output_contents, REST binary blobs)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    array = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype])
    return array.reshape(-1).view(np.uint8).data


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)
