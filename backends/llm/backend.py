"""The ``llm`` backend: a Hugging Face causal LM folder served as a decoupled model with Triton's
vLLM-backend tensor conventions (generative.md §3.4), over the continuous-batching engine.

The version folder is the model: ``config.json``, safetensors weights and tokenizer files, loaded
with ``transformers`` from local files only (never the hub; remote code is never run). Inputs:
``text_input`` (STRING [1]), optional ``stream``, ``sampling_parameters`` (a JSON string of vLLM's
SamplingParams names), ``exclude_input_in_output``, ``return_num_input_tokens``,
``return_num_output_tokens``, ``return_finish_reason``, ``return_logprobs``; outputs ``text_output``,
``num_input_tokens``, ``num_output_tokens``, ``finish_reason``, ``logprobs``. Sampling parameters
may also come as request parameters (the generate extension's ``parameters``); the JSON input wins.

Config ``parameters`` (string values): ``max_num_seqs`` (16), ``kv_cache_tokens`` (token budget of
the KV cache; default max_num_seqs x max_model_len), ``max_model_len`` (default: the model's
position limit), ``default_max_tokens`` (16), ``scheduling`` (``continuous`` | ``static``),
``dtype`` (``float32`` | ``float16`` | ``bfloat16`` | ``float64``; default float32), ``cpu_threads``
(intra-op threads of the engine on CPU; default one less than the instance's share of the cores).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from server.core import chat
from server.core.backend import Backend, BackendRequest, LoadContext, ResponseSender
from server.core.errors import ErrorCode, ServingError
from server.core.types import TensorSpec

from .engine import Engine, EngineOptions, StepOutput
from .metrics import EngineMetrics
from .params import SamplingParams, parse

log = logging.getLogger(__name__)

# (name, datatype, dims, optional): the vLLM backend's auto-completed contract
INPUTS = (
    ("text_input", "TYPE_STRING", [1], False),
    ("stream", "TYPE_BOOL", [1], True),
    ("sampling_parameters", "TYPE_STRING", [1], True),
    ("exclude_input_in_output", "TYPE_BOOL", [1], True),
    ("return_finish_reason", "TYPE_BOOL", [1], True),
    ("return_logprobs", "TYPE_BOOL", [1], True),
    ("return_num_input_tokens", "TYPE_BOOL", [1], True),
    ("return_num_output_tokens", "TYPE_BOOL", [1], True),
    # inferd's addition: a JSON list of chat messages, rendered with the tokenizer's chat template
    # (text_input then empty); the OpenAI chat route uses it
    ("messages", "TYPE_STRING", [1], True),
)
OUTPUTS = (
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [-1]),
    ("logprobs", "TYPE_STRING", [-1]),
    ("num_input_tokens", "TYPE_UINT32", [1]),
    ("num_output_tokens", "TYPE_UINT32", [-1]),
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_PARAMETER_KEYS = {"temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "logprobs", "include_stop_str_in_output"}


def _precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def _int_parameter(ctx: LoadContext, key: str, default: int, minimum: int) -> int:
    raw = ctx.config.parameters.get(key, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _precondition(ctx.model_name, f"parameter '{key}' must be an integer, got {raw!r}") from None
    if value < minimum:
        raise _precondition(ctx.model_name, f"parameter '{key}' must be >= {minimum}, got {value}")
    return value


class LLMBackend(Backend):
    decoupled = True

    def __init__(self, engine: Engine, tokenizer, device: torch.device) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.device = device

    # -- configuration ------------------------------------------------------------------------

    @classmethod
    def complete_config(cls, ctx: LoadContext, config: dict) -> dict:
        """Inputs/outputs of the vLLM-backend contract when the config lists none; always decoupled."""
        if not config.get("input"):
            config["input"] = [{"name": n, "data_type": t, "dims": d, "optional": o} for n, t, d, o in INPUTS]
        if not config.get("output"):
            config["output"] = [{"name": n, "data_type": t, "dims": d} for n, t, d in OUTPUTS]
        if int(config.get("max_batch_size") or 0) > 0:
            raise _precondition(ctx.model_name, "the llm backend batches sequences itself (continuous batching): "
                                                "set max_batch_size: 0")
        config.setdefault("model_transaction_policy", {})["decoupled"] = True
        return config

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        def spec(name: str, datatype: str, dims: list[int]) -> TensorSpec:
            return TensorSpec(name, datatype.removeprefix("TYPE_").replace("STRING", "BYTES"), tuple(dims))
        return ([spec(n, t, d) for n, t, d, _ in INPUTS], [spec(n, t, d) for n, t, d in OUTPUTS])

    @classmethod
    def load(cls, ctx: LoadContext) -> LLMBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not ctx.config.decoupled:
            raise _precondition(ctx.model_name, "the llm backend streams tokens: its config needs "
                                                "model_transaction_policy { decoupled: true }")
        folder = ctx.version_path
        if not (folder / "config.json").is_file():
            raise _precondition(ctx.model_name, f"version folder {folder.name}/ has no config.json (it must hold a "
                                                "Hugging Face model: config.json, weights, tokenizer files)")
        dtype_name = ctx.config.parameters.get("dtype", "") or "float32"
        if dtype_name not in _DTYPES:
            raise _precondition(ctx.model_name, f"parameter 'dtype' must be one of {', '.join(_DTYPES)}, "
                                                f"got {dtype_name!r}")
        scheduling = ctx.config.parameters.get("scheduling", "") or "continuous"
        if scheduling not in ("continuous", "static"):
            raise _precondition(ctx.model_name, f"parameter 'scheduling' must be continuous or static, "
                                                f"got {scheduling!r}")
        options = EngineOptions(
            max_num_seqs=_int_parameter(ctx, "max_num_seqs", 16, 1),
            kv_cache_tokens=_int_parameter(ctx, "kv_cache_tokens", 0, 1),
            max_model_len=_int_parameter(ctx, "max_model_len", 0, 1),
            default_max_tokens=_int_parameter(ctx, "default_max_tokens", 16, 1),
            scheduling=scheduling,
            # one core less than the instance's share: the event loop serializes a response per
            # token, and a spinning OpenMP team that loses its core stalls every step (measured on
            # 2 busy cores: a 16-sequence step took 27 ms with 2 threads, 6 ms with 1)
            threads=_int_parameter(ctx, "cpu_threads", max(1, ctx.cpu_threads - 1), 1),
        )
        device = torch.device(ctx.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                         dtype=_DTYPES[dtype_name])
        except (OSError, ValueError, KeyError) as exc:
            raise _precondition(ctx.model_name, f"cannot load the model from {folder.name}/: {exc}") from exc
        model = model.to(device).eval()
        engine = Engine(model, tokenizer, options, device, name=f"{ctx.model_name}_{ctx.instance_index}")
        if options.kv_cache_tokens and options.kv_cache_tokens < 2:
            raise _precondition(ctx.model_name, "parameter 'kv_cache_tokens' is too small")
        engine.start()
        backend = cls(engine, tokenizer, device)
        try:
            backend._warm(ctx)
        except Exception:
            engine.stop()
            raise
        return backend

    def _warm(self, ctx: LoadContext) -> None:
        """One short generation (allocates the cache, first kernels), then the real metrics start."""
        done = threading.Event()
        outcome: list[StepOutput] = []

        def consume(output: StepOutput) -> None:
            if output.finished:
                outcome.append(output)
                done.set()

        prompt = self.tokenizer("warm up")["input_ids"] or [0]
        self.engine.submit("warmup", prompt, SamplingParams(temperature=0.0, max_tokens=2), consume)
        if not done.wait(120) or outcome[0].finish_reason == "error":
            raise _precondition(ctx.model_name, "the warm-up generation failed")
        self.engine.metrics = EngineMetrics(ctx.model_name, str(ctx.version), str(ctx.instance_index),
                                            self.engine.max_model_len)

    def collect_metrics(self) -> Iterable[Any]:
        """The engine's vLLM-named Prometheus families (picked up by server/telemetry/metrics.py)."""
        return self.engine.metrics.collect()

    def close(self) -> None:
        self.engine.stop()
        self.engine.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- requests -----------------------------------------------------------------------------

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        for request in requests:
            try:
                self._start(request)
            except ServingError as exc:
                request.sender.send(error=exc, final=True)

    def _start(self, request: BackendRequest) -> None:
        inputs = request.inputs
        prompt = _text(inputs, "text_input")
        is_chat = "messages" in inputs
        if is_chat:
            if prompt:
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   "give either 'text_input' or 'messages', not both (text_input must be empty)")
            prompt = self._chat_prompt(_text(inputs, "messages"))
        stream = _flag(inputs, request.parameters, "stream", False)
        exclude = _flag(inputs, request.parameters, "exclude_input_in_output", None)
        raw: dict[str, Any] = {k: v for k, v in request.parameters.items() if k in _PARAMETER_KEYS}
        if "sampling_parameters" in inputs:
            text = _text(inputs, "sampling_parameters")
            if text.strip():
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                       f"input 'sampling_parameters' is not valid JSON: {exc}") from None
                if not isinstance(doc, dict):
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, "input 'sampling_parameters' must be a JSON object")
                raw.update(doc)
        params = parse(raw)
        wanted = set(request.outputs)
        if _flag(inputs, request.parameters, "return_logprobs", False) and params.logprobs is None:
            params.logprobs = 0
        reply = _Reply(
            sender=request.sender, tokenizer=self.tokenizer, stream=stream,
            prefix=prompt if not is_chat and (not exclude if exclude is not None else not stream) else "",
            counts_in=_flag(inputs, request.parameters, "return_num_input_tokens", False)
            and "num_input_tokens" in wanted,
            counts_out=_flag(inputs, request.parameters, "return_num_output_tokens", False)
            and "num_output_tokens" in wanted,
            reason=_flag(inputs, request.parameters, "return_finish_reason", False) and "finish_reason" in wanted,
            logprobs=_flag(inputs, request.parameters, "return_logprobs", False) and "logprobs" in wanted,
            text="text_output" in wanted)
        # a chat template writes its own special tokens (BOS); plain text gets the tokenizer's
        ids = self.tokenizer(prompt, add_special_tokens=not (is_chat and self.tokenizer.chat_template))["input_ids"]
        seq = self.engine.submit(request.id, ids, params, reply)
        request.sender.on_cancel(lambda: self.engine.cancel(seq))
        if request.sender.is_cancelled():
            self.engine.cancel(seq)


    def _chat_prompt(self, text: str) -> str:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input 'messages' is not valid JSON: {exc}") from None
        messages = chat.normalize(doc)
        if not self.tokenizer.chat_template:
            return chat.plain_prompt(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"the model's chat template rejected the messages: "
                                                           f"{exc}") from None


