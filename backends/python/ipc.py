"""The wire between the server and a Python model's own process: a control channel of small framed
messages over a Unix socket, and tensors in shared-memory segments (files in /dev/shm).

Control messages are tuples of plain values (str, int, float, bool, None, bytes, lists, dicts),
pickled. The server reads what a model process sends with an unpickler that refuses every class,
so a message can only ever become plain data. Tensor bytes never go through pickle: the sender
writes every tensor of one message into one segment, the receiver maps it, unlinks its name at once
and reads the arrays in place (numpy views over the mapping, freed when the last view goes).
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import logging
import mmap
import os
import pickle
import secrets
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from server.core.dtypes import NUMPY_DTYPES, deserialize_bytes, serialize_bytes
from server.core.errors import ErrorCode, ServingError

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<I")
MAX_MESSAGE = 16 << 20  # control messages are small; a longer frame is a broken peer
_ALIGN = 64
# numpy dtypes a raw tensor may have on the wire (by their str form, e.g. '<f4')
_RAW_DTYPES = {dt.str: dt for name, dt in NUMPY_DTYPES.items() if name != "BYTES"}
_counter = itertools.count()
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only
COPY_BELOW = 256 << 10  # segments up to this size are read (copied), larger ones mapped in place

# one tensor in a segment: (name, datatype, dtype str or "bytes", shape, offset, nbytes)
TensorDesc = tuple[str, str, str, list, int, int]
# a packed set of tensors: (segment name or None when every tensor is empty, [TensorDesc])
Packed = tuple["str | None", list]


class PeerGone(Exception):
    """The other side closed the channel (it exited or was killed)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused: a control message may carry plain data only ({module}.{name})")


class Channel:
    """Framed messages over a stream socket; ``send`` is thread-safe, ``recv`` has one reader."""

    def __init__(self, sock: socket.socket, *, plain_only: bool) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._plain_only = plain_only

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=5)
        try:
            with self._lock:
                self._sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as exc:
            raise PeerGone(str(exc)) from None

    def recv(self) -> tuple:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > MAX_MESSAGE:
            raise PeerGone(f"a control message of {size} bytes (at most {MAX_MESSAGE})")
        data = self._read(size)
        if self._plain_only:
            message = _PlainUnpickler(io.BytesIO(data)).load()
        else:
            message = pickle.loads(data)
        if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
            raise PeerGone(f"a malformed control message ({type(message).__name__})")
        return message

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            try:
                n = self._sock.recv_into(view[got:])
            except OSError as exc:
                raise PeerGone(str(exc)) from None
            if n == 0:
                raise PeerGone("end of stream")
            got += n
        return bytes(buffer)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


# -- shared memory -----------------------------------------------------------------------------


@functools.cache
def shm_dir() -> Path:
    """/dev/shm where there is one (memory, not disk), else the temporary folder."""
    path = Path("/dev/shm")
    return path if path.is_dir() and os.access(path, os.W_OK) else Path(tempfile.gettempdir())


@functools.cache
def _shm_root() -> str:
    return str(shm_dir()) + os.sep


def new_prefix() -> str:
    """The name prefix of every segment of one model process: the server's pid and a random tag."""
    return f"inferd-{os.getpid()}-{secrets.token_hex(4)}-"


def segments(prefix: str) -> list[Path]:
    return sorted(shm_dir().glob(prefix + "*"))


