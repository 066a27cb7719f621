"""Runs a ``model.py`` written against Triton's Python-backend API (``TritonPythonModel`` whose
``execute`` takes a list of ``pb_utils.InferenceRequest``): default mode (a list of responses) and
decoupled mode (responses through each request's sender, ``execute`` returns None), sync or
``async def execute`` (run on an event loop of the instance's own)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
from typing import Any, Sequence

from server.core.backend import BackendRequest, LoadContext
from server.core.errors import ErrorCode, ServingError

from . import objects
from .convert import CastingSender, OutputCaster

log = logging.getLogger(__name__)


def triton_args(ctx: LoadContext, config_json: dict) -> dict[str, str]:
    """``initialize(args)`` as Triton passes it: every value a string, ``model_config`` JSON."""
    kind, _, device = ctx.device.partition(":")
    return {
        "model_config": json.dumps(config_json),
        "model_instance_kind": "GPU" if kind == "cuda" else "CPU",
        "model_instance_name": ctx.instance_name,
        "model_instance_device_id": device or "0",
        "model_repository": str(ctx.model_path),
        "model_version": str(ctx.version),
        "model_name": ctx.model_name,
    }


class _Loop:
    """An asyncio loop on a thread of its own, for ``async def execute``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"inferd-async:{name}", daemon=True)
        self._thread.start()

    def submit(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class TritonModel:
    def __init__(self, ctx: LoadContext, model: Any, decoupled: bool) -> None:
        self.name = ctx.model_name
        self.instance = ctx.instance_name  # Triton names the instance in execute failures
        self.version = ctx.version
        self.model = model
        self.decoupled = decoupled
        self.cast = OutputCaster(ctx.model_name, {s.name: s.datatype for s in ctx.config.outputs})
        self._async = inspect.iscoroutinefunction(model.execute)
        self._loop = _Loop(ctx.instance_name) if self._async else None
        self._running: set = set()

    def execute(self, requests: Sequence[BackendRequest]) -> None:
        senders = [CastingSender(r.sender, self.cast) for r in requests]
        batch = [objects.InferenceRequest.received(self.name, self.version, r.id, dict(r.inputs), list(r.outputs),
                                                   dict(r.parameters), sender)
                 for r, sender in zip(requests, senders)]
        try:
            if self._async:
                future = self._loop.submit(self.model.execute(batch))
                if self.decoupled:  # runs alongside later batches: the instance is free at once
                    self._running.add(future)
                    future.add_done_callback(lambda f: self._async_done(f, senders))
                    return
                result = future.result()
            else:
                result = self.model.execute(batch)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:  # would end the instance thread
            raise self._failure(RuntimeError(f"execute raised {type(exc).__name__}({exc})")) from exc
        except Exception as exc:
            raise self._failure(exc) from exc
        self._answer(result, batch, senders)

    def _failure(self, exc: BaseException) -> ServingError:
        if isinstance(exc, objects.TritonError):
            return objects.to_serving_error(exc)
        log.error("model '%s': execute raised", self.name, exc_info=exc)
        return self._failed(f"{type(exc).__name__}: {exc}")

    def _failed(self, message: str) -> ServingError:
        return ServingError(ErrorCode.INTERNAL, f"Failed to process the request(s) for model '{self.instance}', "
                            f"message: {message}")

    def _async_done(self, future, senders: list[CastingSender]) -> None:
        self._running.discard(future)
        error = None
        try:
            result = future.result()
            if result is not None:
                error = self._not_none()
        except BaseException as exc:  # noqa: BLE001 - becomes the requests' error
            error = self._failure(exc)
        if error is not None:
            for sender in senders:
                try:
                    sender.send(error=error, final=True)
                except ServingError:
                    pass  # this request already had its final

    def _not_none(self) -> ServingError:
        return ServingError(ErrorCode.INTERNAL, f"Python model '{self.name}' is using the decoupled mode and the "
                            "execute function must return None.")

    def _answer(self, result: Any, batch: list, senders: list[CastingSender]) -> None:
        if self.decoupled:
            if result is not None:
                raise self._not_none()
            return
        if result is None:  # default mode answering through the senders (Triton 24.06+)
            return
        if not isinstance(result, (list, tuple)) or len(result) != len(batch):
            size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            raise self._failed("Number of InferenceResponse objects do not match the number of InferenceRequest "
                               f"objects. InferenceRequest(s) size is:{len(batch)}, and InferenceResponse(s) size "
                               f"is:{size}")
        for request, response, sender in zip(batch, result, senders):
            if sender.closed:  # answered through its sender already
                continue
            if not isinstance(response, objects.InferenceResponse):
                sender.send(error=ServingError(ErrorCode.INTERNAL, f"model '{self.name}': execute returned "
                                               f"{type(response).__name__} where an InferenceResponse belongs"),
                            final=True)
                continue
            request.get_response_sender().send(response, flags=objects.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        try:
            if callable(getattr(self.model, "finalize", None)):
                self.model.finalize()
        except Exception:
            log.exception("model '%s': finalize raised", self.name)
        finally:
            if self._loop is not None:
                self._loop.close()
