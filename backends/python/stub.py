"""A Python model's own process (Triton calls it the stub): ``python -m backends.python.stub FD PREFIX LEVEL``.

The server starts one per instance (process.py) with one end of a Unix socket pair as FD. The main
thread reads the control channel; one worker thread runs what the server asks, in order (load,
auto-complete, execute, finalize), with the same runners as the in-process backend (runner.py).
Cancellations and the answers to the model's own questions (BLS, metrics) are handled on the
reader thread, so they arrive while ``execute`` runs. When the server goes away the process exits.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import socket
import sys
import threading
from typing import Any

from server.core.backend import BackendRequest, LoadContext
from server.core.errors import ErrorCode, ServingError

from . import ipc, loading, runner, runtime
from .dict_model import DictModel
from .remote import RemoteSender, RemoteServices

log = logging.getLogger("inferd.python.stub")


class _ForwardLogs(logging.Handler):
    """Log records go to the server's log (under the same logger names)."""

    def __init__(self, channel: ipc.Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._channel.send(("log", record.levelno, record.name, text))
        except Exception:  # noqa: BLE001 - logging must never raise into the model
            pass


class _UserFailure(ServingError):
    """The model's own code raised while executing."""


class Stub:
    def __init__(self, channel: ipc.Channel, prefix: str) -> None:
        self.channel = channel
        self.peer_prefix = prefix
        self.prefix = prefix + "m"  # segments this process writes (the server's are prefix + "s")
        self.services = RemoteServices(channel, self.prefix, prefix)
        self.runner: Any = None
        self.module = ""
        self.decoupled = False
        self.output_types: dict[str, str] = {}
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.senders: dict[int, RemoteSender] = {}
        self.early_cancels: set[int] = set()

    # -- reader (main thread) ----------------------------------------------------------------

    def run(self) -> None:
        threading.Thread(target=self._work, name="inferd-stub-worker", daemon=True).start()
        while True:
            try:
                message = self.channel.recv()
            except ipc.PeerGone:
                self._exit(0)
            kind = message[0]
            if kind == "cancel":
                sender = self.senders.get(message[1])
                if sender is not None:
                    sender.cancel()
                elif len(self.early_cancels) < 10000:
                    self.early_cancels.add(message[1])
            elif kind in ("answer", "item"):
                self.services.asking.deliver(message)
            else:
                self.jobs.put(message)

    def _exit(self, status: int) -> None:
        self.services.asking.fail_all()
        ipc.remove_segments(self.prefix)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):  # what the model printed reaches the server's output
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)

    # -- worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            message = self.jobs.get()
            kind, call_id, args = message[0], message[1], message[2:]
            handler = getattr(self, f"_op_{kind}", None)
            try:
                if handler is None:
                    raise ServingError(ErrorCode.INTERNAL, f"unknown operation {kind!r}")
                reply = ("reply", call_id, True, handler(*args))
            except _UserFailure as exc:  # logged here with its traceback; the server logs the headline
                reply = ("reply", call_id, False, (*ipc.error_tuple(exc), "model"))
            except ServingError as exc:
                reply = ("reply", call_id, False, ipc.error_tuple(exc))
            except BaseException as exc:  # noqa: BLE001 - user code: reported, never ends this process
                log.error("model '%s': %s failed", self.module, kind, exc_info=exc)
                reply = ("reply", call_id, False, ("INTERNAL", f"model '{self.module}' failed: "
                                                               f"{type(exc).__name__}: {exc}"))
            try:
                self.channel.send(reply)
            except ipc.PeerGone:
                self._exit(0)
            if kind == "close":
                self._exit(0)

    def _op_load(self, ctx: LoadContext) -> tuple[str, bool]:
        self.module = ctx.model_name
        runtime.install(self.services)
        _, self.runner = runner.create(ctx)
        self.output_types = {s.name: s.datatype for s in ctx.config.outputs}
        if isinstance(self.runner, DictModel):
            return "dict", False
        self.decoupled = self.runner.decoupled
        return "triton", self.decoupled

    def _op_complete(self, ctx: LoadContext, config: dict) -> dict:
        self.module = ctx.model_name
        return runner.auto_complete(ctx, config)

    def _op_exec(self, packed: ipc.Packed, outputs: list[str]) -> ipc.Packed:
        inputs = {name: array for name, _, array in ipc.unpack(packed, self.peer_prefix)}
        try:
            result = self.runner.execute(inputs, outputs)
        except ServingError:
            raise
        except Exception as exc:  # what the scheduler says for an in-process failure, in the same words
            log.error("model '%s': execute raised", self.module, exc_info=exc)
            raise _UserFailure(ErrorCode.INTERNAL, f"model '{self.module}' failed: {type(exc).__name__}: {exc}") \
                from exc
        return ipc.pack([(name, self.output_types.get(name, ""), array) for name, array in result.items()],
                        self.prefix)

    def _op_requests(self, batch: list) -> None:
        requests = []
        keys = [item[0] for item in batch]
        try:
            self._execute_requests(batch, requests)
        except BaseException:
            self._forget(keys)  # the server fails what has no final yet: later sends are refused
            raise
        if not self.decoupled:  # the server closed every request of the batch when execute returned
            self._forget(keys)

    def _forget(self, keys: list[int]) -> None:
        for key in keys:
            sender = self.senders.pop(key, None)
            if sender is not None:
                sender.close()

    def _execute_requests(self, batch: list, requests: list) -> None:
        for key, request_id, packed, outputs, parameters in batch:
            sender = RemoteSender(self.channel, key, self.decoupled, self.prefix, self._final)
            self.senders[key] = sender
            if key in self.early_cancels:
                self.early_cancels.discard(key)
                sender.cancel()
            inputs = {name: array for name, _, array in ipc.unpack(packed, self.peer_prefix)}
            requests.append(BackendRequest(request_id, inputs, outputs, parameters, sender))
        try:
            self.runner.execute(requests)
        except ServingError:
            raise
        except Exception as exc:
            log.error("model '%s': execute raised", self.module, exc_info=exc)
            raise _UserFailure(ErrorCode.INTERNAL, f"model '{self.module}' failed: {type(exc).__name__}: {exc}") \
                from exc

    def _final(self, key: int) -> None:
        self.senders.pop(key, None)

    def _op_close(self) -> None:
        if self.runner is not None:
            self.runner.finalize()


def main(argv: list[str]) -> None:
    fd, prefix, level = int(argv[1]), argv[2], int(argv[3])
    faulthandler.enable()  # a segfault prints the Python stack into the server's log
    channel = ipc.Channel(socket.socket(fileno=fd), plain_only=False)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(channel)]
    root.setLevel(level)
    sys.modules.setdefault(loading.PB_UTILS, sys.modules["backends.python.pb_utils"])
    Stub(channel, prefix).run()


if __name__ == "__main__":
    main(sys.argv)
