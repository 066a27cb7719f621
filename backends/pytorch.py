"""PyTorch backend: TorchScript (``model.pt``) and torch.export programs (``model.pt2``), CPU or CUDA.

Binding follows Triton's libtorch backend. Inputs, in this order of preference:

1. every configured input name is an argument name of ``forward`` -> passed by argument name
   (a single ``Dict[str, Tensor]`` argument receives all inputs as one dict);
2. every name ends in ``__<index>`` (``INPUT__0``, ``INPUT__1``) -> passed by position;
3. otherwise, when the counts agree, in configuration order.

Outputs: a module that returns a dict is read by key; a tensor, tuple or list by the
``__<index>`` suffix of each configured output name, else in configuration order.

Threads: an instance's intra-op team gets the loader's share of the cores (``cpu_threads``), but
one core less when that share is every core (see ``_default_threads``); the
``INTRA_OP_THREAD_COUNT`` parameter overrides both. The team size is a per-thread OpenMP
setting, but ``torch.set_num_threads`` also writes a process-wide default that every thread
copies at its first parallel op. Each instance therefore applies its count on the thread that
executes it, after that thread's first copy, so several instances and models keep their own
sizes instead of the last one set anywhere in the process.

Config ``parameters`` (Triton's names): ``INTRA_OP_THREAD_COUNT``, ``DISABLE_OPTIMIZED_EXECUTION``
(TorchScript profiling executor off), ``ENABLE_CACHE_CLEANING`` (empty the CUDA cache after
every batch).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from server.core.backend import Backend, LoadContext
from server.core.config import ModelConfig, TensorConfig
from server.core.dtypes import NUMPY_DTYPES
from server.core.errors import ErrorCode, ServingError
from server.core.types import TensorSpec

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_DATATYPES = {v: k for k, v in TORCH_DTYPES.items()}
_INDEXED = re.compile(r"^.+__(\d+)$")
_TRUE = ("1", "true", "yes", "on")


def _precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def _device(requested: str, model: str) -> torch.device:
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _precondition(model, f"instance asks for {requested} but this torch build has no usable CUDA "
                                       f"(torch {torch.__version__}); install a CUDA build of torch or use KIND_CPU")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _precondition(model, f"instance asks for {requested} but torch sees "
                                       f"{torch.cuda.device_count()} GPU(s)")
        return device
    return torch.device("cpu")


def _default_threads(share: int) -> int:
    """The loader's share of the cores, but never every core for one team.

    An OpenMP team waits at each barrier for its slowest member, so when one member is preempted
    by the server's own threads (gRPC, event loop, batching) the whole team stalls, spinning.
    Measured on 2 cores with the mlp at concurrency 64: a 2-thread team burnt ~2.8 ms of CPU per
    inference against ~1.5 ms for a 1-thread team, and served fewer inferences per second.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1) if share >= cores > 1 else share


def _indices(names: Sequence[str]) -> list[int] | None:
    """Positions from ``<name>__<index>`` names, or None unless all names carry a distinct one."""
    matches = [_INDEXED.match(n) for n in names]
    if not names or not all(matches):
        return None
    idx = [int(m.group(1)) for m in matches]
    return idx if len(set(idx)) == len(idx) else None


def _forward_arguments(module: Any, program: Any) -> list[tuple[str, str, bool]]:
    """(name, type text, has default) of forward's arguments, without ``self``."""
    if program is None:
        return [(a.name, str(a.type), a.default_value is not None or "Optional" in str(a.type))
                for a in module.forward.schema.arguments[1:]]
    params = inspect.signature(module.forward).parameters.values()
    return [(p.name, "Tensor", p.default is not inspect.Parameter.empty) for p in params]


def _bind_inputs(config: ModelConfig, arguments: list[tuple[str, str, bool]]) -> tuple[str, list[str | None]]:
    """('dict', names) or ('args', config input name per forward position; None = left out)."""
    model, names = config.name, [i.name for i in config.inputs]
    arg_names = [a[0] for a in arguments]
    if len(arguments) == 1 and arguments[0][1].startswith("Dict[str, Tensor]"):
        return "dict", names
    if all(n in arg_names for n in names):
        by_position: list[str | None] = [n if n in names else None for n in arg_names]
    elif (idx := _indices(names)) is not None:
        if max(idx) >= len(arguments):
            raise _precondition(model, f"input index {max(idx)} is out of range: forward() takes "
                                       f"{len(arguments)} argument(s) ({', '.join(arg_names)})")
        by_position = [None] * len(arguments)
        for name, i in zip(names, idx):
            by_position[i] = name
    elif len(names) == len(arguments):
        by_position = list(names)
    else:
        raise _precondition(
            model, f"cannot bind inputs {names} to forward({', '.join(arg_names)}): name them after the "
                   "forward arguments, or <name>__<index> by position (INPUT__0, INPUT__1, ...)")
    while by_position and by_position[-1] is None and arguments[len(by_position) - 1][2]:
        by_position.pop()  # trailing arguments with defaults are simply not passed
    for i, name in enumerate(by_position):
        if name is None and not arguments[i][2]:
            raise _precondition(model, f"forward() argument '{arg_names[i]}' has no configured input")
    return "args", by_position


