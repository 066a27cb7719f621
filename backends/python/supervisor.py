"""One instance of a Python model in its own process, kept alive: started (import + initialize),
called per batch, and when the process dies (exit, signal, a hang past the execute timeout) its
in-flight requests fail with the reason, the death is logged, and it is started again after a
back-off. After ``max_deaths`` deaths within ``death_window`` seconds it is left down and reports
why (``unavailable``), until the model is loaded again."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from server.core.backend import BackendRequest, LoadContext
from server.core.errors import ErrorCode, ServingError

from . import ipc, loading
from .policy import EXECUTE_TIMEOUT, LOAD_TIMEOUT, Policy
from .process import ModelFailure, StubDied, StubProcess, StubTimeout

log = logging.getLogger(__name__)


class ProcessInstance:
    def __init__(self, ctx: LoadContext, policy: Policy) -> None:
        self.ctx = ctx
        self.policy = policy
        self.label = f"model '{ctx.model_name}' instance '{ctx.instance_name}'"
        self._input_types = {s.name: s.datatype for s in ctx.config.inputs}
        self._cond = threading.Condition()
        self._stub: StubProcess | None = None
        self._deaths: collections.deque[float] = collections.deque()
        self._closed = False
        self.unavailable: str | None = None  # why it is left down
        self._batches = 0  # tensor-path batches in flight (for the log line of a death)
        self.api = ""
        self.decoupled = False

    # -- start and restart -------------------------------------------------------------------

    def start(self) -> None:
        """The first start; a failure fails the load (FAILED_PRECONDITION with the reason)."""
        self._stub = self._spawn()

    def _spawn(self) -> StubProcess:
        stub = _spares.take(self.ctx) if not self.api else None
        if stub is not None:
            stub.adopt(self.label, self.ctx.services, self._on_death)
        else:
            stub = StubProcess(self.label, self.ctx.services, self._on_death)
        try:
            api, decoupled = stub.call("load", dataclasses.replace(self.ctx, services=None),
                                       timeout=self.policy.load_timeout)
        except StubDied:
            stub.close()
            raise loading.precondition(self.ctx.model_name, f"instance '{self.ctx.instance_name}': its Python "
                                       f"process (pid {stub.pid}) {stub.how()} while loading (importing "
                                       f"'{self.ctx.model_file.name}' and running initialize)") from None
        except StubTimeout:
            stub.kill(f"was killed after it did not finish loading within {self.policy.load_timeout:g} s "
                      f"({LOAD_TIMEOUT})")
            stub.close()
            raise loading.precondition(self.ctx.model_name, f"instance '{self.ctx.instance_name}': its Python "
                                       f"process (pid {stub.pid}) {stub.how()}") from None
        except BaseException:
            stub.close()
            raise
        if self.api and (api, decoupled) != (self.api, self.decoupled):
            stub.close()
            raise loading.precondition(self.ctx.model_name, "the model changed its API while restarting")
        self.api, self.decoupled = api, bool(decoupled)
        log.info("%s runs in process %d", self.label, stub.pid)
        return stub

    def _on_death(self, stub: StubProcess) -> None:
        """The process ended (on its reader thread)."""
        with self._cond:
            if stub is not self._stub or self._closed:
                return  # a failed start, or closed on purpose
            self._stub = None
            left_down = self._count_death()
        error = self._death_error(stub, left_down)
        failed = stub.fail_open(error)  # request path: every request still waiting for its final
        lost = f"{failed} in-flight request(s) failed" if self.api == "triton" else \
            "the batch it was executing failed" if self._batches else "no batch was in flight"
        log.error("%s: its Python process (pid %d) %s; %s; %s", self.label, stub.pid, stub.how(), lost,
                  self.unavailable if left_down else "restarting it")
        if not left_down:
            threading.Thread(target=self._restart, name=f"inferd-restart:{self.ctx.instance_name}",
                             daemon=True).start()

    def _count_death(self) -> bool:
        """Record a death (under the lock); True when the instance is now left down."""
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.policy.death_window:
            self._deaths.popleft()
        if len(self._deaths) >= self.policy.max_deaths:
            self.unavailable = (f"its Python process died {len(self._deaths)} times within "
                                f"{self.policy.death_window:g} s, so it is not restarted; load the model "
                                "again to retry")
            self._cond.notify_all()
            return True
        return False

    def _death_error(self, stub: StubProcess, left_down: bool) -> ServingError:
        then = "it is not restarted (it keeps dying)" if left_down else "the instance is restarting"
        return ServingError(ErrorCode.INTERNAL, f"{self.label}: the Python model process (pid {stub.pid}) "
                            f"{stub.how()} while this request was in flight; {then}")

    def _restart(self) -> None:
        while True:
            with self._cond:
                delay = self.policy.backoff(len(self._deaths))
                deadline = time.monotonic() + delay
                while not self._closed and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                if self._closed:
                    return
            try:
                stub = self._spawn()
            except Exception as exc:  # noqa: BLE001 - a failed start counts as a death; never ends this loop
                with self._cond:
                    left_down = self._count_death()
                reason = exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
                log.error("%s: restarting it failed: %s; %s", self.label, reason,
                          self.unavailable if left_down else "trying again")
                if left_down:
                    return
                continue
            with self._cond:
                if self._closed:
                    stub_to_close = stub
                else:
                    self._stub, stub_to_close = stub, None
                    self._cond.notify_all()
            if stub_to_close is not None:
                stub_to_close.close()
            else:
                log.info("%s: restarted (process %d)", self.label, stub.pid)
            return

    def _current(self) -> StubProcess:
        """The live process; waits while one restarts."""
        with self._cond:
            while True:
                if self._closed:
                    raise ServingError(ErrorCode.UNAVAILABLE, f"{self.label} was unloaded")
                if self.unavailable:
                    raise ServingError(ErrorCode.UNAVAILABLE, f"{self.label} is unavailable: {self.unavailable}")
                stub = self._stub
                if stub is not None and not stub.dead:
                    return stub
                self._cond.wait(1.0)

    # -- calls -------------------------------------------------------------------------------

    def _call(self, stub: StubProcess, kind: str, *args: Any, what: str = "") -> Any:
        timeout = self.policy.execute_timeout
        try:
            return stub.call(kind, *args, timeout=timeout)
        except ModelFailure as exc:  # logged on this (the instance) thread, so it carries the trace ids
            log.error("model '%s' failed to execute %s: %s", self.ctx.model_name, what, exc.message)
            raise
        except StubTimeout:
            stub.kill(f"did not finish executing within {timeout:g} s ({EXECUTE_TIMEOUT}) and was killed")
            stub.ended.wait(30)  # so that the next batch waits for the restart instead of meeting the corpse
            raise ServingError(ErrorCode.INTERNAL, f"{self.label}: the Python model process (pid {stub.pid}) "
                               f"{stub.how()}; the instance is restarting") from None
        except StubDied:
            raise self._death_error(stub, bool(self.unavailable)) from None

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        stub = self._current()
        packed = ipc.pack([(n, self._input_types.get(n, ""), a) for n, a in inputs.items()], stub.prefix + "s")
        self._batches += 1
        try:
            rows = len(next(iter(inputs.values()))) if inputs and self.ctx.config.max_batch_size > 0 else 1
            result = self._call(stub, "exec", packed, list(outputs), what=f"a batch of {rows}")
        except BaseException:
            _unlink(packed)  # the process may have died before it took the segment
            raise
        finally:
            self._batches -= 1
        return {name: array for name, _, array in ipc.unpack(result, stub.prefix)}

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        stub = self._current()
        batch, segments = [], []
        try:
            for r in requests:
                packed = ipc.pack([(n, self._input_types.get(n, ""), a) for n, a in r.inputs.items()],
                                  stub.prefix + "s")
                segments.append(packed)
                batch.append((stub.register(r.sender), r.id, packed, list(r.outputs), dict(r.parameters)))
            self._call(stub, "requests", batch, what=f"{len(requests)} requests")
        except BaseException:
            for packed in segments:  # the process may have died before it took them
                _unlink(packed)
            stub.forget(item[0] for item in batch)  # the scheduler fails what has no final yet
            raise
        if not self.decoupled:  # every response came before the reply; the scheduler closes the rest
            stub.forget(item[0] for item in batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            stub, self._stub = self._stub, None
            self._cond.notify_all()
        if stub is not None:
            stub.close()


def _unlink(packed: ipc.Packed) -> None:
    """The receiver unlinks a segment once it mapped it; this covers a receiver that never did."""
    if packed[0] is not None:
        try:
            (ipc.shm_dir() / packed[0]).unlink()
        except FileNotFoundError:
            pass


class _Spares:
    """Processes that ran ``auto_complete_config``, kept a few seconds for the model's first instance,
    which then starts in one of them instead of a new one (the in-process mode, too, completes the
    config and loads the model in one process). One not taken in time is closed."""

    KEEP_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple, StubProcess] = {}

    @staticmethod
    def _key(ctx: LoadContext) -> tuple:
        return str(ctx.model_path), ctx.version, str(ctx.model_file)

    def put(self, ctx: LoadContext, stub: StubProcess) -> None:
        key = self._key(ctx)
        with self._lock:
            old, self._waiting[key] = self._waiting.get(key), stub
        if old is not None:
            old.close()
        timer = threading.Timer(self.KEEP_SECONDS, self._expire, (key, stub))
        timer.daemon = True
        timer.start()

    def take(self, ctx: LoadContext) -> StubProcess | None:
        if ctx.instance_index != 0:
            return None
        with self._lock:
            stub = self._waiting.pop(self._key(ctx), None)
        if stub is not None and stub.dead:
            stub.close()
            return None
        return stub

    def _expire(self, key: tuple, stub: StubProcess) -> None:
        with self._lock:
            if self._waiting.get(key) is not stub:
                return
            del self._waiting[key]
        stub.close()


_spares = _Spares()


def complete_config(ctx: LoadContext, config: dict, policy: Policy) -> dict:
    """Run ``auto_complete_config`` in a process of its own (then kept for the first instance)."""
    label = f"model '{ctx.model_name}' (auto-complete)"
    stub = StubProcess(label, None, lambda _: None)
    try:
        result = stub.call("complete", dataclasses.replace(ctx, services=None), config, timeout=policy.load_timeout)
    except StubDied:
        stub.close()
        raise loading.precondition(ctx.model_name, f"its Python process (pid {stub.pid}) {stub.how()} while "
                                   "running auto_complete_config") from None
    except StubTimeout:
        stub.kill(f"did not finish auto_complete_config within {policy.load_timeout:g} s ({LOAD_TIMEOUT})")
        stub.close()
        raise loading.precondition(ctx.model_name, f"its Python process (pid {stub.pid}) {stub.how()}") from None
    except BaseException:
        stub.close()
        raise
    _spares.put(ctx, stub)
    return result
