"""The generation engine: continuous (iteration-level) batching over a slot KV cache, one thread.

Each iteration of the engine thread:

1. takes new requests into the ``waiting`` queue and drops cancelled sequences (their KV slots
   are freed at once);
2. admits waiting sequences, oldest first, while ``len(running) < max_num_seqs`` and their tokens
   fit the KV-cache token budget, and prefills each one (its prompt, plus for a preempted sequence
   the tokens it already generated), which yields its next token;
3. runs one batched decode step for every running sequence: the last token of each, at its own
   position, against its own cache rows (4-D attention mask, explicit position ids). Before the
   step, if the budget cannot hold one more token per sequence, the most recently admitted
   sequence is preempted: its cache is freed and it goes back to the front of ``waiting``; it is
   recomputed later and continues where it stopped, so no token is sent twice or lost;
4. samples, detokenizes and hands each sequence's new text to its consumer; finished sequences
   free their slots immediately.

New requests therefore join between two decode steps; nobody waits for a long request to finish.
With ``scheduling="static"`` the engine is the classic request-level batcher the benchmark compares
against: admission only into an empty batch, and the batch's rows run together until its longest
member ends, as a padded ``generate()`` batch does (a member that finishes gets its answer at once,
but its row keeps being computed, its tokens discarded, until the batch ends).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.core.errors import ErrorCode, ServingError

from .detok import ByteDetokenizer, Detokenizer, StopText, byte_table
from .kvcache import SlotCache
from .metrics import EngineMetrics
from .params import SamplingParams
from .sampler import TokenLogprobs, logprobs, sample

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(slots=True)
class EngineOptions:
    max_num_seqs: int = 16
    kv_cache_tokens: int = 0  # token budget of the cache; 0: max_num_seqs * max_model_len
    max_model_len: int = 0  # prompt + generated tokens per sequence; 0: the model's position limit
    scheduling: str = "continuous"  # or "static"
    default_max_tokens: int = 16
    threads: int = 1  # intra-op threads of the engine thread (CPU)


@dataclass(slots=True)
class Timing:
    """Monotonic seconds of one request's milestones, and its share of compute."""

    arrival: float
    scheduled: float | None = None  # first prefill started (leaves the queue)
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    compute: float = 0.0  # sum over the forwards it took part in of duration / rows in that forward

    @property
    def queue(self) -> float:
        return (self.scheduled or self.arrival) - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one sequence. ``text`` is whole characters (possibly empty)."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including this step's tokens
    logprobs: list[TokenLogprobs] | None
    timing: Timing
    preemptions: int
    error: ServingError | None = None  # set with finish_reason "error"


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    consumer: Callable[[StepOutput], None]
    detok: Detokenizer | ByteDetokenizer
    stop_text: StopText
    generator: torch.Generator | None
    timing: Timing
    output_ids: list[int] = field(default_factory=list)
    status: str = WAITING
    slot: int = -1
    cached: int = 0  # tokens whose keys/values are in the cache
    preemptions: int = 0
    cancelled: bool = False
    counted_prompt: bool = False
    ghost: bool = False  # static scheduling: finished, its row computed on until the batch ends

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def cancel(self) -> None:
        """Callable from any thread; the engine frees the sequence at its next iteration."""
        self.cancelled = True


