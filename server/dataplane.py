"""The data plane: the one object both frontends call. It resolves, validates, schedules, answers.

It returns core types only; frontends translate them to their wire format.
"""

from __future__ import annotations

import logging

from server import __version__
from server.core.errors import ErrorCode, ServingError, unavailable
from server.core.names import check_model_name
from server.core.types import InferRequest, InferResponse, Tensor
from server.repository import config as configs
from server.repository.manager import ModelVersion, RepositoryManager
from server.telemetry.tracing import Tracing

from . import validation

log = logging.getLogger(__name__)

# extensions that really work; frontends list these in ServerMetadata
EXTENSIONS = ["model_configuration", "statistics", "schedule_policy", "model_repository", "binary_tensor_data",
              "trace"]


class DataPlane:
    def __init__(self, repository: RepositoryManager, control_mode: str = "none",
                 strict_readiness: bool = False) -> None:
        self.repository = repository
        self.control_mode = control_mode
        self.strict_readiness = strict_readiness
        self.started = False  # initial model loading finished
        self.draining = False
        self.tracing = Tracing()  # off; the app installs the configured one
        self.changes = repository.changes  # readiness may have changed (started/draining: the app says)

    # -- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self.started or self.draining:
            return False
        return self.repository.all_ready() if self.strict_readiness else True

    def metadata(self) -> dict:
        return {"name": "inferd", "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str = "") -> ModelVersion:
        return self.repository.get(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repository.get(name, version).state == "READY"

    def model_config(self, name: str, version: str = "") -> dict:
        """The effective configuration as Triton renders it in JSON (REST); gRPC sends ``model(...).proto``."""
        return configs.to_json_dict(self.repository.get(name, version).proto)

    def model_versions(self, name: str, version: str = "") -> list[str]:
        if version:
            return [str(self.repository.get(name, version).version)]
        self.repository.get(name)  # raises when none is ready
        return [str(mv.version) for mv in self.repository.ready_versions(name)]

    def statistics(self, name: str = "", version: str = "") -> list:
        if not name:
            return self.repository.ready_versions()
        if not self.repository.known(name):
            raise ServingError(ErrorCode.NOT_FOUND, f"requested model '{name}' is not found")
        if version:
            try:
                return [self.repository.get(name, version)]
            except ServingError as exc:
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"requested model '{name}' version {version} is not available") from exc
        versions = self.repository.ready_versions(name)
        if not versions:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"requested model '{name}' is not available")
        return versions

    # -- model control -----------------------------------------------------------------------

    def _check_control(self) -> None:
        if self.control_mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed: the server runs with "
                              f"--model-control-mode={self.control_mode} (use explicit)")
        if self.draining:
            raise unavailable("the server is shutting down and accepts no model load / unload")

    async def load(self, name: str, config: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """(Re)load ``name``; ``config`` (ModelConfig JSON) replaces config.pbtxt for this load, and
        ``files`` (``<version>/<file>`` -> bytes) replace the model folder, as Triton's parameters do."""
        self._check_control()
        check_model_name(name, "load")
        if files and config is None:
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"failed to load '{name}': 'file:' load parameters need the 'config' parameter "
                               "too (the configuration of the model those files make up)")
        await self.repository.load(name, config, files or None)

    async def unload(self, name: str) -> None:
        self._check_control()
        check_model_name(name, "unload")
        await self.repository.unload(name)

    # -- trace extension ---------------------------------------------------------------------

    def trace_settings(self, model: str = "", changes: dict[str, list[str] | None] | None = None,
                       update: bool = False) -> dict[str, list[str]]:
        """Read (or with ``update``, change) the global or a model's trace settings; ``changes`` None
        with ``update`` drops the model's own settings."""
        if model and not self.repository.known(model):
            raise ServingError(ErrorCode.NOT_FOUND, f"trace setting for unknown model '{model}'")
        if not update:
            return self.tracing.get_settings(model)
        return self.tracing.update_settings(model, changes)

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.trace is not None:  # traced: the same path inside the request's server span
            return await self.tracing.infer(self._infer, request)
        return await self._infer(request)

    async def _infer(self, request: InferRequest) -> InferResponse:
        if self.draining:
            raise unavailable("the server is shutting down and accepts no new requests")
        mv = self.repository.get(request.model_name, request.model_version)
        config = mv.config
        if config.decoupled:
            raise ServingError(ErrorCode.UNIMPLEMENTED,
                               f"ModelInfer doesn't support model '{config.name}' with decoupled transaction policy")
        validation.check_parameters(request)
        inputs = validation.check_inputs(config, request)
        outputs = validation.check_outputs(config, request.outputs)
        # no await between lookup and enqueue: a swap cannot retire this version in between
        arrays = await mv.scheduler.submit(inputs, outputs, request.parameters, request.deadline, request.trace)
        tensors = []
        for name in outputs:
            array = arrays[name]
            spec = config.output(name)
            shape = list(array.shape)
            if spec.reshape is not None:
                lead = shape[:1] if config.max_batch_size > 0 else []
                shape = lead + list(spec.dims)
                array = array.reshape(shape)
            tensors.append(Tensor(name, spec.datatype, shape, array))
        return InferResponse(config.name, str(mv.version), request.id, tensors)
