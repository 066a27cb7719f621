"""Loading one model's versions from disk into backend instances (blocking; runs in a thread)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from google.protobuf import json_format

from server.core import config as core
from server.core.backend import Backend, LoadContext, ModelServices
from server.core.dtypes import NUMPY_DTYPES
from server.core.errors import ErrorCode, ServingError
from server.core.names import check_model_name
from server.protos import model_config_pb2 as mc
from server.telemetry.cost import process_rss
from server.telemetry.gpu import gpu_count

from . import backends, ensemble, layout, pbtxt, redact
from . import config as configs

log = logging.getLogger(__name__)


@dataclass
class LoadedVersion:
    version: int
    backends: list[tuple[str, Backend]]  # (instance name, backend)
    memory: dict[str, int] = field(default_factory=dict)  # instance name -> RSS growth while it loaded


@dataclass
class LoadResult:
    """What a load produced: the effective config, loaded versions, and per-version failures."""

    proto: mc.ModelConfig
    config: core.ModelConfig | None
    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    selected: list[int] = field(default_factory=list)  # what the version policy chose, highest first

    def close(self) -> None:
        """Free every instance this load produced (it will not serve)."""
        for loaded in self.loaded.values():
            for _, backend in loaded.backends:
                try:
                    backend.close()
                except Exception:
                    log.exception("closing an unused instance of model '%s' failed", self.proto.name)
        self.loaded.clear()


def usable_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 quota (a pod's CPU limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class LoadOptions:
    default_max_batch_size: int = 4
    auto_complete: bool = True
    cores: int = field(default_factory=usable_cores)
    services: ModelServices | None = None  # handed to every backend (BLS calls, custom metrics)


def _placements(config: core.ModelConfig) -> list[tuple[str, str]]:
    """(instance name, device) for every instance the groups ask for."""
    out = []
    for group in config.instance_groups:
        if group.kind == "KIND_GPU" and group.gpus:
            for gpu in group.gpus:
                out += [(f"{group.name}_{i}_gpu{gpu}", f"cuda:{gpu}") for i in range(group.count)]
        elif group.kind == "KIND_GPU":
            raise ServingError(ErrorCode.FAILED_PRECONDITION,
                               f"model '{config.name}': instance group '{group.name}' is KIND_GPU but no GPU is visible")
        else:
            out += [(f"{group.name}_{i}", "cpu") for i in range(group.count)]
    return out


def inside(folder: Path, name: str, what: str, model: str) -> Path:
    """``folder / name``, refused unless it resolves (symbolic links followed) inside ``folder``."""
    target = folder / name
    if not target.resolve().is_relative_to(folder.resolve()):
        log.error("model '%s': %s '%s' resolves to '%s', outside '%s'", model, what, name, target.resolve(), folder)
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{model}': {what} '{name}' leads outside the model's folder")
    return target


def _context(model_path: Path, version: int, vpath: Path, config: core.ModelConfig, name: str,
             device: str, index: int, threads: int, services: ModelServices | None = None,
             proto: mc.ModelConfig | None = None) -> LoadContext:
    extra = {"model_config": configs.to_json_dict(proto)} if proto is not None else {}
    model_file = inside(vpath, config.default_model_filename, "default_model_filename", config.name)
    return LoadContext(
        model_name=config.name, version=version, model_path=model_path, version_path=vpath,
        model_file=model_file, config=config, device=device,
        instance_name=name, instance_index=index, cpu_threads=threads, services=services, extra=extra,
    )


def load_model(model_path: Path, options: LoadOptions, override_json: str | None = None,
               only_versions: set[int] | None = None, skip: frozenset[int] | set[int] = frozenset(),
               on_plan: Callable[[list[int]], None] | None = None, plan: dict | None = None) -> LoadResult:
    """``_load_model`` with every client-facing reason free of absolute server paths (the full
    text is logged here): the model's folder reads as its name, other paths as their last part."""
    name = model_path.name
    try:
        result = _load_model(model_path, options, override_json, only_versions, skip, on_plan, plan)
    except ServingError as exc:
        message = redact.public(exc.message, model_path)
        if message != exc.message:
            log.error("model '%s' failed to load: %s", name, exc.message)
        raise ServingError(exc.code, message) from exc
    except Exception as exc:
        log.exception("loading model '%s' failed", name)
        raise ServingError(ErrorCode.INTERNAL, f"failed to load '{name}': {type(exc).__name__}: "
                                               f"{redact.public(str(exc), model_path)}") from exc
    result.failed = {v: redact.public(reason, model_path) for v, reason in result.failed.items()}
    return result


