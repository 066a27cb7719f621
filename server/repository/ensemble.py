"""Validation of an ensemble's configuration (``platform: "ensemble"``): its step graph on its own,
then its steps against the configurations of the models they run.

The graph check runs with the rest of the configuration checks (loader.py); the model check runs
once the composing models serve (manager.py loads them first). Every message names the ensemble,
the step (index and model) and the tensor, so the repository index says exactly what to fix.
"""

from __future__ import annotations

from collections.abc import Callable

from server.core.config import EnsembleStep, ModelConfig, TensorConfig
from server.core.errors import ErrorCode, ServingError

Lookup = Callable[[str, int], ModelConfig]  # (model, version or -1) -> its config; raises ServingError


def _bad(ensemble: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"ensemble '{ensemble}': {message}")


def _step(index: int, step: EnsembleStep) -> str:
    return f"step {index} (model '{step.model_name}')"


def composing_models(config: ModelConfig) -> list[str]:
    """The models an ensemble runs, in step order, each once."""
    return list(dict.fromkeys(step.model_name for step in config.ensemble))


def order(config: ModelConfig) -> list[int]:
    """Step indices in an order where every step comes after the steps that produce its inputs."""
    producer = {t: i for i, s in enumerate(config.ensemble) for t in s.output_map.values()}
    needs = {i: {producer[t] for t in s.input_map.values() if t in producer} for i, s in enumerate(config.ensemble)}
    done: list[int] = []
    ready = [i for i in needs if not needs[i]]
    while ready:
        i = ready.pop(0)
        done.append(i)
        for j, deps in needs.items():
            if i in deps:
                deps.discard(i)
                if not deps and j not in done and j not in ready:
                    ready.append(j)
    return done