def _element(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    array = inputs[name]
    if array.size != 1:
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"input '{name}' must hold exactly one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(inputs: Mapping[str, np.ndarray], name: str) -> str:
    if name not in inputs:
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input '{name}' is required")
    value = _element(inputs, name)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input '{name}' is not valid UTF-8") from None
    return str(value)


def _flag(inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any], name: str,
          default: bool | None) -> bool | None:
    if name in inputs:
        return bool(_element(inputs, name))
    value = parameters.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"parameter '{name}' must be true or false, got {value!r}")
    return value


class _Reply:
    """Turns one sequence's StepOutputs into responses on its sender (runs on the engine thread)."""

    def __init__(self, sender: ResponseSender, tokenizer, stream: bool, prefix: str, counts_in: bool,
                 counts_out: bool, reason: bool, logprobs: bool, text: bool) -> None:
        self.sender = sender
        self.tokenizer = tokenizer
        self.stream = stream
        self.prefix = prefix
        self.counts_in, self.counts_out, self.reason, self.logprobs, self.text = (
            counts_in, counts_out, reason, logprobs, text)
        self.pending_text: list[str] = []
        self.pending_tokens = 0
        self.pending_logprobs: list[dict] = []

    def __call__(self, out: StepOutput) -> None:
        if self.sender.is_cancelled() and not out.finished:
            return
        if out.finished and out.finish_reason == "abort":
            self._send_quietly(error=ServingError(ErrorCode.CANCELLED, "Request was cancelled"))
            return
        if out.finished and out.finish_reason == "error":
            self._send_quietly(error=out.error or ServingError(ErrorCode.INTERNAL, "generation failed"))
            return
        self.pending_text.append(out.text)
        self.pending_tokens += len(out.token_ids)
        if self.logprobs and out.logprobs:
            self.pending_logprobs += [self._logprob_entry(lp) for lp in out.logprobs]
        if not out.finished and (not self.stream or not out.text):
            return  # non-streaming: one response at the end; streaming: only when there is text
        text = self.prefix + "".join(self.pending_text)
        self.prefix = ""
        outputs: dict[str, np.ndarray] = {}
        if self.text:
            outputs["text_output"] = np.array([text.encode("utf-8")], dtype=np.object_)
        if self.counts_in:
            outputs["num_input_tokens"] = np.array([out.num_prompt_tokens], dtype=np.uint32)
        if self.counts_out:
            outputs["num_output_tokens"] = np.array([self.pending_tokens], dtype=np.uint32)
        if self.reason and out.finished:
            outputs["finish_reason"] = np.array([out.finish_reason.encode()], dtype=np.object_)
        if self.logprobs:
            outputs["logprobs"] = np.array([json.dumps(self.pending_logprobs).encode()], dtype=np.object_)
        self.pending_text, self.pending_tokens, self.pending_logprobs = [], 0, []
        parameters = _accounting(out) if out.finished else None
        self._send_quietly(outputs=outputs, final=out.finished, parameters=parameters)

    def _logprob_entry(self, lp) -> dict:
        """vLLM's per-position shape: token id -> {logprob, rank, decoded_token}."""
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                    "decoded_token": self.tokenizer.decode([lp.token_id])}}
        for rank, (token_id, logprob) in enumerate(lp.top, 1):
            entry.setdefault(str(token_id), {"logprob": logprob, "rank": rank,
                                             "decoded_token": self.tokenizer.decode([token_id])})
        return entry

    def _send_quietly(self, outputs=None, final: bool = True, error: ServingError | None = None,
                      parameters=None) -> None:
        try:
            if error is not None:
                self.sender.send(error=error, final=True)
            else:
                self.sender.send(outputs, final=final, parameters=parameters)
        except ServingError as exc:  # the stream is already closed (cancelled): nobody listens
            log.debug("response dropped: %s", exc.message)


def _accounting(out: StepOutput) -> dict[str, Any]:
    """Per-request accounting, as response parameters of the final response (microseconds)."""
    t = out.timing
    first = t.first_token if t.first_token is not None else t.finished
    tpot = ((t.last_token - t.first_token) / (out.num_output_tokens - 1)
            if out.num_output_tokens > 1 and t.first_token is not None and t.last_token is not None else 0.0)
    us = 1e6
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "finish_reason": out.finish_reason or "",
        "queue_time_us": int(t.queue * us),
        "time_to_first_token_us": int(((first or t.arrival) - t.arrival) * us),
        "time_per_output_token_us": int(tpot * us),
        "e2e_time_us": int(((t.finished or t.arrival) - t.arrival) * us),
        "compute_time_us": int(t.compute * us),
        "preemptions": out.preemptions,
    }
