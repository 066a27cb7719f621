"""OpenAI-compatible routes on the HTTP port: ``GET /v1/models`` (and ``/v1/models/{model}``),
``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (server-sent events) and not.

The routes translate only: each choice is one request through the data plane (``dp.stream``) to a
model with Triton's vLLM-backend tensors (``text_input``, ``stream``, ``sampling_parameters``,
``exclude_input_in_output``, ``return_num_*_tokens`` -> ``text_output``, ``num_*_tokens``,
``finish_reason``, ``logprobs``), so any such model serves them, not only the llm backend. Chat
messages go to a model's ``messages`` input when it has one (the llm backend renders them with the
tokenizer's chat template), else through the plain template of server/core/chat.py. Shapes follow
OpenAI's API and Triton's OpenAI frontend (generative.md §3); errors are OpenAI's error object.
A client that disconnects cancels its requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from server.core import chat
from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, InferResponse, ModelMetadata, RequestedOutput, Tensor
from server.dataplane import DataPlane
from server.frontends import identity
from server.frontends.status import http_status

from . import converters
from .routes import Call, Reply

SSE = "text/event-stream; charset=utf-8"
MAX_N = 16
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 501: "invalid_request_error",
                503: "server_error", 504: "server_error"}
_UNSUPPORTED = ("logit_bias", "suffix", "tools", "tool_choice", "functions", "function_call", "response_format")
_VLLM_EXTRAS = ("top_k", "ignore_eos", "stop_token_ids", "include_stop_str_in_output")
_OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens", "finish_reason", "logprobs")


class _Bad(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_reply(status: int, message: str, param: str | None = None, code: str | None = None) -> Reply:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Reply(status, [converters.dumps(body)])


def _from_serving(exc: ServingError) -> Reply:
    code = "model_not_found" if exc.code == ErrorCode.NOT_FOUND else None
    return _error_reply(http_status(exc.code), exc.message, None, code)


# ---------------------------------------------------------------- GET /v1/models


def _llm_like(meta: ModelMetadata) -> bool:
    return any(t.name == "text_input" for t in meta.inputs) and any(t.name == "text_output" for t in meta.outputs)


async def models(dp: DataPlane, call: Call) -> Reply:
    """The ready models that take text (``text_input`` -> ``text_output``)."""
    now = int(time.time())
    data = []
    for name in dp.model_names():
        try:
            meta = dp.model_metadata(name)
        except ServingError:
            continue  # unloaded between the two calls
        if _llm_like(meta):
            data.append({"id": name, "object": "model", "created": now, "owned_by": "inferd"})
    return Reply(200, [converters.dumps({"object": "list", "data": data})])


async def model(dp: DataPlane, call: Call) -> Reply:
    name = call.group("model")
    try:
        meta = dp.model_metadata(name)
    except ServingError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return _error_reply(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _from_serving(exc)
    if not _llm_like(meta):
        return _error_reply(404, f"The model '{name}' does not take text", "model", "model_not_found")
    return Reply(200, [converters.dumps({"id": name, "object": "model", "created": int(time.time()),
                                         "owned_by": "inferd"})])


# ---------------------------------------------------------------- request parsing


def _body(call: Call) -> dict:
    try:
        doc = json.loads(call.body) if call.body.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Bad(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Bad(400, "the request body must be a JSON object")
    return doc


def _number(doc: dict, key: str, low: float, high: float, default: Any = None) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _Bad(400, f"'{key}' must be a number between {low} and {high}, got {value!r}", key)
    return value


def _integer(doc: dict, key: str, low: int, high: int, default: Any = None) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Bad(400, f"'{key}' must be an integer between {low} and {high}, got {value!r}", key)
    return value


class _Job:
    """What one OpenAI request asks for, validated, in the model's terms."""

    def __init__(self, doc: dict, is_chat: bool) -> None:
        self.is_chat = is_chat
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise _Bad(400, "'model' is required (a model name from GET /v1/models)", "model")
        self.model = model
        for key in _UNSUPPORTED:
            if doc.get(key) is not None:
                raise _Bad(400, f"'{key}' is not supported by this server", key)
        for key in ("presence_penalty", "frequency_penalty"):
            if _number(doc, key, -2.0, 2.0, 0.0) != 0:
                raise _Bad(400, f"'{key}' is not supported by this server (only 0)", key)
        if _integer(doc, "best_of", 1, 1, 1) != 1:
            raise _Bad(400, "'best_of' must be 1", "best_of")
        self.stream = doc.get("stream") or False
        if not isinstance(self.stream, bool):
            raise _Bad(400, "'stream' must be true or false", "stream")
        options = doc.get("stream_options")
        if options is not None and not self.stream:
            raise _Bad(400, "`stream_options` can only be used when `stream` is True", "stream_options")
        if options is not None and not isinstance(options, dict):
            raise _Bad(400, "'stream_options' must be an object", "stream_options")
        self.include_usage = bool((options or {}).get("include_usage"))
        self.n = _integer(doc, "n", 1, MAX_N, 1)
        sampling: dict[str, Any] = {}
        max_key = "max_completion_tokens" if is_chat and doc.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(doc, max_key, 1, 2**31 - 1)
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
        temperature = _number(doc, "temperature", 0.0, 2.0)
        if temperature is not None:
            sampling["temperature"] = float(temperature)
        top_p = _number(doc, "top_p", 0.0, 1.0)
        if top_p is not None:
            if top_p == 0:
                raise _Bad(400, "'top_p' must be greater than 0", "top_p")
            sampling["top_p"] = float(top_p)
        self.seed = _integer(doc, "seed", 0, 2**63 - 1)
        stop = doc.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
                raise _Bad(400, "'stop' must be a non-empty string or a list of 1 to 4 of them", "stop")
            sampling["stop"] = stops
        # logprobs: completions take an integer (alternatives per token); chat a bool + top_logprobs
        if is_chat:
            self.logprobs = doc.get("logprobs") or False
            if not isinstance(self.logprobs, bool):
                raise _Bad(400, "'logprobs' must be true or false", "logprobs")
            self.top_logprobs = _integer(doc, "top_logprobs", 0, 20, 0)
            if doc.get("top_logprobs") is not None and not self.logprobs:
                raise _Bad(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        else:
            count = _integer(doc, "logprobs", 0, 5)
            self.logprobs = count is not None
            self.top_logprobs = count or 0
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs
        # vLLM's extra sampling parameters (its OpenAI server accepts them too); the model validates
        for key in _VLLM_EXTRAS:
            if doc.get(key) is not None:
                sampling[key] = doc[key]
        self.sampling = sampling
        if is_chat:
            self.messages = chat.normalize(doc.get("messages"))
            self.prompt = ""
            self.echo = False
        else:
            prompt = doc.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _Bad(400, "'prompt' must be a string (or a list holding one string)", "prompt")
            if not prompt:
                raise _Bad(400, "'prompt' must not be empty", "prompt")
            self.prompt = prompt
            self.echo = bool(doc.get("echo"))

    def requests(self, meta: ModelMetadata) -> list[InferRequest]:
        """One data-plane request per choice (``n``); a seed gives choice i the seed + i."""
        names = {t.name for t in meta.inputs}
        if not _llm_like(meta):
            raise _Bad(400, f"model '{self.model}' does not take text (it has no text_input/text_output)", "model")
        if self.logprobs and "return_logprobs" not in names:
            raise _Bad(400, f"model '{self.model}' cannot report logprobs", "logprobs")
        text, messages = self.prompt, None
        if self.is_chat:
            if "messages" in names:
                messages = json.dumps(self.messages)
            else:
                text = chat.plain_prompt(self.messages)
        out = []
        for i in range(self.n):
            sampling = dict(self.sampling)
            if self.seed is not None:
                sampling["seed"] = (self.seed + i) % 2**63
            tensors = {"text_input": text, "stream": self.stream, "sampling_parameters": json.dumps(sampling),
                       "exclude_input_in_output": not self.echo, "return_num_input_tokens": True,
                       "return_num_output_tokens": True, "return_finish_reason": True,
                       "return_logprobs": self.logprobs, "messages": messages}
            inputs = [_tensor(name, value) for name, value in tensors.items()
                      if value is not None and name in names]
            outputs = [RequestedOutput(name) for name in _OUTPUTS if any(t.name == name for t in meta.outputs)]
            out.append(InferRequest(model_name=self.model, id=f"{uuid.uuid4().hex}-{i}", inputs=inputs,
                                    outputs=outputs))
        return out


def _tensor(name: str, value: str | bool) -> Tensor:
    if isinstance(value, bool):
        return Tensor(name, "BOOL", [1], np.array([value], dtype=np.bool_))
    data = np.empty(1, dtype=np.object_)
    data[0] = value.encode("utf-8")
    return Tensor(name, "BYTES", [1], data)


# ---------------------------------------------------------------- responses


class _Choice:
    """What one choice's responses added up to."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []
        self.parameters: dict[str, Any] = {}

    def add(self, response: InferResponse) -> tuple[str, list[dict]]:
        """Fold one response in; returns its text delta and its logprob entries."""
        delta, entries = "", []
        for tensor in response.outputs:
            value = tensor.data.reshape(-1)[0] if tensor.data.size else None
            if tensor.name == "text_output" and value is not None:
                delta = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
            elif tensor.name == "num_input_tokens" and value is not None:
                self.prompt_tokens = int(value)
            elif tensor.name == "num_output_tokens" and value is not None:
                self.completion_tokens += int(value)  # each response reports the tokens it added
            elif tensor.name == "finish_reason" and value is not None:
                self.finish_reason = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
            elif tensor.name == "logprobs" and value is not None:
                entries = json.loads(value)
        self.text.append(delta)
        self.logprobs += entries
        if response.final:
            self.parameters = dict(response.parameters)
            self.finish_reason = self.finish_reason or "stop"
        return delta, entries


def _usage(choices: list[_Choice]) -> dict:
    prompt = choices[0].prompt_tokens if choices else 0
    completion = sum(c.completion_tokens for c in choices)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    # inferd's per-request accounting (seconds), when the model reports it (the llm backend does)
    timing = [c.parameters for c in choices if "time_to_first_token_us" in c.parameters]
    if timing:
        usage["queue_time"] = max(p.get("queue_time_us", 0) for p in timing) / 1e6
        usage["time_to_first_token"] = max(p.get("time_to_first_token_us", 0) for p in timing) / 1e6
        usage["time_per_output_token"] = max(p.get("time_per_output_token_us", 0) for p in timing) / 1e6
        usage["compute_time"] = sum(p.get("compute_time_us", 0) for p in timing) / 1e6
    return usage


def _ranked(entry: dict) -> tuple[tuple[str, dict], list[tuple[str, dict]]]:
    """(the chosen token's item, the alternatives best first) of one vLLM-style logprobs position."""
    items = list(entry.items())
    return items[0], sorted(items, key=lambda kv: kv[1].get("rank", 0))


def _completion_logprobs(entries: list[dict], top: int, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        (_, chosen), ranked = _ranked(entry)
        tokens.append(chosen["decoded_token"])
        lps.append(chosen["logprob"])
        tops.append({v["decoded_token"]: v["logprob"] for _, v in ranked[:top]} if top else None)
        offsets.append(offset)
        offset += len(chosen["decoded_token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: list[dict], top: int) -> dict:
    content = []
    for entry in entries:
        (_, chosen), ranked = _ranked(entry)

        def item(v: dict) -> dict:
            return {"token": v["decoded_token"], "logprob": v["logprob"],
                    "bytes": list(v["decoded_token"].encode("utf-8"))}

        content.append({**item(chosen), "top_logprobs": [item(v) for _, v in ranked[:top]]})
    return {"content": content}


class _Run:
    """The requests of one OpenAI call in flight: their streams, merged in arrival order."""

    def __init__(self, dp: DataPlane, job: _Job, lookup: identity.Lookup) -> None:
        self.job = job
        try:
            meta = dp.model_metadata(job.model)
        except ServingError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                raise _Bad(404, f"The model '{job.model}' does not exist", "model", "model_not_found") from None
            raise
        self.streams = []
        try:
            for request in job.requests(meta):
                identity.tag(request, lookup)  # caller (cost) and canary routing key, as /infer does
                self.streams.append(dp.stream(request))
        except BaseException:
            self.cancel()
            raise
        self.choices = [_Choice(i) for i in range(len(self.streams))]
        self.id = ("chatcmpl-" if job.is_chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._open = len(self.streams)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()
        for task in getattr(self, "_tasks", ()):
            task.cancel()

    async def _pump(self, index: int) -> None:
        try:
            async for response in self.streams[index]:
                await self._queue.put((index, response))
                if response.error is not None:
                    break
        except ServingError as exc:
            await self._queue.put((index, exc))
        finally:
            await self._queue.put((index, None))

    async def responses(self) -> AsyncIterator[tuple[int, InferResponse]]:
        """(choice index, response) as they come; a failed choice raises its ServingError."""
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.streams))]
        while self._open:
            index, item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, ServingError):
                raise item
            if item.error is not None:
                raise item.error
            yield index, item


async def completions(dp: DataPlane, call: Call) -> Reply:
    return await _serve(dp, call, is_chat=False)


async def chat_completions(dp: DataPlane, call: Call) -> Reply:
    return await _serve(dp, call, is_chat=True)


async def _serve(dp: DataPlane, call: Call, is_chat: bool) -> Reply:
    try:
        job = _Job(_body(call), is_chat)
        run = _Run(dp, job, identity.http_lookup(call.headers))
    except _Bad as exc:
        return _error_reply(exc.status, exc.message, exc.param, exc.code)
    except ServingError as exc:
        return _from_serving(exc)
    if job.stream:
        return await _streamed(run)
    try:
        async for index, response in run.responses():
            run.choices[index].add(response)
    except ServingError as exc:
        run.cancel()
        return _from_serving(exc)
    except BaseException:  # the client went away (handler cancelled): stop generating
        run.cancel()
        raise
    return Reply(200, [converters.dumps(_whole(run))])


def _whole(run: _Run) -> dict:
    job = run.job
    out = []
    for c in run.choices:
        text = "".join(c.text)
        if job.is_chat:
            choice: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": text},
                                      "logprobs": _chat_logprobs(c.logprobs, job.top_logprobs) if job.logprobs else None,
                                      "finish_reason": c.finish_reason}
        else:
            choice = {"index": c.index, "text": text,
                      "logprobs": _completion_logprobs(c.logprobs, job.top_logprobs, len(job.prompt) if job.echo
                                                       else 0) if job.logprobs else None,
                      "finish_reason": c.finish_reason}
        out.append(choice)
    return {"id": run.id, "object": "chat.completion" if job.is_chat else "text_completion",
            "created": run.created, "model": job.model, "system_fingerprint": None, "choices": out,
            "usage": _usage(run.choices)}


async def _streamed(run: _Run) -> Reply:
    """Server-sent events. The first response is awaited before answering, so a request the model
    refuses still gets a plain error status; later failures arrive as an ``error`` event."""
    job = run.job
    kind = "chat.completion.chunk" if job.is_chat else "text_completion"
    responses = run.responses()

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        doc = {"id": run.id, "object": kind, "created": run.created, "model": job.model,
               "system_fingerprint": None, "choices": choices}
        if job.include_usage:
            doc["usage"] = usage
        return b"data: " + converters.dumps(doc) + b"\n\n"

    def piece(index: int, response: InferResponse) -> bytes:
        c = run.choices[index]
        delta, entries = c.add(response)
        finish = c.finish_reason if response.final else None
        if job.is_chat:
            item: dict[str, Any] = {"index": index, "delta": {"content": delta},
                                    "logprobs": _chat_logprobs(entries, job.top_logprobs) if job.logprobs else None,
                                    "finish_reason": finish}
        else:
            item = {"index": index, "text": delta,
                    "logprobs": _completion_logprobs(entries, job.top_logprobs, 0) if job.logprobs else None,
                    "finish_reason": finish}
        return chunk([item])

    try:
        first = await anext(responses, None)
    except ServingError as exc:
        run.cancel()
        return _from_serving(exc)
    except BaseException:
        run.cancel()
        raise

    async def events() -> AsyncIterator[bytes]:
        if job.is_chat:  # the role first, one chunk per choice
            for c in run.choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        try:
            if first is not None:
                yield piece(*first)
            async for index, response in responses:
                yield piece(index, response)
        except ServingError as exc:
            status = http_status(exc.code)
            body = {"error": {"message": exc.message, "type": _ERROR_TYPES.get(status, "server_error"),
                              "param": None, "code": None}}
            yield b"data: " + converters.dumps(body) + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        if job.include_usage:
            yield chunk([], _usage(run.choices))
        yield b"data: [DONE]\n\n"

    return Reply(200, content_type=SSE, events=events(), close=run.cancel)


ROUTES = [
    (r"/v1/models", {"GET": models}),
    (r"/v1/models/(?P<model>[^/]+)", {"GET": model}),
    (r"/v1/completions", {"POST": completions}),
    (r"/v1/chat/completions", {"POST": chat_completions}),
]