def _load_model(model_path: Path, options: LoadOptions, override_json: str | None = None,
                only_versions: set[int] | None = None, skip: frozenset[int] | set[int] = frozenset(),
                on_plan: Callable[[list[int]], None] | None = None, plan: dict | None = None) -> LoadResult:
    """Read, complete and validate the config, then load every selected version's instances.

    ``skip`` names versions the caller already serves unchanged: they count as selected but are not
    loaded again. ``on_plan`` hears which versions are about to load (for LOADING states).
    ``plan["extend"]`` (the canary's hook) may add versions to what the version policy selects.
    Raises ServingError when the model as a whole cannot load (bad config, unknown backend);
    a version that fails is reported in ``failed`` and the others still load.
    """
    name = model_path.name
    proto, warnings = pbtxt.read(model_path, override_json)
    if proto.name and proto.name != name:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{name}': config.pbtxt names the model '{proto.name}'; it must match the folder")
    proto.name = name
    configs.check_file_names(proto)  # before anything looks for the files they name
    available = layout.versions(model_path)
    if not available:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{name}': no version folders (e.g. '{name}/1/')")
    if proto.platform == "ensemble":
        return _load_ensemble(proto, available, warnings, only_versions, skip)
    layout.complete_backend_fields(proto, model_path, available)
    backend_cls = backends.find(proto.backend)
    selected = layout.select(proto.version_policy, list(available))
    if plan is not None:
        selected = plan["extend"](proto, sorted(available), selected)
    if only_versions is not None:
        selected = [v for v in selected if v in only_versions]
    if not selected:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{name}': the version policy selects none of versions {sorted(available)}")
    to_load = [v for v in selected if v not in skip]
    if not to_load:  # only versions dropped: nothing to read, complete or warm
        return LoadResult(proto=proto, config=None, warnings=warnings, selected=selected)
    if on_plan is not None:
        on_plan(to_load)
    gpus = gpu_count()
    if options.auto_complete and callable(getattr(backend_cls, "complete_config", None)):
        _model_completes(proto, backend_cls, model_path, selected[0], available[selected[0]], options, gpus)
    if options.auto_complete and configs.needs_io(proto):
        _autocomplete(proto, backend_cls, model_path, selected[0], available[selected[0]], options, gpus)
    configs.normalize(proto, has_gpu=gpus > 0)
    configs.validate(proto)
    config = configs.to_core(proto, gpus)
    result = LoadResult(proto=proto, config=config, warnings=warnings, selected=selected)
    placements = _placements(config)
    cpu_instances = sum(1 for _, device in placements if device == "cpu") or 1
    threads = max(1, options.cores // cpu_instances)
    for version in to_load:
        vpath = available[version]
        loaded: list[tuple[str, Backend]] = []
        memory: dict[str, int] = {}
        try:
            for index, (iname, device) in enumerate(placements):
                ctx = _context(model_path, version, vpath, config, iname, device, index, threads,
                               options.services, proto)
                before = process_rss()  # the instance's footprint for cost accounting (docs/cost.md)
                backend = backend_cls.load(ctx)
                loaded.append((iname, backend))
                warm_up(backend, config, model_path)
                # RSS growth undercounts when the allocator reuses freed memory: the weights file is a floor
                memory[iname] = max(0, process_rss() - before, _file_size(ctx.model_file))
            result.loaded[version] = LoadedVersion(version, loaded, memory)
        except Exception as exc:  # noqa: BLE001 - reported per version; the others still load
            for _, backend in loaded:
                backend.close()
            reason = exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            log.error("model '%s' version %d failed to load: %s", name, version, reason)
            result.failed[version] = reason
    return result


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _load_ensemble(proto: mc.ModelConfig, available: dict[int, Path], warnings: list[str],
                   only_versions: set[int] | None, skip: frozenset[int] | set[int]) -> LoadResult:
    """An ensemble has no backend and no instances: its configuration is the whole model. The
    graph is checked here; its steps against the composing models once they serve (manager.py)."""
    if not proto.HasField("version_policy"):
        proto.version_policy.latest.num_versions = 1
    selected = layout.select(proto.version_policy, list(available))
    if only_versions is not None:
        selected = [v for v in selected if v in only_versions]
    if not selected:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{proto.name}': the version policy selects none of versions {sorted(available)}")
    if proto.instance_group:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"ensemble '{proto.name}': an ensemble has no instances; remove instance_group")
    configs.validate(proto)
    config = configs.to_core(proto, 0)
    ensemble.check_graph(config)
    result = LoadResult(proto=proto, config=config, warnings=warnings, selected=selected)
    for version in selected:
        if version not in skip:
            result.loaded[version] = LoadedVersion(version, [])
    return result


def _autocomplete(proto: mc.ModelConfig, backend_cls: type[Backend], model_path: Path, version: int,
                  vpath: Path, options: LoadOptions, gpus: int) -> None:
    # a probe instance reports the model's tensors; serving instances then see the final config
    partial = configs.to_core(proto, gpus)
    ctx = _context(model_path, version, vpath, partial, f"{proto.name}_probe", "cpu", 0, 1)
    probe = backend_cls.load(ctx)
    try:
        inputs, outputs = probe.io_specs()
    except NotImplementedError as exc:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{proto.name}': config.pbtxt must list inputs and outputs ({exc})") from exc
    finally:
        probe.close()
    if proto.input and proto.output:
        return
    configs.check_against_model(proto, inputs, outputs)
    configs.autocomplete(proto, inputs, outputs, options.default_max_batch_size)


