"""System shared memory (Triton's ``system_shared_memory`` extension): regions and their use by requests.

A client on the same host creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a
window of it, ``[offset, offset + byte_size)``, under a region name, and then names that region in
inputs and requested outputs (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``) instead of sending the bytes. The data plane owns one registry:

- inputs become numpy views over a read-only mapping (no copy; a backend cannot write into the
  client's memory through them);
- outputs are written in place, through a writable mapping made the first time a request writes to
  the region; the response then carries the output's name, datatype and shape but no data;
- a request holds the regions it uses until its final response is written (or it is cancelled).
  Unregistering a region takes it out of the name table at once (new requests cannot find it) and
  unmaps it when its last request lets go. Python's buffer protocol keeps a mapping alive while any
  array still views it, so even a backend holding on to an input cannot read freed memory.

Keys are shared-memory object names, as ``shm_open`` takes them: one file name under /dev/shm,
optionally with leading slashes (``/my_key``); anything that would leave /dev/shm is refused.
As in Triton, clients may register regions only when the server runs with
``--allow-client-shm=true`` (off by default: a region exposes whatever /dev/shm object the
server's user can open).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.core import dtypes
from server.core.errors import ErrorCode, ServingError, invalid
from server.core.types import InferRequest, Tensor

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"
_KEYS = (REGION, BYTE_SIZE, OFFSET)
# Triton's Python backend names its own regions so; a client may not register one (Triton refuses too)
RESERVED_PREFIX = "triton_python_backend_shm_region_"
# Triton's text (its --allow-client-shm defaults to false, and so does inferd's)
DISABLED = "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."
CUDA_UNSUPPORTED = ("the cuda_shared_memory extension is not supported by this server: it runs no CUDA "
                    "runtime, so it cannot open a CUDA IPC handle (use system shared memory)")


def not_found(name: str) -> ServingError:
    return ServingError(ErrorCode.NOT_FOUND, f"Unable to find shared memory region: '{name}'")


def shm_file(name: str, key: str) -> Path:
    """The /dev/shm file a key names; refuses keys that are not exactly one file name there."""
    bare = key.lstrip("/")
    bad = (not bare or "/" in bare or "\0" in key or bare in (".", "..") or len(bare) > 255)
    if bad:
        raise invalid(f"cannot register shared memory region '{name}' - invalid shm key '{key}': a key is "
                      "one shared-memory object name (e.g. '/my_region'), without further '/' or '..'")
    if bare.startswith(RESERVED_PREFIX):
        raise invalid(f"cannot register shared memory region '{name}' with key '{key}' as the key contains "
                      f"the reserved prefix '{RESERVED_PREFIX}'")
    return SHM_ROOT / bare


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"{what} must be a non-negative integer, got {value!r}")
    return value


class Region:
    """One registered window of a shared-memory object, mapped into this process."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = shm_file(name, key)
        if byte_size == 0:
            raise invalid(f"failed to register shared memory region '{name}': invalid args (byte_size is 0)")
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # never follow a link, never wait on a fifo
        try:
            try:
                fd = os.open(path, os.O_RDWR | flags)
            except PermissionError:  # readable only: inputs work, writing an output says why it cannot
                fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            raise invalid(f"Unable to open shared memory region: '{key}' ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise invalid(f"Unable to open shared memory region: '{key}' (not a shared-memory object)")
            if offset + byte_size > info.st_size:
                raise invalid(f"failed to register shared memory region '{name}': invalid args (offset {offset} "
                              f"+ byte_size {byte_size} is past the end of '{key}', which has {info.st_size} bytes)")
            # mmap offsets must be page aligned: map from the page holding ``offset``
            self._start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._base = offset - self._start
            self._length = self._base + byte_size
            self.read = mmap.mmap(fd, self._length, access=mmap.ACCESS_READ, offset=self._start)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._write: mmap.mmap | None = None
        self.users = 0
        self.retired = False

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def check(self, offset: int, byte_size: int) -> None:
        """A request's window must lie inside the region (Triton's texts)."""
        if offset >= self.byte_size:
            raise invalid(f"Invalid offset for shared memory region: '{self.name}' (offset {offset}, the region "
                          f"has {self.byte_size} bytes)")
        if offset + byte_size > self.byte_size:
            raise invalid(f"Invalid offset + byte size for shared memory region: '{self.name}' (offset {offset} "
                          f"+ byte_size {byte_size} > {self.byte_size} bytes)")

    def view(self, offset: int, byte_size: int) -> memoryview:
        start = self._base + offset
        return memoryview(self.read)[start:start + byte_size]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._write is None:
            try:
                self._write = mmap.mmap(self._fd, self._length, access=mmap.ACCESS_WRITE, offset=self._start)
            except (OSError, TypeError, ValueError) as exc:
                raise invalid(f"shared memory region '{self.name}' cannot be written (its object '{self.key}' "
                              f"is not writable by the server: {exc})") from None
        start = self._base + offset
        self._write[start:start + len(data)] = data

    def close(self) -> bool:
        """Unmap (once no request uses it); False while an array still views the mapping (it stays
        mapped then: memory is never freed under a reader)."""
        if self._fd is not None:
            os.close(self._fd)  # the mappings do not need it
            self._fd = None
        closed = True
        for m in (self.read, self._write):
            if m is not None and not m.closed:
                try:
                    m.close()
                except BufferError:
                    closed = False
        return closed


@dataclass(slots=True)
class Target:
    region: Region
    offset: int
    byte_size: int


@dataclass(slots=True)
class Binding:
    """The regions one request uses; ``release`` once its final response is written (idempotent)."""

    registry: "SharedMemoryRegistry"
    regions: list[Region] = field(default_factory=list)
    outputs: dict[str, Target] = field(default_factory=dict)
    views: list[Tensor] = field(default_factory=list)  # request inputs whose data views a region
    released: bool = False

    def write(self, tensors: list[Tensor]) -> list[Tensor]:
        """Write the outputs the request placed in shared memory; they come back without data."""
        if not self.outputs:
            return tensors
        out = []
        for tensor in tensors:
            target = self.outputs.get(tensor.name)
            if target is None:
                out.append(tensor)
                continue
            raw = dtypes.encode_raw(tensor.data, tensor.datatype)
            if len(raw) > target.byte_size:
                raise invalid(f"shared memory size specified with the request for output '{tensor.name}' "
                              f"({target.byte_size} bytes) should be at least {len(raw)} bytes to hold the results")
            target.region.write(target.offset, raw)
            out.append(Tensor(tensor.name, tensor.datatype, tensor.shape, np.empty(0, np.uint8), in_shm=True))
        return out

    def release(self) -> None:
        if not self.released:
            self.released = True
            for tensor in self.views:  # the request object may outlive this: let go of the mapping
                tensor.data = np.empty(0, tensor.data.dtype)
            self.registry._release(self.regions)


class SharedMemoryRegistry:
    """The registered system shared-memory regions, by name. Used on the event loop only."""

    def __init__(self, allow_client: bool = False) -> None:
        self.allow_client = allow_client  # --allow-client-shm
        self._regions: dict[str, Region] = {}
        self._lingering: list[Region] = []  # unregistered, unused, but an array still views them
        self._retry: asyncio.TimerHandle | None = None

    # -- the extension's RPCs ----------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.allow_client:
            raise ServingError(ErrorCode.UNIMPLEMENTED, DISABLED)
        if not name:
            raise invalid("'region name' is necessary to register system shared memory region")
        _uint(offset, "'offset'")
        _uint(byte_size, "'byte_size'")
        if name in self._regions:
            raise invalid(f"shared memory region '{name}' already in manager")
        self._regions[name] = Region(name, key, offset, byte_size)
        log.info("registered system shared memory region '%s' (key '%s', offset %d, %d bytes)",
                 name, key, offset, byte_size)

    def unregister(self, name: str = "") -> None:
        """Unregister one region (an unknown name is not an error, as in Triton) or, with no name, all.
        With client shared memory disabled, unregistering all still succeeds (nothing can be
        registered; perf_analyzer does it at start and exit); naming a region cannot."""
        if name and not self.allow_client:
            raise ServingError(ErrorCode.UNIMPLEMENTED, DISABLED)
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is None:
                continue
            region.retired = True
            if region.users == 0:
                self._unmap(region)
            else:
                log.info("shared memory region '%s' will be unmapped after %d in-flight request(s)",
                         n, region.users)

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [self._regions[n].status() for n in sorted(self._regions)]
        region = self._regions.get(name)
        if region is None:
            raise ServingError(ErrorCode.NOT_FOUND, f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def close(self) -> None:
        self.unregister()

    # -- requests ----------------------------------------------------------------------------

    def bind(self, request: InferRequest, model: str) -> Binding | None:
        """Resolve the request's shared-memory inputs (their data becomes views) and outputs.

        Returns None when the request uses no shared memory (the common case costs one scan)."""
        used = [t for t in request.inputs if REGION in t.parameters or OFFSET in t.parameters
                or BYTE_SIZE in t.parameters]
        wanted = [o for o in request.outputs if REGION in o.parameters or OFFSET in o.parameters
                  or BYTE_SIZE in o.parameters]
        if not used and not wanted:
            return None
        binding = Binding(self)
        try:
            for tensor in used:
                region, offset, size = self._window(tensor.parameters, f"input '{tensor.name}'", binding)
                if tensor.datatype != "BYTES":
                    expected = dtypes.num_elements(tensor.shape) * dtypes.NUMPY_DTYPES[tensor.datatype].itemsize
                    if size != expected:
                        raise invalid(f"input byte size mismatch for input '{tensor.name}' for model '{model}'. "
                                      f"Expected {expected}, got {size}")
                tensor.data = dtypes.decode_raw(tensor.name, tensor.datatype, list(tensor.shape),
                                                region.view(offset, size))
                binding.views.append(tensor)
            for out in wanted:
                region, offset, size = self._window(out.parameters, f"output '{out.name}'", binding)
                binding.outputs[out.name] = Target(region, offset, size)
        except BaseException:
            binding.release()
            raise
        return binding

    def _window(self, params: dict, what: str, binding: Binding) -> tuple[Region, int, int]:
        name = params.pop(REGION, None)
        size = params.pop(BYTE_SIZE, None)
        offset = params.pop(OFFSET, 0)
        if name is None:
            raise invalid(f"{what}: '{BYTE_SIZE}' and '{OFFSET}' are only valid with '{REGION}'")
        if not isinstance(name, str) or not name:
            raise invalid(f"{what}: '{REGION}' must be a region name (a string), got {name!r}")
        if size is None:
            raise invalid(f"{what}: '{REGION}' needs '{BYTE_SIZE}' too")
        size = _uint(size, f"{what}: '{BYTE_SIZE}'")
        offset = _uint(offset, f"{what}: '{OFFSET}'")
        region = self._regions.get(name)
        if region is None:
            raise not_found(name)
        region.check(offset, size)
        if region not in binding.regions:
            region.users += 1
            binding.regions.append(region)
        return region, offset, size

    def _release(self, regions: list[Region]) -> None:
        for region in regions:
            region.users -= 1
            if region.users == 0 and region.retired:
                self._unmap(region)

    def _unmap(self, region: Region, delay: float = 0.1) -> None:
        if region.close():
            log.info("shared memory region '%s' unmapped", region.name)
            return
        # a finished request's arrays may still be referenced, often from garbage that only the cycle
        # collector frees (a response's future, a model's request objects): look again shortly
        self._lingering.append(region)
        if self._retry is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the loop (tests, shutdown): freed with its last view
                return
            self._retry = loop.call_later(delay, self._sweep, delay)

    def _sweep(self, delay: float) -> None:
        self._retry = None
        gc.collect()
        lingering, self._lingering = self._lingering, []
        for region in lingering:
            if region.close():
                log.info("shared memory region '%s' unmapped (its last view was freed)", region.name)
            elif delay < 30:
                self._unmap(region, delay * 2)
            else:  # a live array views it: the mapping goes with that array
                log.warning("shared memory region '%s' stays mapped while an array still views it", region.name)