def _dims(spec: TensorConfig) -> tuple[int, ...]:
    """The shape the backend sees per batch item: reshape when configured (may be ``()``)."""
    return tuple(spec.reshape) if spec.reshape is not None else tuple(spec.dims)


def _as_host(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hand back the bit patterns
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


class PyTorchBackend(Backend):
    inline = True  # a forward pass is pure compute; only batches measured cheap run inline
    def __init__(self, ctx: LoadContext, module: Any, program: Any, device: torch.device) -> None:
        config = ctx.config
        self._name = ctx.model_name
        self._config = config
        self._module = module
        self._program = program
        self._device = device
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        params = config.parameters
        threads = params.get("INTRA_OP_THREAD_COUNT", "") or str(_default_threads(ctx.cpu_threads))
        if not threads.isdigit() or int(threads) < 1:
            raise _precondition(self._name, f"parameter INTRA_OP_THREAD_COUNT must be a positive integer, "
                                            f"got '{threads}'")
        self._threads = int(threads)
        self._optimized = params.get("DISABLE_OPTIMIZED_EXECUTION", "false").lower() not in _TRUE
        self._clean_cache = self._cuda and params.get("ENABLE_CACHE_CLEANING", "false").lower() in _TRUE
        self._tuned: set[int] = set()
        self._types = {t.name: t.datatype for t in config.inputs + config.outputs}
        self._mode, self._positions = "args", []
        self._out_index: dict[str, int] = {}
        if config.inputs and config.outputs:  # a probe for auto-complete has neither yet
            self._mode, self._positions = _bind_inputs(config, _forward_arguments(module, program))
            log.info("model '%s' (%s, %s): forward arguments <- %s", self._name, ctx.instance_name, device,
                     "one dict" if self._mode == "dict" else self._positions)
            outs = [o.name for o in config.outputs]
            idx = _indices(outs)
            self._out_index = dict(zip(outs, idx if idx is not None else range(len(outs))))

    @classmethod
    def load(cls, ctx: LoadContext) -> PyTorchBackend:
        config = ctx.config
        for spec in config.inputs + config.outputs:
            if spec.datatype == "BYTES":
                raise _precondition(ctx.model_name, f"tensor '{spec.name}' is TYPE_STRING (BYTES), which torch "
                                                    "tensors cannot hold; pre-process strings in a python model")
        device = _device(ctx.device, ctx.model_name)
        path = ctx.model_file
        if not path.is_file():
            raise _precondition(ctx.model_name, f"model file '{path}' does not exist")
        program = None
        try:
            if path.suffix == ".pt2":
                program = torch.export.load(str(path))
                module = program.module().to(device)
            else:
                module = torch.jit.load(str(path), map_location=device)
                module.eval()
        except Exception as exc:
            raise _precondition(ctx.model_name, f"torch could not load '{path}': {type(exc).__name__}: {exc}") from exc
        return cls(ctx, module, program, device)

    # -- auto-complete -----------------------------------------------------------------------

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        if self._program is None:
            raise NotImplementedError(
                "a TorchScript model.pt carries no tensor names, shapes or types; list the inputs and "
                "outputs in config.pbtxt, or serve a torch.export program (model.pt2)")
        program = self._program
        nodes = {n.name: n for n in program.graph.nodes}
        user_in = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        user_out = [s.arg.name for s in program.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
        arg_names = [a[0] for a in _forward_arguments(self._module, program)]
        if len(arg_names) != len(user_in):
            raise NotImplementedError("the program's inputs are not a flat list of tensors")
        spec = program.call_spec.out_spec
        if spec.type is dict:
            out_names = list(spec.context)
        elif spec.type in (tuple, list) or spec.num_leaves == 1:
            out_names = [f"OUTPUT__{i}" for i in range(len(user_out))]
        else:
            raise NotImplementedError(f"the program returns a {spec.type}, not tensors")
        if len(out_names) != len(user_out):
            raise NotImplementedError("the program's outputs are nested; list them in config.pbtxt")

        def describe(name: str, node_name: str) -> TensorSpec:
            value = nodes[node_name].meta.get("val")
            if not isinstance(value, torch.Tensor) or value.dtype not in _DATATYPES:
                raise NotImplementedError(f"tensor '{name}' has no supported tensor type ({value!r})")
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            return TensorSpec(name, _DATATYPES[value.dtype], shape)

        return ([describe(n, node) for n, node in zip(arg_names, user_in)],
                [describe(n, node) for n, node in zip(out_names, user_out)])

    # -- execution ---------------------------------------------------------------------------

    def _to_torch(self, name: str, array: np.ndarray) -> torch.Tensor:
        dtype = TORCH_DTYPES[self._types[name]]
        if self._cuda:
            # stage in pinned host memory so the copy to the GPU is a real async DMA
            host = torch.empty(array.shape, dtype=dtype, pin_memory=True)
            target = _as_host(host)
            np.copyto(target, array.view(target.dtype), casting="no")
            return host.to(self._device, non_blocking=True)
        if not array.flags.writeable:
            # request buffers are read-only views of the wire bytes; a model may write its inputs
            array = array.copy()
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor

    def _outputs(self, result: Any, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(result, dict):
            missing = [n for n in wanted if n not in result]
            if missing:
                raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}' returned a dict without "
                                   f"{missing}; it has {sorted(result)}")
            picked = {n: result[n] for n in wanted}
        else:
            items = list(result) if isinstance(result, (tuple, list)) else [result]
            picked = {}
            for n in wanted:
                i = self._out_index[n]
                if i >= len(items):
                    raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}' returned {len(items)} "
                                       f"output(s); output '{n}' is bound to position {i}")
                picked[n] = items[i]
        for n, t in picked.items():
            if not isinstance(t, torch.Tensor):
                raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}' output '{n}' is a "
                                   f"{type(t).__name__}, not a tensor")
            if _DATATYPES.get(t.dtype) != self._types[n]:
                raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}' output '{n}' is {t.dtype} but "
                                   f"config.pbtxt declares {self._types[n]}")
        return picked

    def _to_numpy(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        if not self._cuda:
            return {n: _as_host(t.contiguous()) for n, t in tensors.items()}
        hosts = {}
        for n, t in tensors.items():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            hosts[n] = host
        self._stream.synchronize()
        if self._clean_cache:
            torch.cuda.empty_cache()
        return {n: _as_host(h) for n, h in hosts.items()}

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        thread = threading.get_ident()
        if thread not in self._tuned:
            # this thread's OpenMP team (see the module docstring); get_num_threads first runs
            # torch's once-per-thread lazy init, which would otherwise later overwrite our count
            # with the process-wide value
            torch.get_num_threads()
            torch.set_num_threads(self._threads)
            self._tuned.add(thread)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self._cuda:
                stack.enter_context(torch.cuda.device(self._device))
                stack.enter_context(torch.cuda.stream(self._stream))
            if self._program is None and not self._optimized:
                stack.enter_context(torch.jit.optimized_execution(False))
            if self._mode == "dict":
                result = self._module({n: self._to_torch(n, a) for n, a in inputs.items()})
            else:
                args = [None if n is None or n not in inputs else self._to_torch(n, inputs[n])
                        for n in self._positions]
                result = self._module(*args)
            return self._to_numpy(self._outputs(result, outputs))

    def memory_bytes(self) -> int | None:
        """On a GPU: what torch's caching allocator has allocated on this instance's device (shared by
        every instance of the process on that device); on CPU: None (the server uses RSS growth)."""
        return torch.cuda.memory_allocated(self._device) if self._cuda else None

    def warmup(self) -> None:
        """Two zero batches of one when every dim is fixed: runs the TorchScript profiling passes
        (and CUDA/cuBLAS initialisation) before the first request instead of during it."""
        config = self._config
        if not config.inputs or any(-1 in _dims(i) for i in config.inputs):
            return
        lead = (1,) if config.max_batch_size > 0 else ()
        feed = {spec.name: np.zeros(lead + _dims(spec), NUMPY_DTYPES[spec.datatype])
                for spec in config.inputs}
        try:
            for _ in range(2):
                self.execute(feed, [o.name for o in config.outputs])
        except Exception as exc:  # the model may reject zeros; real requests will tell
            log.warning("model '%s': warm-up with zero inputs failed (%s: %s)", self._name, type(exc).__name__, exc)

    def close(self) -> None:
        cycles = self._program is not None  # fx modules from torch.export sit in reference cycles
        self._module = None
        self._program = None
        if cycles or self._cuda:
            gc.collect()  # free the weights now, not at some later collection (empty_cache needs that)
        if self._cuda:
            self._stream.synchronize()
            torch.cuda.empty_cache()
