"""The Backend interface and its LoadContext: the only contract a backend implements.

A backend is found by name (server/repository/backends.py): the built-in table or the
``inferd.backends`` entry-point group, so third parties add one without touching inferd.

Two ways to execute. The tensor path (``execute``) receives a whole batch as concatenated arrays
and returns one set of outputs: the server splits them into one final response per request. The
request path (``execute_requests``) receives the batch's requests one by one, each with its own
``ResponseSender``; a backend overrides it when it needs per-request parameters or sends 0..N
responses per request (decoupled models: LLM token streams, Triton's response senders).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from .config import ModelConfig
from .types import ParamValue, TensorSpec


class ResponseSender(Protocol):
    """Where one request's responses go. Thread-safe: call it from any thread, during or after
    ``execute_requests``. Exactly one call carries ``final=True``; later calls raise ServingError."""

    def send(self, outputs: Mapping[str, np.ndarray] | None = None, *, final: bool = False,
             error: Any = None, parameters: Mapping[str, ParamValue] | None = None) -> None:
        """``outputs``: this request's own arrays (batch dimension first when max_batch_size > 0);
        ``send(final=True)`` alone is a flags-only final; ``error`` (a ServingError) makes this an
        error response."""

    def is_cancelled(self) -> bool:
        """True once the caller cancelled the request or went away: stop producing, then send the final."""

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the request is cancelled (on the server's event loop thread)."""


@dataclass(slots=True)
class BackendRequest:
    """One request of a batch, as the request path sees it."""

    id: str
    inputs: Mapping[str, np.ndarray]  # this request's tensors (BYTES: object arrays of bytes)
    outputs: Sequence[str]  # the requested output names (every output when the client named none)
    parameters: Mapping[str, ParamValue]
    sender: ResponseSender
    # telemetry's per-request context (trace), passed through for calls a model makes (BLS)
    context: Any = None


class ModelServices(Protocol):
    """What the server offers a loaded model beyond its own files (Triton's BLS, custom metrics).

    ``infer`` and ``stream`` block the calling (instance or user) thread and must not be called from
    the event loop. The repository hands an implementation to every backend in its LoadContext.
    """

    def infer(self, request: Any, timeout: float | None = None) -> Any:
        """Run an InferRequest on a model of this server and return its InferResponse (raises ServingError)."""

    def stream(self, request: Any, timeout: float | None = None) -> Any:
        """Run an InferRequest on any model and iterate its InferResponses as they come."""

    def metric_family(self, name: str, description: str, kind: str, buckets: Sequence[float] | None = None) -> Any:
        """A custom metric family on /metrics (kind: counter, gauge or histogram)."""

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether a model (version) of this server is ready."""


@dataclass(frozen=True, slots=True)
class LoadContext:
    model_name: str
    version: int
    model_path: Path  # <repository>/<model>
    version_path: Path  # <repository>/<model>/<version>
    model_file: Path  # version_path / default_model_filename (may not exist for some backends)
    config: ModelConfig  # may lack inputs/outputs when the server probes io_specs for auto-complete
    device: str  # "cpu" or "cuda:<index>"
    instance_name: str
    instance_index: int
    cpu_threads: int  # intra-op threads this instance may use without oversubscribing the cores
    services: ModelServices | None = None  # None when probing for auto-complete or in unit tests
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend-specific load facts


class Backend(abc.ABC):
    """One loaded instance of one model version. Synchronous; called from its instance thread.

    ``execute`` receives whole batches: every input has the batch dimension first when the
    model's max_batch_size > 0. It returns at least the requested outputs, with the same batch
    size. BYTES tensors are object arrays of bytes; BF16 tensors are uint16 bit patterns.
    """

    #: True: this instance may send 0..N responses per request (set by a backend whose model is
    #: decoupled; such a backend implements ``execute_requests``)
    decoupled: bool = False
    #: True: ``canary_check`` judges this instance's model as a canary candidate (docs/canary.md)
    canary_checks: bool = False
    #: True: ``execute`` is in-process compute that never waits on I/O, other requests or a lock
    #: another thread may hold, so the scheduler may run a batch it measured as cheap on the
    #: event loop itself instead of handing it to the instance thread (scheduling/instances.py)
    inline: bool = False

    @classmethod
    @abc.abstractmethod
    def load(cls, ctx: LoadContext) -> "Backend":
        """Load the model for one instance; raise on bad files (the server reports the reason)."""

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs as the model file declares them, for config auto-complete."""
        raise NotImplementedError(f"{type(self).__name__} cannot describe its inputs and outputs")

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch (the tensor path)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither execute nor execute_requests")

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        """Run one batch request by request (the request path); see the module docstring.

        Each request must eventually get exactly one ``final=True`` send, now or later, from any
        thread. An exception raised here fails every request of the batch that has no final yet.
        """
        raise NotImplementedError  # the instance uses the tensor path unless a backend overrides this

    def canary_check(self, stats: Mapping[str, float]) -> tuple[bool, str]:
        """The model's own verdict on itself as a canary candidate, given the window's figures
        (``ok``, ``reason``); called from a worker thread while the instance keeps serving."""
        raise NotImplementedError(f"{type(self).__name__} offers no canary check")

    def memory_bytes(self) -> int | None:
        """Bytes of (device) memory this instance holds, where the framework can say (called per
        batch from the instance thread, so it must be cheap); None: the server uses the growth of
        its process's RSS measured while the instance loaded (docs/cost.md)."""
        return None

    def health(self) -> str | None:
        """None while this instance can serve; otherwise why it cannot (e.g. its model process keeps
        dying). A version whose every instance reports a reason shows UNAVAILABLE with it."""
        return None

    def collect_metrics(self) -> Iterable[Any]:
        """Extra Prometheus metric families of this instance (prometheus_client ``Metric`` objects),
        read at scrape time on the event loop; a backend overrides this to publish its own."""
        return ()

    def warmup(self) -> None:
        """Backend-specific warm-up beyond the config's model_warmup samples (optional)."""

    def close(self) -> None:
        """Free sessions and device memory."""


def uses_own_metrics(backend: Backend) -> bool:
    """Whether ``backend`` publishes metric families of its own (it overrides ``collect_metrics``)."""
    return type(backend).collect_metrics is not Backend.collect_metrics


def uses_requests(backend: Backend) -> bool:
    """Whether ``backend`` takes the request path (it overrides ``execute_requests``)."""
    return type(backend).execute_requests is not Backend.execute_requests
