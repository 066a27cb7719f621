"""The process-wide state Triton-style Python models reach through ``pb_utils``: the server's model
services (BLS calls, custom metrics) and a small thread pool that runs ``async_exec`` calls."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import numpy as np

from server.core.dtypes import NUMPY_DTYPES
from server.core.errors import ErrorCode, ServingError

_lock = threading.Lock()
_services: Any = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_BY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items() if name not in ("BF16",)}


def install(services: Any) -> None:
    """Set the services every Python model of this process uses (the same object for all)."""
    global _services
    if services is not None:
        _services = services


def services() -> Any:
    if _services is None:
        raise ServingError(ErrorCode.UNAVAILABLE, "no server is attached: BLS calls and custom metrics need "
                           "a model loaded by inferd")
    return _services


def bls_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="inferd-bls")
        return _pool


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array a model hands to another model."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _BY_DTYPE.get(array.dtype)
    if name is None:
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"numpy dtype {array.dtype} has no protocol datatype")
    return name
