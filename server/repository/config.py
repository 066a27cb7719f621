"""The model configuration once read (pbtxt.py reads it): auto-complete from the model, normalize,
validate, and render it (core dataclasses for the server, JSON for REST).

The ModelConfig message stays the source of truth (the ModelConfig RPC returns it); ``to_core``
builds the frozen dataclasses the rest of the server reads.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from server.core import config as core
from server.core.dtypes import config_name, from_config_name
from server.core.errors import ErrorCode, ServingError
from server.core.types import TensorSpec
from server.protos import model_config_pb2 as mc
from server.scheduling.policy import LATENCY_TARGET_KEY, latency_target_ms


def _precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def _file_name(model: str, what: str, value: str) -> None:
    # one name inside its folder: a config must not make the server read or import files elsewhere
    if value in (".", "..") or any(c in value for c in "/\\\0") or Path(value).is_absolute():
        raise _precondition(model, f"{what} '{value}' must be a file name inside the model's folder "
                                   "(no '/', '\\', '..' or absolute path)")


def check_file_names(config: mc.ModelConfig) -> None:
    """default_model_filename and warmup input_data_file are plain names (the loader also checks
    that the files they resolve to, symbolic links followed, stay inside the model's folder)."""
    if config.default_model_filename:
        _file_name(config.name, "default_model_filename", config.default_model_filename)
    for sample in config.model_warmup:
        for key, value in sample.inputs.items():
            if value.input_data_file:
                _file_name(config.name, f"warmup sample '{sample.name}' input '{key}': input_data_file",
                           value.input_data_file)


def needs_io(config: mc.ModelConfig) -> bool:
    return not config.input or not config.output


def autocomplete(config: mc.ModelConfig, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 default_max_batch_size: int) -> None:
    """Complete inputs, outputs, max_batch_size and dynamic_batching from the model file."""
    name = config.name
    batchable = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in inputs + outputs)
    if not config.input and not config.output and not config.max_batch_size and batchable:
        config.max_batch_size = default_max_batch_size
        if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
            config.dynamic_batching.SetInParent()
    elif config.max_batch_size and not batchable and (not config.input or not config.output):
        raise _precondition(
            name, f"max_batch_size is {config.max_batch_size} but the model's tensors have no "
            "variable first dimension to batch on")
    skip = 1 if config.max_batch_size > 0 else 0

    def fill(target, specs: list[TensorSpec]) -> None:
        for spec in specs:
            entry = target.add()
            entry.name = spec.name
            try:
                entry.data_type = mc.DataType.Value(config_name(spec.datatype))
            except KeyError as exc:
                raise _precondition(name, f"tensor '{spec.name}' has unsupported type {spec.datatype}") from exc
            dims = list(spec.shape[skip:])
            if not dims:
                entry.dims.append(1)
                if skip:
                    entry.reshape.SetInParent()
            else:
                entry.dims.extend(dims)

    if not config.input:
        fill(config.input, inputs)
    if not config.output:
        fill(config.output, outputs)