def remove_segments(prefix: str) -> int:
    """Unlink every segment left under ``prefix`` (after its process died); returns how many."""
    removed = 0
    for path in segments(prefix):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def pack(tensors: Iterable[tuple[str, str, np.ndarray]], prefix: str) -> Packed:
    """Write (name, datatype, array) tensors into one new segment; BYTES in the length-prefixed form."""
    parts: list[tuple[str, str, str, list, int, Any]] = []
    offset = 0
    for name, datatype, array in tensors:
        array = np.asarray(array)
        if array.dtype == np.object_ or array.dtype.kind in "SU":
            data: Any = serialize_bytes(array)
            kind, size = "bytes", len(data)
        else:
            data = np.ascontiguousarray(array)
            if data.dtype.str not in _RAW_DTYPES:
                raise ServingError(ErrorCode.INTERNAL, f"tensor '{name}' has numpy dtype {data.dtype}, which has "
                                   "no protocol datatype")
            kind, size = data.dtype.str, data.nbytes
        if size == 0:  # nothing to place: offset 0 is in bounds whatever the file's length
            parts.append((name, datatype, kind, [int(d) for d in array.shape], 0, data))
            continue
        parts.append((name, datatype, kind, [int(d) for d in array.shape], offset, data))
        end = offset + size
        offset += (size + _ALIGN - 1) // _ALIGN * _ALIGN
    descs = [(n, dt, k, shape, off, len(d) if k == "bytes" else d.nbytes) for n, dt, k, shape, off, d in parts]
    if offset == 0:
        return None, descs
    offset = end  # the file ends where the last tensor does
    name = f"{prefix}{next(_counter)}"
    try:
        _write(name, parts, offset)
    except OSError as exc:
        log.error("cannot write %d bytes to shared memory in %s: %s", offset, shm_dir(), exc)
        raise ServingError(ErrorCode.UNAVAILABLE, f"cannot place {offset} bytes of tensors in shared memory: "
                           f"{exc.strerror or exc} (a container may need a larger /dev/shm)") from None
    return name, descs


def _write(name: str, parts: list, size: int) -> None:
    fd = os.open(_shm_root() + name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for _, _, kind, _, off, data in parts:
            # write(2), not a mapping: the kernel fills the pages in one pass, no page fault per page
            view = memoryview(data) if kind == "bytes" else memoryview(data.reshape(-1).view(np.uint8))
            while len(view):
                written = os.pwrite(fd, view, off)
                view, off = view[written:], off + written
    except BaseException:
        os.unlink(_shm_root() + name)
        raise
    finally:
        os.close(fd)


def unpack(packed: Packed, prefix: str) -> list[tuple[str, str, np.ndarray]]:
    """Map a segment the peer wrote and unlink its name; (name, datatype, array) views over it.

    Every field is checked: the segment must carry ``prefix`` (a peer cannot make this side open
    another file), each tensor must lie inside it and its size must match its shape."""
    seg, descs = packed
    mapped: Any = None
    size = 0
    if seg is not None:
        if not isinstance(seg, str) or not seg.startswith(prefix) or "/" in seg or seg in (".", ".."):
            raise ServingError(ErrorCode.INTERNAL, f"refused shared-memory segment name {seg!r}")
        path = _shm_root() + seg
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size <= COPY_BELOW:  # small: one read is cheaper than a mapping (and its unmapping)
                mapped = os.pread(fd, size, 0)
                size = len(mapped)
            else:  # MAP_POPULATE: every page mapped in one call instead of one fault per page
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
            os.unlink(path)
    out = []
    for name, datatype, kind, shape, offset, nbytes in descs:
        if not all(isinstance(d, int) and d >= 0 for d in shape) or offset < 0 or nbytes < 0 \
                or offset + nbytes > size:
            raise ServingError(ErrorCode.INTERNAL, f"tensor '{name}': its place in shared memory is out of bounds")
        count = math.prod(shape)
        if kind == "bytes":
            view = memoryview(mapped)[offset:offset + nbytes] if nbytes else b""
            array = deserialize_bytes(name, view, count).reshape(shape)
            del view
        else:
            dtype = _RAW_DTYPES.get(kind)
            if dtype is None or count * dtype.itemsize != nbytes:
                raise ServingError(ErrorCode.INTERNAL, f"tensor '{name}': {nbytes} bytes do not hold shape {shape} "
                                   f"of {kind}")
            array = np.frombuffer(mapped, dtype, count, offset).reshape(shape) if count else np.empty(shape, dtype)
            array.flags.writeable = False  # as in the server process: the request's bytes, read-only
        out.append((name, datatype, array))
    return out


def error_tuple(error: ServingError) -> tuple[str, str]:
    return error.code.name, error.message


def error_from(pair: Any) -> ServingError:
    code, message = pair
    try:
        return ServingError(ErrorCode[code], str(message))
    except KeyError:
        return ServingError(ErrorCode.INTERNAL, str(message))
