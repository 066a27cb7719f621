"""Cost per request: queue time, a share of its batch's compute time, memory-seconds and tokens.

Every request carries a ``CostTicket`` from the data plane to the scheduler. When its batch has
executed, the observer splits the batch's measured compute time (input + infer + output, the
``BatchTiming`` of server/scheduling/instances.py) over the members in proportion to their batch
sizes, so the members' compute figures add up to the batch's compute time. Memory-seconds are the
bytes the executing instance held times that compute share. Language models report tokens as the
response parameters ``prompt_tokens`` / ``completion_tokens``; the largest value a request's
responses carry counts (running totals or a figure on the final response both work).

``CostBook`` aggregates finished requests per (model, version, caller) into Prometheus counters.
docs/cost.md has the model and the queries.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

GIB = float(1 << 30)
# the caller label comes from a request header: at most this many distinct callers get their own
# series (the rest count under OVERFLOW), so a client cannot grow the metrics without bound
MAX_CALLERS = 1000
ANONYMOUS, OVERFLOW = "anonymous", "other"
REQUEST_PARAMETER = "inferd_cost"
TOKEN_KINDS = (("prompt_tokens", "prompt"), ("completion_tokens", "completion"))


def process_rss() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CostTicket:
    """One request's cost, filled in as it runs (on the event loop)."""

    __slots__ = ("caller", "want", "queue_ns", "compute_ns", "batch_ns", "batch_size", "memory_bytes",
                 "tokens")

    def __init__(self, caller: str, want: bool) -> None:
        self.caller = caller or ANONYMOUS
        self.want = want  # the request asked for the figures in its response
        self.queue_ns = 0
        self.compute_ns = 0.0
        self.batch_ns = 0  # the compute time of the whole batch it ran in
        self.batch_size = 0
        self.memory_bytes = 0
        self.tokens: dict[str, int] = {}

    @property
    def gib_seconds(self) -> float:
        return self.memory_bytes / GIB * self.compute_ns / 1e9

    def figures(self) -> dict[str, Any]:
        """The response parameters (seconds, bytes, GiB x s, counts)."""
        out: dict[str, Any] = {
            "inferd_cost_queue_seconds": self.queue_ns / 1e9,
            "inferd_cost_compute_seconds": self.compute_ns / 1e9,
            "inferd_cost_batch_compute_seconds": self.batch_ns / 1e9,
            "inferd_cost_batch_size": self.batch_size,
            "inferd_cost_memory_bytes": self.memory_bytes,
            "inferd_cost_memory_gib_seconds": self.gib_seconds,
        }
        for kind, count in self.tokens.items():
            out[f"inferd_cost_{kind}_tokens"] = count
        return out


def split(members: Any, total_ns: int, memory_bytes: int) -> None:
    """Share a batch's compute time among its members (``Pending``s) by batch size."""
    sizes = sum(p.size for p in members) or 1
    for p in members:
        ticket = p.cost
        if ticket is None:
            continue
        ticket.compute_ns = total_ns * p.size / sizes
        ticket.batch_ns = total_ns
        ticket.batch_size = sizes
        ticket.memory_bytes = memory_bytes
        ticket.queue_ns = max(0, p.started_ns - p.arrived_ns)


def tokens(ticket: CostTicket, parameters: Any) -> None:
    """Take the token counts a language model put in a response's parameters."""
    for key, kind in TOKEN_KINDS:
        value = parameters.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > ticket.tokens.get(kind, 0):
            ticket.tokens[kind] = value


class CostBook(Collector):
    """Cost counters per (model, version, caller); updated on the loop, read at scrape time."""

    def __init__(self) -> None:
        # (model, version, caller) -> [compute s, GiB x s, prompt tokens, completion tokens, queue s]
        self._rows: dict[tuple[str, int, str], list[float]] = {}
        self._callers: set[str] = set()

    def add(self, model: str, version: int, ticket: CostTicket) -> None:
        caller = ticket.caller
        if caller not in self._callers:
            if len(self._callers) >= MAX_CALLERS:
                caller = OVERFLOW
            else:
                self._callers.add(caller)
        key = (model, version, caller)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = [0.0, 0.0, 0, 0, 0.0]
        row[0] += ticket.compute_ns / 1e9
        row[1] += ticket.gib_seconds
        row[2] += ticket.tokens.get("prompt", 0)
        row[3] += ticket.tokens.get("completion", 0)
        row[4] += ticket.queue_ns / 1e9

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "caller"]
        compute = CounterMetricFamily("inferd_cost_compute_seconds", "Compute time attributed to requests "
                                      "(their share of each batch's compute time, by batch size)", labels=labels)
        memory = CounterMetricFamily("inferd_cost_memory_gib_seconds", "Memory held by the executing instance "
                                     "times the request's compute time, in GiB x seconds", labels=labels)
        queued = CounterMetricFamily("inferd_cost_queue_seconds", "Time requests waited in the scheduler's queue "
                                     "before their batch ran", labels=labels)
        tokens_family = CounterMetricFamily("inferd_cost_tokens", "Tokens language models reported "
                                            "(prompt_tokens / completion_tokens response parameters)",
                                            labels=labels + ["kind"])
        for (model, version, caller), (seconds, gib_s, prompt, completion, queue_s) in sorted(self._rows.items()):
            v = str(version)
            compute.add_metric([model, v, caller], seconds)
            memory.add_metric([model, v, caller], gib_s)
            queued.add_metric([model, v, caller], queue_s)
            tokens_family.add_metric([model, v, caller, "prompt"], prompt)
            tokens_family.add_metric([model, v, caller, "completion"], completion)
        yield compute
        yield memory
        yield queued
        yield tokens_family