def check_against_model(config: mc.ModelConfig, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Configured tensors must exist in the model with the same type."""
    for kind, configured, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        known = {s.name: s for s in actual}
        for entry in configured:
            spec = known.get(entry.name)
            if spec is None:
                raise _precondition(
                    config.name, f"configured {kind} '{entry.name}' is not in the model; it has "
                    f"{', '.join(sorted(known)) or 'none'}")
            want = from_config_name(mc.DataType.Name(entry.data_type))
            if spec.datatype != want:
                raise _precondition(
                    config.name, f"{kind} '{entry.name}' is {want} in config.pbtxt but {spec.datatype} in the model")


def normalize(config: mc.ModelConfig, has_gpu: bool) -> None:
    """Defaults Triton always applies (version policy, preferred sizes, instance groups)."""
    if config.WhichOneof("scheduling_choice") == "dynamic_batching" and config.max_batch_size > 0:
        if not config.dynamic_batching.preferred_batch_size:
            config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if not config.instance_group:
        config.instance_group.add()
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{i}"
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = mc.ModelInstanceGroup.KIND_GPU if has_gpu else mc.ModelInstanceGroup.KIND_CPU
        if group.count == 0:
            group.count = 2 if (group.kind == mc.ModelInstanceGroup.KIND_CPU
                                and config.backend == "onnxruntime") else 1
    config.optimization.input_pinned_memory.enable = True
    config.optimization.output_pinned_memory.enable = True


def validate(config: mc.ModelConfig) -> None:
    check_file_names(config)
    name = config.name
    if config.max_batch_size < 0:
        raise _precondition(name, f"max_batch_size must be >= 0, got {config.max_batch_size}")
    if not config.input:
        raise _precondition(name, "the configuration lists no inputs and the backend cannot complete them")
    if not config.output:
        raise _precondition(name, "the configuration lists no outputs and the backend cannot complete them")
    for kind, entries in (("input", config.input), ("output", config.output)):
        seen = set()
        for entry in entries:
            if not entry.name:
                raise _precondition(name, f"an {kind} has no name")
            if entry.name in seen:
                raise _precondition(name, f"{kind} '{entry.name}' is listed twice")
            seen.add(entry.name)
            if entry.data_type == mc.TYPE_INVALID:
                raise _precondition(name, f"{kind} '{entry.name}' has no data_type")
            if not entry.dims:
                raise _precondition(name, f"{kind} '{entry.name}' has no dims (rank must be >= 1)")
            if any(d < -1 or d == 0 for d in entry.dims):
                raise _precondition(name, f"{kind} '{entry.name}' has invalid dims {list(entry.dims)}")
    db = config.dynamic_batching if config.WhichOneof("scheduling_choice") == "dynamic_batching" else None
    _latency_target(config, db)
    if config.WhichOneof("scheduling_choice") == "sequence_batching":
        raise ServingError(ErrorCode.UNIMPLEMENTED, f"model '{name}': sequence_batching is not supported yet")
    if (config.WhichOneof("scheduling_choice") == "ensemble_scheduling") != (config.platform == "ensemble"):
        raise _precondition(name, "ensemble_scheduling is only valid with platform \"ensemble\", and an ensemble "
                                  "needs ensemble_scheduling { step [...] }")
    if db is not None and config.max_batch_size > 0:
        for size in db.preferred_batch_size:
            if size < 1 or size > config.max_batch_size:
                raise _precondition(
                    name, f"preferred_batch_size {size} is outside 1..max_batch_size ({config.max_batch_size})")
        if db.priority_levels and not 1 <= db.default_priority_level <= db.priority_levels:
            raise _precondition(
                name, f"default_priority_level {db.default_priority_level} is outside 1..{db.priority_levels}")
        for level in db.priority_queue_policy:
            if not 1 <= level <= db.priority_levels:
                raise _precondition(name, f"priority_queue_policy names level {level} outside "
                                          f"1..{db.priority_levels}")
    for group in config.instance_group:
        if group.count < 0:
            raise _precondition(name, f"instance group '{group.name}' has count {group.count}")
        if group.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL) and group.gpus:
            raise _precondition(name, f"instance group '{group.name}' of {mc.ModelInstanceGroup.Kind.Name(group.kind)}"
                                      " cannot list gpus")


def _latency_target(config: mc.ModelConfig, db) -> None:
    """The batcher's latency target parameter is a positive number, on a model the batcher serves."""
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    if latency_target_ms(parameters, config.name) is not None and (db is None or config.max_batch_size <= 0):
        raise _precondition(config.name, f"parameter '{LATENCY_TARGET_KEY}' needs dynamic_batching and "
                                         "max_batch_size > 0: it bounds how long the dynamic batcher waits")


def _tensor(entry) -> core.TensorConfig:
    reshape = tuple(entry.reshape.shape) if entry.HasField("reshape") else None
    return core.TensorConfig(
        name=entry.name,
        datatype=from_config_name(mc.DataType.Name(entry.data_type)),
        dims=tuple(entry.dims),
        reshape=reshape,
        optional=getattr(entry, "optional", False),
    )


def _policy(p: mc.ModelQueuePolicy) -> core.QueuePolicy:
    return core.QueuePolicy(
        timeout_action=mc.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action),
        default_timeout_us=p.default_timeout_microseconds,
        allow_timeout_override=p.allow_timeout_override,
        max_queue_size=p.max_queue_size,
    )


def to_core(config: mc.ModelConfig, gpu_count: int) -> core.ModelConfig:
    db = None
    if config.WhichOneof("scheduling_choice") == "dynamic_batching" and config.max_batch_size > 0:
        d = config.dynamic_batching
        db = core.DynamicBatching(
            preferred_batch_sizes=tuple(d.preferred_batch_size),
            max_queue_delay_us=d.max_queue_delay_microseconds,
            preserve_ordering=d.preserve_ordering,
            priority_levels=d.priority_levels,
            default_priority_level=d.default_priority_level,
            default_queue_policy=_policy(d.default_queue_policy),
            priority_queue_policy={int(k): _policy(v) for k, v in d.priority_queue_policy.items()},
        )
    groups = []
    for g in config.instance_group:
        kind = mc.ModelInstanceGroup.Kind.Name(g.kind)
        gpus = tuple(g.gpus) or (tuple(range(gpu_count)) if kind == "KIND_GPU" else ())
        groups.append(core.InstanceGroup(name=g.name, kind=kind, count=g.count, gpus=gpus))
    warmup = tuple(
        core.WarmupSample(
            name=w.name,
            batch_size=max(1, w.batch_size),
            count=max(1, w.count),
            inputs={
                k: (
                    from_config_name(mc.DataType.Name(v.data_type)),
                    tuple(v.dims),
                    "random" if v.random_data else ("zero" if v.zero_data else v.input_data_file),
                )
                for k, v in w.inputs.items()
            },
        )
        for w in config.model_warmup
    )
    return core.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        inputs=tuple(_tensor(e) for e in config.input),
        outputs=tuple(_tensor(e) for e in config.output),
        dynamic_batching=db,
        instance_groups=tuple(groups),
        parameters={k: v.string_value for k, v in config.parameters.items()},
        default_model_filename=config.default_model_filename,
        decoupled=config.model_transaction_policy.decoupled,
        warmup=warmup,
        ensemble=tuple(
            core.EnsembleStep(step.model_name, step.model_version, dict(step.input_map), dict(step.output_map))
            for step in config.ensemble_scheduling.step
        ),
    )


def to_json_dict(config: mc.ModelConfig) -> dict:
    """The REST rendering Triton uses: proto field names, defaults printed, int64 as numbers."""
    data = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(config.DESCRIPTOR, data)
    return data


_INT64 = {
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
}


def _int64_as_numbers(descriptor, data: dict) -> None:
    # protobuf's JSON writes 64-bit integers as strings; Triton's clients expect numbers
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        repeated = field.is_repeated
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for item in value.values():
                        _int64_as_numbers(value_field.message_type, item)
                elif value_field.type in _INT64:
                    data[key] = {k: int(v) for k, v in value.items()}
            elif repeated:
                for item in value:
                    _int64_as_numbers(field.message_type, item)
            else:
                _int64_as_numbers(field.message_type, value)
        elif field.type in _INT64:
            data[key] = [int(v) for v in value] if repeated else int(value)
