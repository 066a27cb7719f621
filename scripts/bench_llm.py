"""LLM serving benchmark: continuous batching against its baselines, in one run.

    python scripts/bench_llm.py                          # tiny_llm (make models), 1/4/16/32 streams, 2 rounds
    python scripts/bench_llm.py --streams 1 16 --seconds 3 --json out.json

Configurations, all on the same model folder and machine:

  (a) continuous   inferd, llm backend, continuous batching (max_num_seqs 32)
  (b) one-seq      inferd, llm backend, max_num_seqs 1 (one sequence at a time)
  (c) static       inferd, llm backend, static batching: a batch runs to completion before the next
                   is admitted (scheduling "static", max_num_seqs 32)
  (d) generate     plain transformers ``generate()`` in this process, one request at a time

(a)-(c) are driven over HTTP ``generate_stream`` (server-sent events) by closed-loop streams: each of
N concurrent streams sends its next request as soon as the previous one ends. (d) gets the same
closed-loop streams, served one request at a time. The configurations are interleaved, point by
point, for ``--repeat`` rounds, and the best round of each point is reported (on a shared machine
the least disturbed one). Every request comes from a
fixed mix of prompt and output lengths (greedy, ``ignore_eos`` so the lengths hold). Reported per
point: generated tokens/s, time to first token (TTFT) p50/p99 from sending the request, and
inter-token latency (ITL) p50/p99 between successive streamed pieces of one request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
from bench import free_port  # noqa: E402

CACHE = ROOT / ".cache" / "bench_llm"
# (prompt words, output tokens): short chat turns to long completions
MIX = ((8, 16), (40, 48), (90, 96), (20, 32), (60, 64), (12, 128))
WORDS = ["the", "server", "listens", "on", "two", "ports", "clients", "send", "a", "request", "and", "the", "server", "puts", "it", "in", "a", "queue", "a", "worker", "runs", "the", "model", "when", "the", "batch", "is", "ready", "the", "answer", "goes", "back", "over", "the", "same", "connection"]
MODELS = {"continuous": ("continuous", 32), "one-seq": ("continuous", 1), "static": ("static", 32)}
CONFIG = """backend: "llm"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters [
  {{ key: "max_num_seqs" value: {{ string_value: "{seqs}" }} }},
  {{ key: "kv_cache_tokens" value: {{ string_value: "{budget}" }} }},
  {{ key: "scheduling" value: {{ string_value: "{scheduling}" }} }}
]
"""


def prompt_text(i: int) -> tuple[str, int]:
    words, out = MIX[i % len(MIX)]
    start = (i * 7) % len(WORDS)
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(words)), out


@dataclass
class Point:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    requests: int = 0

    def row(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            return float(np.percentile(values, q)) * 1000 if values else float("nan")

        return {"tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0, "requests": self.requests,
                "ttft_p50_ms": pct(self.ttft, 50), "ttft_p99_ms": pct(self.ttft, 99),
                "itl_p50_ms": pct(self.itl, 50), "itl_p99_ms": pct(self.itl, 99)}


# ---------------------------------------------------------------- (a)-(c): inferd over HTTP


def build_repository(model_dir: Path) -> Path:
    repo = CACHE / "repository"
    for name, (scheduling, seqs) in MODELS.items():
        folder = repo / name
        (folder).mkdir(parents=True, exist_ok=True)
        link = folder / "1"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
        budget = 32 * 512  # every sequence of the mix fits: no preemption in the comparison
        (folder / "config.pbtxt").write_text(CONFIG.format(seqs=seqs, budget=budget, scheduling=scheduling))
    return repo


class Server:
    def __init__(self, repo: Path) -> None:
        self.http_port = free_port()
        CACHE.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--host", "127.0.0.1",
                "--grpc-port", str(free_port()), "--http-port", str(self.http_port),
                "--metrics-port", str(free_port())]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=open(CACHE / "server.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"inferd exited: see {CACHE / 'server.log'}")
            try:
                ok = all(urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/models/{m}/ready",
                                                timeout=2).status == 200 for m in MODELS)
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("inferd not ready")

    def stop(self) -> None:
        bench.stop_group(self.proc)


async def _one_http(session, url: str, i: int, point: Point, record: bool) -> None:
    prompt, max_tokens = prompt_text(i)
    body = {"text_input": prompt, "stream": True, "exclude_input_in_output": True,
            "parameters": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}
    sent = time.perf_counter()
    last = None
    tokens = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if record:
                if last is None:
                    point.ttft.append(now - sent)
                else:
                    point.itl.append(now - last)
            last = now
            tokens = event.get("completion_tokens", tokens)
    if record:
        point.tokens += tokens
        point.requests += 1


async def run_http(port: int, model: str, streams: int, seconds: float) -> Point:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/{model}/generate_stream"
    point = Point()
    connector = aiohttp.TCPConnector(limit=streams + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _one_http(session, url, 0, point, record=False)  # warm
        counter = iter(range(10**9))
        start = time.perf_counter()
        deadline = start + seconds

        async def stream() -> None:
            while time.perf_counter() < deadline:
                await _one_http(session, url, next(counter), point, record=True)

        await asyncio.gather(*(stream() for _ in range(streams)))
        point.seconds = time.perf_counter() - start
    return point


# ---------------------------------------------------------------- (d): transformers generate()


class _Times:
    """A generate() streamer that only notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(model, tokenizer, streams: int, seconds: float, threads: int) -> Point:
    import torch

    point = Point()
    lock = threading.Lock()  # one request at a time: the plain-transformers way
    torch.set_num_threads(threads)

    def one(i: int, record: bool) -> None:
        prompt, max_tokens = prompt_text(i)
        ids = tokenizer(prompt, return_tensors="pt")
        sent = time.perf_counter()
        times = _Times()
        with lock, torch.inference_mode():
            torch.set_num_threads(threads)
            model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           streamer=times, pad_token_id=tokenizer.eos_token_id)
        if record and times.times:
            point.ttft.append(times.times[0] - sent)
            point.itl += list(np.diff(times.times))
            point.tokens += len(times.times)
            point.requests += 1

    one(0, record=False)
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def stream() -> None:
        while time.perf_counter() < deadline:
            with counter_lock:
                i = next(counter)
            one(i, record=True)

    workers = [threading.Thread(target=stream) for _ in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    point.seconds = time.perf_counter() - start
    return point


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "tiny_llm" / "1")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring window per point")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best round per point counts")
    parser.add_argument("--configs", nargs="+", default=["continuous", "one-seq", "static", "generate"])
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="torch threads of (d); the server gives its engine the machine's share")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} has no model: run `make models` (scripts/build_llm.py)")
    results: dict[str, dict[int, dict]] = {}
    server = None
    if any(c in MODELS for c in args.configs):
        server = Server(build_repository(args.model))
    model = tokenizer = None
    try:
        if server is not None:
            server.wait_ready()
        if "generate" in args.configs:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        # interleaved rounds: every configuration meets the same drift in machine load; the best
        # round of a point (highest tokens/s) is the least disturbed one
        for round_ in range(args.repeat):
            for n in args.streams:
                for config in args.configs:
                    if config == "generate":
                        point = run_generate(model, tokenizer, n, args.seconds, args.threads)
                    else:
                        point = asyncio.run(run_http(server.http_port, config, n, args.seconds))
                    row = point.row()
                    print(f"[{round_ + 1}/{args.repeat}] {config:>10} {n:>3} streams: {_fmt(row)}", flush=True)
                    best = results.setdefault(config, {}).get(n)
                    if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
                        results[config][n] = row
    finally:
        if server is not None:
            server.stop()
    if args.repeat > 1:
        print("\nbest round per point:")
        for config in args.configs:
            for n in args.streams:
                print(f"{config:>10} {n:>3} streams: {_fmt(results[config][n])}")
    _summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _fmt(row: dict) -> str:
    return (f"{row['tokens_per_s']:8.0f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} ms p99 {row['ttft_p99_ms']:7.1f} ms"
            f"  ITL p50 {row['itl_p50_ms']:6.1f} ms p99 {row['itl_p99_ms']:6.1f} ms  ({row['requests']} requests)")


def _summary(results: dict) -> None:
    cb = results.get("continuous", {})
    if 16 not in cb:
        return
    print("\ntargets at 16 streams:")
    for other, factor in (("generate", 4.0), ("static", 1.5)):
        if 16 in results.get(other, {}):
            ratio = cb[16]["tokens_per_s"] / max(results[other][16]["tokens_per_s"], 1e-9)
            print(f"  continuous / {other} tokens/s = {ratio:.2f}x (target >= {factor}x): "
                  f"{'met' if ratio >= factor else 'MISSED'}")
    if 1 in cb:
        ratio = cb[16]["ttft_p99_ms"] / max(cb[1]["ttft_p99_ms"], 1e-9)
        print(f"  continuous TTFT p99 at 16 / at 1 = {ratio:.2f}x (target <= 3x): {'met' if ratio <= 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