def _model_completes(proto: mc.ModelConfig, backend_cls: type[Backend], model_path: Path, version: int,
                     vpath: Path, options: LoadOptions, gpus: int) -> None:
    """A backend that completes the configuration itself (Triton's ``auto_complete_config``)."""
    ctx = _context(model_path, version, vpath, configs.to_core(proto, gpus), f"{proto.name}_probe", "cpu", 0, 1)
    completed = backend_cls.complete_config(ctx, configs.to_json_dict(proto))
    try:
        fresh = json_format.ParseDict(completed, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{proto.name}': the completed configuration is invalid: {exc}") from None
    proto.CopyFrom(fresh)


def warm_up(backend: Backend, config: core.ModelConfig, model_path: Path) -> None:
    """Run the config's model_warmup samples, then the backend's own warm-up."""
    rng = np.random.default_rng(0)
    for sample in config.warmup:
        inputs = {}
        for name, (datatype, dims, source) in sample.inputs.items():
            shape = ((sample.batch_size,) if config.max_batch_size > 0 else ()) + tuple(dims)
            where = f"warmup sample '{sample.name}' input '{name}'"
            inputs[name] = _warmup_tensor(datatype, shape, source, rng, model_path / "warmup", where, config.name)
        outputs = [o.name for o in config.outputs]
        for _ in range(sample.count):
            try:
                backend.execute(inputs, outputs)
            except Exception as exc:
                raise ServingError(ErrorCode.FAILED_PRECONDITION,
                                   f"warmup sample '{sample.name}' failed: {exc}") from exc
    backend.warmup()


def _warmup_data(folder: Path, source: str, where: str, model: str) -> bytes:
    """A warmup data file's bytes; errors name the file as the config does, never its content or
    where it is on disk (that stays in the log)."""
    path = inside(folder, source, f"{where}: input_data_file", model)
    try:
        return path.read_bytes()
    except OSError as exc:
        log.error("model '%s': %s: cannot read '%s': %s", model, where, path, exc)
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{model}': {where}: cannot read warmup/{source}: {exc.strerror}") from None


def _warmup_tensor(datatype: str, shape: tuple[int, ...], source: str, rng, folder: Path,
                   where: str = "warmup", model: str = "") -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        from server.core.dtypes import deserialize_bytes
        if source not in ("zero", "random"):
            data = _warmup_data(folder, source, where, model)
            try:
                return deserialize_bytes("warmup", data, count).reshape(shape)
            except ServingError:
                raise ServingError(ErrorCode.FAILED_PRECONDITION,
                                   f"model '{model}': {where}: warmup/{source} does not hold {count} "
                                   "length-prefixed BYTES elements") from None
        return np.array([b"0" * 4] * count, dtype=np.object_).reshape(shape)
    if source == "zero":
        return np.zeros(shape, dtype)
    if source == "random":
        if dtype.kind == "f":
            return rng.random(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 8, shape).astype(dtype)
    data = _warmup_data(folder, source, where, model)
    if len(data) != count * dtype.itemsize:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"model '{model}': {where}: warmup/{source} does not hold the "
                           f"{count * dtype.itemsize} bytes of {datatype} shape {list(shape)}")
    return np.frombuffer(data, dtype).reshape(shape)


def write_override(name: str, files: dict[str, bytes]) -> Path:
    """Write a load request's inline ``file:<path>`` contents into a private temporary model folder.

    Returns ``<tmp>/<name>``; the caller removes the parent (``remove_override``) once no version
    loaded from it serves. Paths must stay inside the folder.
    """
    check_model_name(name)  # the data plane checked it too; this folder is deleted later, so check again
    root = Path(tempfile.mkdtemp(prefix="inferd-load-"))  # mode 0700: private to this process's user
    folder = root / name
    try:
        if folder.parent != root or not folder.resolve().is_relative_to(root.resolve()):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, "the model name must be one folder name")
        folder.mkdir()
        for rel, data in sorted(files.items()):
            parts = PurePosixPath(rel).parts
            if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"load parameter 'file:{rel}': the path must be relative to the model "
                                   "folder, e.g. 'file:1/model.onnx', without '..'")
            target = folder.joinpath(*parts)
            if not target.resolve().is_relative_to(folder.resolve()):
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"load parameter 'file:{rel}': the path leaves the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        remove_override(folder)
        raise
    return folder


def remove_override(folder: Path) -> None:
    """Remove the private folder ``write_override`` made (only ever an ``inferd-load-*`` temp folder)."""
    root = folder.parent
    if not root.name.startswith("inferd-load-") or root.parent != Path(tempfile.gettempdir()):
        log.error("refusing to remove '%s': not a folder this server made for a load", root)
        return
    shutil.rmtree(root, ignore_errors=True)
