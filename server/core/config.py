"""The validated, normalized model configuration the rest of the server reads.

The repository layer parses ``config.pbtxt`` into the wire-compatible ModelConfig message,
completes and normalizes it, then builds these frozen dataclasses from it. Nothing below the
repository layer sees protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TensorConfig:
    name: str
    datatype: str  # protocol string, e.g. "FP32", "BYTES"
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    reshape: tuple[int, ...] | None = None
    optional: bool = False


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    timeout_action: str = "REJECT"  # or "DELAY"
    default_timeout_us: int = 0  # 0 = no timeout
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0 = unbounded


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0  # 0 = priorities off (one level)
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)

    def policy_for(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    name: str
    kind: str  # "KIND_CPU" or "KIND_GPU" after normalization
    count: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmupSample:
    name: str
    batch_size: int
    count: int
    # input name -> (datatype, dims, "zero" | "random" | file path)
    inputs: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    """One step of an ensemble: run ``model_name`` (version -1: the latest ready one); ``input_map``
    maps the model's input names to ensemble tensor names, ``output_map`` its outputs to them."""

    model_name: str
    model_version: int = -1
    input_map: dict[str, str] = field(default_factory=dict)
    output_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    platform: str = ""
    backend: str = ""
    max_batch_size: int = 0
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    instance_groups: tuple[InstanceGroup, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str = ""
    decoupled: bool = False
    warmup: tuple[WarmupSample, ...] = ()
    ensemble: tuple[EnsembleStep, ...] = ()  # platform "ensemble": its steps, in configuration order
    # name -> spec (the first of a name), built once: looked up for every input and output of every request
    _inputs_by_name: dict[str, TensorConfig] = field(default_factory=dict, init=False, repr=False, compare=False)
    _outputs_by_name: dict[str, TensorConfig] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs_by_name", {spec.name: spec for spec in reversed(self.inputs)})
        object.__setattr__(self, "_outputs_by_name", {spec.name: spec for spec in reversed(self.outputs)})

    def input(self, name: str) -> TensorConfig | None:
        return self._inputs_by_name.get(name)

    def output(self, name: str) -> TensorConfig | None:
        return self._outputs_by_name.get(name)
