"""The server's side of one model process: starting it, calling it, answering its questions, and
noticing when it is gone (exit, signal, or killed for a hang).

The process is started with ``subprocess`` (exec of a fresh interpreter, never a fork of the threaded
server) in a session of its own, so a terminal's Ctrl-C reaches only the server, which then closes
its models in order. A reader thread receives replies, responses and questions; questions that
block (BLS calls) run on a small pool so the reader keeps reading.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor

from . import ipc

log = logging.getLogger(__name__)

# the folder that holds the ``backends`` package, so the child imports the same code
_ROOT = str(Path(__file__).resolve().parents[2])
_METRIC_OPS = ("increment", "set", "observe", "value")


class StubDied(Exception):
    """The model process ended while a call was waiting for it."""


class StubTimeout(Exception):
    """The model process did not answer within the time allowed."""


class ModelFailure(ServingError):
    """The model's code raised while executing (its process logged the traceback)."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


class _Call:
    __slots__ = ("event", "ok", "payload", "dead")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.payload: Any = None
        self.dead = False


class StubProcess:
    def __init__(self, label: str, services: Any, on_death: Callable[["StubProcess"], None]) -> None:
        self.label = label
        self.prefix = ipc.new_prefix()
        self._services = services
        self._on_death = on_death
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self.senders: dict[int, Any] = {}  # request key -> the server's ResponseSender (sink)
        self._families: dict[int, Any] = {}
        self._metrics: dict[int, Any] = {}
        self._streams: dict[int, threading.Event] = {}  # BLS stream ask id -> cancel flag
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.dead = False
        self.ended = threading.Event()  # set once its end was handled (requests failed, restart decided)
        self.kill_reason = ""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backends.python.stub", str(theirs.fileno()), self.prefix,
                 str(logging.getLogger().getEffectiveLevel())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise ServingError(ErrorCode.FAILED_PRECONDITION,
                               f"{label}: cannot start a Python process ({exc})") from exc
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.channel = ipc.Channel(ours, plain_only=True)
        self._reader = threading.Thread(target=self._read, name=f"inferd-stub-reader:{self.pid}", daemon=True)
        self._reader.start()

    def adopt(self, label: str, services: Any, on_death: Callable[["StubProcess"], None]) -> None:
        """Hand a process that ran auto_complete_config over to the instance that will serve in it."""
        self.label, self._services, self._on_death = label, services, on_death

    # -- calls into the process --------------------------------------------------------------

    def call(self, kind: str, *args: Any, timeout: float | None = None) -> Any:
        """Ask the process to do ``kind``; its result, or the ServingError it reported.

        Raises StubDied when it ends meanwhile and StubTimeout after ``timeout`` seconds."""
        call = _Call()
        call_id = next(self._ids)
        with self._lock:
            if self.dead:
                raise StubDied()
            self._calls[call_id] = call
        try:
            self.channel.send((kind, call_id, *args))
        except ipc.PeerGone:
            timeout = 10.0  # the reader is about to see the end; wait for it to say so
        if not call.event.wait(timeout):
            with self._lock:
                self._calls.pop(call_id, None)
            if self.dead or call.dead:
                raise StubDied()
            raise StubTimeout()
        if call.dead:
            raise StubDied()
        if not call.ok:
            error = ipc.error_from(call.payload[:2])
            if len(call.payload) > 2:
                raise ModelFailure(error.code, error.message)
            raise error
        return call.payload

    def register(self, sender: Any) -> int:
        """A request's sender, addressed by a key in messages; a cancel in the server is passed on."""
        key = next(self._ids)
        self.senders[key] = sender
        sender.on_cancel(lambda: self._cancel(key))
        return key

    def forget(self, keys: Iterable[int]) -> None:
        """Stop routing responses to these requests (the scheduler answers them from here on)."""
        for key in keys:
            self.senders.pop(key, None)

    def _cancel(self, key: int) -> None:
        if key in self.senders and not self.dead:
            try:
                self.channel.send(("cancel", key))
            except ipc.PeerGone:
                pass

    def how(self) -> str:
        """How the process ended, in words."""
        return self.kill_reason or describe_exit(self.proc.returncode)

    def kill(self, reason: str) -> None:
        if not self.kill_reason:
            self.kill_reason = reason
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self, timeout: float = 30.0) -> None:
        """Let the model finalize, then make sure the process is gone and its segments removed."""
        if not self.dead:
            try:
                self.call("close", timeout=timeout)
            except (StubDied, StubTimeout, ServingError) as exc:
                log.warning("%s: finalize did not complete cleanly (%s)", self.label, type(exc).__name__)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill("was killed after it did not exit when closed")
            self.proc.wait()
        self.channel.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(10)
        ipc.remove_segments(self.prefix)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the reader --------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except ipc.PeerGone:
                break
            except Exception as exc:  # noqa: BLE001 - an undecodable message: the process is broken
                self.kill(f"was killed after sending a malformed control message ({exc})")
                break
            try:
                self._dispatch(message)
            except Exception as exc:  # noqa: BLE001
                log.exception("%s: a message from the model process could not be handled", self.label)
                self.kill(f"was killed after a protocol error ({type(exc).__name__}: {exc})")
                break
        self._ended()

    def _ended(self) -> None:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # it closed the channel but lives on: end it
            self.kill("closed its control channel and was killed")
            self.proc.wait()
        with self._lock:
            self.dead = True
            calls, self._calls = self._calls, {}
        for flag in list(self._streams.values()):
            flag.set()
        ipc.remove_segments(self.prefix)
        try:
            self._on_death(self)  # fails the open requests, decides about a restart
        finally:
            self.ended.set()
            for call in calls.values():
                call.dead = True
                call.event.set()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "reply":
            _, call_id, ok, payload = message
            with self._lock:
                call = self._calls.pop(call_id, None)
            if call is not None:
                call.ok, call.payload = bool(ok), payload
                call.event.set()
        elif kind == "send":
            self._response(*message[1:])
        elif kind == "ask":
            _, ask_id, what, args = message
            if what == "stream":
                self._streams[ask_id] = threading.Event()
            self._pool_run(self._answer, ask_id, what, args)
        elif kind == "ask_cancel":
            flag = self._streams.get(message[1])
            if flag is not None:
                flag.set()
        elif kind == "log":
            _, level, name, text = message
            logging.getLogger(str(name)).log(int(level), "%s", text)
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _response(self, key: int, packed: Any, final: bool, error: Any, parameters: Any) -> None:
        sender = self.senders.pop(key, None) if final else self.senders.get(key)
        outputs = {name: array for name, _, array in ipc.unpack(packed, self.prefix)} if packed else None
        if sender is None:
            return  # already failed (its process was replaced) or never known
        try:
            sender.send(outputs, final=bool(final), error=ipc.error_from(error) if error else None,
                        parameters=dict(parameters) if parameters else None)
        except ServingError as exc:
            log.warning("%s: a response was refused: %s", self.label, exc.message)

    def fail_open(self, error: ServingError) -> int:
        """Fail every request that still waits for its final response; returns how many."""
        senders, self.senders = self.senders, {}
        failed = 0
        for sender in senders.values():
            try:
                sender.send(error=error, final=True)
                failed += 1
            except ServingError:
                pass  # it had its final already
        return failed

    # -- the model's questions ---------------------------------------------------------------

    def _pool_run(self, fn: Callable, *args: Any) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="inferd-stub-ask")
        self._pool.submit(fn, *args)

    def _answer(self, ask_id: int, what: str, args: tuple) -> None:
        try:
            if self._services is None:
                raise ServingError(ErrorCode.UNAVAILABLE, "no server is attached: BLS calls and custom metrics "
                                   "need a model loaded by inferd")
            if what == "stream":
                self._stream(ask_id, *args)
                return
            payload = self._question(what, args)
            self._tell(("answer", ask_id, True, payload))
        except ServingError as exc:
            self._tell(("answer", ask_id, False, ipc.error_tuple(exc)))
        except Exception as exc:  # noqa: BLE001 - reported to the model as its call's error
            self._tell(("answer", ask_id, False, ("INTERNAL", f"{type(exc).__name__}: {exc}")))
        finally:
            self._streams.pop(ask_id, None)

    def _question(self, what: str, args: tuple) -> Any:
        services = self._services
        if what == "infer":
            desc, timeout = args
            return self._response_desc(services.infer(self._request(desc), timeout))
        if what == "family":
            name, description, kind = args
            family_id = next(self._ids)
            self._families[family_id] = services.metric_family(str(name), str(description), str(kind))
            return family_id
        if what == "metric":
            family_id, labels, buckets = args
            family = self._families.get(family_id)
            if family is None:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, "unknown metric family")
            metric_id = next(self._ids)
            self._metrics[metric_id] = family.metric(dict(labels), buckets)
            return metric_id
        if what == "metric_op":
            metric_id, op, value = args
            metric = self._metrics.get(metric_id)
            if metric is None or op not in _METRIC_OPS:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"unknown metric or operation {op!r}")
            return metric.value() if op == "value" else getattr(metric, op)(float(value))
        if what == "ready":
            name, version = args
            return bool(services.model_ready(str(name), str(version)))
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"unknown question {what!r}")

    def _stream(self, ask_id: int, desc: tuple, timeout: float | None) -> None:
        cancelled = self._streams.get(ask_id) or threading.Event()
        responses = self._services.stream(self._request(desc), timeout)
        try:
            for response in responses:
                if cancelled.is_set():
                    break
                self._tell(("item", ask_id, self._response_desc(response)))
        finally:
            responses.close()  # cancels the request in the server when it stopped early
        self._tell(("answer", ask_id, True, None))

    def _request(self, desc: tuple) -> InferRequest:
        model, version, request_id, packed, outputs, parameters = desc
        tensors = [Tensor(name, str(datatype), list(array.shape), array)
                   for name, datatype, array in ipc.unpack(packed, self.prefix)]
        return InferRequest(model_name=str(model), model_version=str(version), id=str(request_id), inputs=tensors,
                            outputs=[RequestedOutput(str(n)) for n in outputs], parameters=dict(parameters))

    def _response_desc(self, response: InferResponse) -> tuple:
        packed = ipc.pack([(t.name, t.datatype, t.data) for t in response.outputs], self.prefix + "s")
        error = ipc.error_tuple(response.error) if response.error is not None else None
        return (response.model_name, response.model_version, response.id, packed, dict(response.parameters),
                response.final, error)

    def _tell(self, message: tuple) -> None:
        try:
            self.channel.send(message)
        except ipc.PeerGone:  # gone: what this message carried must not outlive it
            ipc.remove_segments(self.prefix)