class Engine:
    """Runs one causal LM for many concurrent sequences on one thread (see the module docstring)."""

    def __init__(self, model, tokenizer, options: EngineOptions, device: torch.device,
                 metrics: EngineMetrics | None = None, name: str = "llm") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.device = device
        self.name = name
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.max_model_len = min(options.max_model_len or limit, limit)
        self.max_num_seqs = options.max_num_seqs
        self.budget = options.kv_cache_tokens or self.max_num_seqs * self.max_model_len
        if options.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {options.scheduling!r}")
        self.eos_ids = _eos_ids(model, tokenizer)
        self._bytes = byte_table(tokenizer)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.metrics = metrics or EngineMetrics(name, "1", "0", self.max_model_len)
        self.cache = SlotCache(self.max_num_seqs, self.max_model_len + 1, device)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.slots: list[Sequence] = []  # slot order: row i of a decode step is slots[i]
        self.used = 0  # cached tokens of all running sequences
        self._inbox: list[Sequence] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._default_generator = torch.Generator(device=device)
        self._default_generator.seed()
        self._logits_to_keep = "logits_to_keep" in _forward_args(model)
        self.steps = 0

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llm-engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               consumer: Callable[[StepOutput], None], arrival: float | None = None) -> Sequence:
        """Queue a request; INVALID_ARGUMENT when it cannot fit. ``consumer`` is called on the engine
        thread with every step's output, the last one with ``finished=True``."""
        max_tokens = params.max_tokens or min(self.options.default_max_tokens,
                                              max(1, self.max_model_len - len(prompt_ids)))
        self.check_fits(len(prompt_ids), max_tokens)
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"stop_token_ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        elif not params.greedy:
            generator = self._default_generator
        seq = Sequence(request_id, list(prompt_ids), params, max_tokens, consumer,
                       ByteDetokenizer(self._bytes) if self._bytes is not None
                       else Detokenizer(self.tokenizer, prompt_ids),
                       StopText(params.stop, params.include_stop_str_in_output), generator,
                       Timing(arrival if arrival is not None else time.monotonic()))
        with self._cond:
            if self._stop:
                raise ServingError(ErrorCode.UNAVAILABLE, "the model is shutting down")
            self._inbox.append(seq)
            self._cond.notify()
        return seq

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = min(self.max_model_len, self.budget)
        if prompt_tokens < 1:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, "the prompt is empty (0 tokens)")
        if prompt_tokens + max_tokens > limit:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} "
                f"tokens exceeds this model's limit of {limit} tokens per request "
                f"(max_model_len {self.max_model_len}, KV cache budget {self.budget} tokens)")

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._cond:
            self._cond.notify()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.get_num_threads()  # this thread's lazy init first, then its own team size
            torch.set_num_threads(max(1, self.options.threads))
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stop or self._inbox or self.waiting or self.running):
                        self._cond.wait()
                    if self._stop:
                        break
                    inbox, self._inbox = self._inbox, []
                self.waiting.extend(inbox)
                try:
                    self.step()
                except Exception as exc:  # a failed forward ends the sequences it touched, not the engine
                    log.exception("LLM engine step failed")
                    self._fail_all(ServingError(ErrorCode.INTERNAL, f"generation failed: {exc}"))
        self._fail_all(ServingError(ErrorCode.UNAVAILABLE, "the model was unloaded while generating"))

    def step(self) -> None:
        """One iteration: reap cancelled, admit + prefill, one batched decode step."""
        self._reap_cancelled()
        self._admit()
        if self.running:
            self._decode()
        self._publish()
        self.steps += 1

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled and not s.ghost]:
            self._finish(seq, "abort")
        if any(s.cancelled for s in self.waiting):
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "abort")

    def _admit(self) -> None:
        if self.options.scheduling == "static" and self.running:
            return
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # its tokens, plus room for one decode step of everybody running after it
            if self.used + seq.num_tokens + len(self.running) + 1 > self.budget and self.running:
                break
            self.waiting.popleft()
            self._prefill(seq)

    def _prefill(self, seq: Sequence) -> None:
        now = time.monotonic()
        if seq.timing.scheduled is None:
            seq.timing.scheduled = now
            with self.metrics.lock:
                self.metrics.queue.observe(now - seq.timing.arrival)
        seq.slot = len(self.slots)
        self.slots.append(seq)
        self.running.append(seq)
        seq.status = RUNNING
        # a preempted sequence recomputes its prompt and everything it generated
        ids = seq.prompt_ids + seq.output_ids
        n = len(ids)
        self.cache.bind_prefill(seq.slot, 0, n)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        mask = _causal_mask(n, self._dtype(), self.device)
        started = time.perf_counter()
        logits = self._forward(torch.tensor([ids], device=self.device), positions, mask)
        seq.cached = n
        self.used += n
        self._publish()  # the gauges move as the batch changes, not a step later
        if not seq.counted_prompt:
            seq.counted_prompt = True
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(seq.prompt_ids)
        self._emit([seq], logits, time.perf_counter() - started)

    def _decode(self) -> None:
        if self.options.scheduling == "static":
            for seq in [s for s in self.running if s.ghost and s.cached + 1 >= self.cache.max_len]:
                self._release(seq)
            if all(s.ghost for s in self.running):
                for seq in list(self.running):
                    self._release(seq)
                return
        while self.used + len(self.running) > self.budget and len(self.running) > 1:
            victim = self.running[-1]
            if victim.ghost:
                self._release(victim)
            else:
                self._preempt(victim)
        rows = self.slots
        n = len(rows)
        positions = torch.tensor([s.cached for s in rows], device=self.device)
        kv_len = int(max(s.cached for s in rows)) + 1
        self.cache.bind_decode(n, positions, kv_len)
        allowed = torch.arange(kv_len, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
        mask = torch.zeros((n, 1, 1, kv_len), dtype=self._dtype(), device=self.device)
        mask.masked_fill_(~allowed[:, None, None, :], torch.finfo(mask.dtype).min)
        ids = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)
        started = time.perf_counter()
        logits = self._forward(ids, positions.unsqueeze(1), mask)
        for s in rows:
            s.cached += 1
        self.used += n
        seconds = time.perf_counter() - started
        live = [i for i, s in enumerate(rows) if not s.ghost]
        if len(live) == n:
            self._emit(list(rows), logits, seconds)
        else:
            self._emit([rows[i] for i in live], logits[live], seconds * len(live) / n)
        if self.options.scheduling == "static" and all(s.ghost for s in self.running):
            for seq in list(self.running):
                self._release(seq)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        cache_position = torch.arange(ids.shape[1], device=self.device)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=self.cache,
                         use_cache=True, cache_position=cache_position, **kwargs)
        return out.logits[:, -1, :]

    def _emit(self, rows: list[Sequence], logits: torch.Tensor, seconds: float) -> None:
        """Sample the next token of each row, account, detokenize, call consumers, retire finished."""
        tokens = sample(logits, [s.params for s in rows], [s.generator for s in rows])
        wanted = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        lps = dict(zip(wanted, logprobs(logits, wanted, [tokens[i] for i in wanted],
                                        [rows[i].params.logprobs for i in wanted]))) if wanted else {}
        now = time.monotonic()
        share = seconds / len(rows)
        with self.metrics.lock:
            self.metrics.generation_tokens += len(rows)
            for seq in rows:
                if seq.timing.first_token is None:
                    self.metrics.ttft.observe(now - seq.timing.arrival)
                else:
                    self.metrics.itl.observe(now - seq.timing.last_token)
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            timing = seq.timing
            timing.compute += share
            if timing.first_token is None:
                timing.first_token = now
            timing.last_token = now
            seq.output_ids.append(token)
            reason = None
            text = ""
            hit_stop_string = False
            if token in seq.params.stop_token_ids or (token in self.eos_ids and not seq.params.ignore_eos):
                reason = "stop"
            else:
                text, hit_stop_string = seq.stop_text.add(seq.detok.add(token))
                if hit_stop_string:
                    reason = "stop"
            if reason is None and (len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
                reason = "length"
            if reason is not None:
                if not hit_stop_string:  # whatever was held back (a partial character, a stop-string prefix)
                    text += seq.stop_text.add(seq.detok.flush())[0]
                text += seq.stop_text.finish()
                self._finish(seq, reason, text, [token], lps.get(i))
            else:
                self._deliver(seq, StepOutput(text, [token], False, None, len(seq.prompt_ids), len(seq.output_ids),
                                              [lps[i]] if i in lps else None, timing, seq.preemptions))

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_ids: list[int] | None = None,
                lp: TokenLogprobs | None = None) -> None:
        if (self.options.scheduling == "static" and reason in ("stop", "length") and seq.slot >= 0
                and any(not s.ghost and s is not seq for s in self.running)):
            seq.ghost = True  # keeps its row until the batch ends
        else:
            self._release(seq)
        seq.status = FINISHED
        now = time.monotonic()
        seq.timing.finished = now
        with self.metrics.lock:
            self.metrics.success[reason] = self.metrics.success.get(reason, 0) + 1
            if reason != "abort":
                self.metrics.e2e.observe(now - seq.timing.arrival)
                self.metrics.prompt_hist.observe(len(seq.prompt_ids))
                self.metrics.generation_hist.observe(len(seq.output_ids))
        self._deliver(seq, StepOutput(text, token_ids or [], True, reason, len(seq.prompt_ids), len(seq.output_ids),
                                      [lp] if lp is not None else None, seq.timing, seq.preemptions))

    def _deliver(self, seq: Sequence, output: StepOutput) -> None:
        try:
            seq.consumer(output)
        except Exception:  # a consumer's bug must not stop the other sequences
            log.exception("consumer of sequence %s failed; cancelling it", seq.id)
            seq.cancelled = True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        with self.metrics.lock:
            self.metrics.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's slot at once; the last slot moves into the hole (rows stay dense)."""
        if seq.slot < 0:
            return
        self.running.remove(seq)
        last = self.slots.pop()
        if last is not seq:
            self.cache.move(last.slot, seq.slot, last.cached)
            last.slot = seq.slot
            self.slots[seq.slot] = last
        self.used -= seq.cached
        seq.cached = 0
        seq.slot = -1
        self._publish()

    def _publish(self) -> None:
        with self.metrics.lock:
            self.metrics.running = sum(1 for s in self.running if not s.ghost)
            self.metrics.waiting = len(self.waiting) + len(self._inbox)
            self.metrics.kv_usage = self.used / self.budget

    def _fail_all(self, error: ServingError) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for seq in [s for s in self.running if s.ghost]:
            self._release(seq)
        failed = list(self.running) + list(self.waiting) + inbox
        for seq in failed:
            self._release(seq)
            seq.status = FINISHED
            self._deliver(seq, StepOutput("", [], True, "error", len(seq.prompt_ids), len(seq.output_ids), None,
                                          seq.timing, seq.preemptions, error))
        self.waiting.clear()
        with self.metrics.lock:
            self.metrics.success["error"] += len(failed)
        self._publish()

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