def check_graph(config: ModelConfig) -> None:
    """What can be checked without the composing models: every tensor has one producer, every step
    input and ensemble output is produced, every ensemble input is used, and there is no cycle."""
    name = config.name
    steps = config.ensemble
    if not steps:
        raise _bad(name, "ensemble_scheduling has no step; an ensemble runs at least one model")
    produced: dict[str, str] = {i.name: f"ensemble input '{i.name}'" for i in config.inputs}
    for index, step in enumerate(steps):
        where = _step(index, step)
        if not step.model_name:
            raise _bad(name, f"step {index} has no model_name")
        if step.model_name == name:
            raise _bad(name, f"{where} runs the ensemble itself (a cycle)")
        if step.model_version < -1:
            raise _bad(name, f"{where} has model_version {step.model_version}; use -1 (latest) or a version number")
        if not step.input_map:
            raise _bad(name, f"{where} has an empty input_map: map each of the model's inputs to an ensemble tensor")
        if not step.output_map:
            raise _bad(name, f"{where} has an empty output_map: map the model's outputs to ensemble tensors")
        for tensor in step.output_map.values():
            if tensor in produced:
                raise _bad(name, f"ensemble tensor '{tensor}' is written by {where} and by {produced[tensor]}; "
                                 "each ensemble tensor has exactly one producer")
            produced[tensor] = where
    used: set[str] = set()
    for index, step in enumerate(steps):
        for model_input, tensor in step.input_map.items():
            used.add(tensor)
            if tensor not in produced:
                raise _bad(name, f"{_step(index, step)} maps its input '{model_input}' to ensemble tensor "
                                 f"'{tensor}', which no ensemble input and no step output provides")
    for spec in config.outputs:
        if spec.name not in produced or spec.name in {i.name for i in config.inputs}:
            raise _bad(name, f"ensemble output '{spec.name}' is not mapped from any step's output_map")
    unused = [i.name for i in config.inputs if i.name not in used]
    if unused:
        raise _bad(name, f"ensemble input '{unused[0]}' is not used by any step's input_map")
    ran = order(config)
    if len(ran) != len(steps):
        stuck = [i for i in range(len(steps)) if i not in ran]
        raise _bad(name, "the steps form a cycle: " + ", ".join(_step(i, steps[i]) for i in stuck)
                   + " each wait for a tensor another of them produces")


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _dims(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def check_steps(config: ModelConfig, lookup: Lookup) -> bool:
    """Check every step against its model's configuration: the model serves, the mapped names are
    its inputs and outputs, every required input is mapped, and datatypes, shapes and batching agree
    along every edge. Returns whether a step's model is decoupled (the ensemble then is too)."""
    name = config.name
    # ensemble tensor -> (datatype, dims without batch, where it comes from)
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = {
        i.name: (i.datatype, i.dims, f"ensemble input '{i.name}'") for i in config.inputs}
    decoupled_steps: dict[str, str] = {}  # tensor -> the decoupled step producing it
    any_decoupled = False
    for index in order(config):
        step = config.ensemble[index]
        where = _step(index, step)
        try:
            model = lookup(step.model_name, step.model_version)
        except ServingError as exc:
            raise _bad(name, f"{where} cannot run: {exc.message}") from None
        if config.max_batch_size > 0:
            if model.max_batch_size == 0:
                raise _bad(name, f"the ensemble batches (max_batch_size {config.max_batch_size}) but model "
                                 f"'{model.name}' does not (max_batch_size 0)")
            if model.max_batch_size < config.max_batch_size:
                raise _bad(name, f"ensemble {name} allows maximum batch size {config.max_batch_size}, but it "
                                 f"contains model {model.name} which only allows maximum batch size to be "
                                 f"{model.max_batch_size}")
        elif model.max_batch_size > 0:
            raise _bad(name, f"model '{model.name}' batches (max_batch_size {model.max_batch_size}) but the "
                             "ensemble does not: give the ensemble a max_batch_size > 0")
        for model_input, tensor in step.input_map.items():
            spec = model.input(model_input)
            if spec is None:
                known = ", ".join(f"'{i.name}'" for i in model.inputs)
                raise _bad(name, f"{where} maps '{model_input}', which is not an input of model "
                                 f"'{model.name}' (it has {known})")
            if tensor in decoupled_steps:
                raise _bad(name, f"{where} reads '{tensor}' from {decoupled_steps[tensor]}, whose model is "
                                 "decoupled; only a last step (one whose outputs are ensemble outputs only) "
                                 "may be decoupled")
            _edge(name, tensors[tensor], spec, f"{where} input '{model_input}'", tensor)
        missing = [i.name for i in model.inputs if i.name not in step.input_map and not i.optional]
        if missing:
            raise _bad(name, f"{where} does not map model '{model.name}' input '{missing[0]}' to any ensemble "
                             "tensor (every required input must be in input_map)")
        for model_output, tensor in step.output_map.items():
            spec = model.output(model_output)
            if spec is None:
                known = ", ".join(f"'{o.name}'" for o in model.outputs)
                raise _bad(name, f"{where} maps '{model_output}', which is not an output of model "
                                 f"'{model.name}' (it has {known})")
            tensors[tensor] = (spec.datatype, spec.dims, f"{where} output '{model_output}'")
            if model.decoupled:
                decoupled_steps[tensor] = where
        any_decoupled = any_decoupled or model.decoupled
    for spec in config.outputs:
        datatype, dims, source = tensors[spec.name]
        if datatype != spec.datatype:
            raise _bad(name, f"ensemble output '{spec.name}' is {spec.datatype} in the configuration but "
                             f"{source} produces {datatype}")
        if not _compatible(dims, spec.dims):
            raise _bad(name, f"ensemble output '{spec.name}' has dims {_dims(spec.dims)} in the configuration "
                             f"but {source} produces {_dims(dims)}")
    return any_decoupled


def _edge(ensemble: str, have: tuple[str, tuple[int, ...], str], spec: TensorConfig, consumer: str,
          tensor: str) -> None:
    datatype, dims, source = have
    if datatype != spec.datatype:
        raise _bad(ensemble, f"ensemble tensor '{tensor}' is {datatype} ({source}) but {consumer} expects "
                             f"{spec.datatype}")
    if not _compatible(dims, spec.dims):
        raise _bad(ensemble, f"ensemble tensor '{tensor}' has dims {_dims(dims)} ({source}) but {consumer} "
                             f"expects {_dims(spec.dims)}")
