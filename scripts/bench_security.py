"""Cost of the admission checks (server/security) on the gRPC inference path.

    .venv/bin/python scripts/bench_security.py [--seconds 4] [--concurrency 8] [--rounds 2]

Serves the example ``simple`` model (add/sub of two INT32[16]) with the checks off and on (per-caller
token bucket + concurrency limit + per-model in-flight limit, all set high enough never to refuse),
alternating the two configurations to spread the machine's noise, and prints throughput and latency
from the closed-loop gRPC load generator (scripts/loadgen.py), and the server's CPU time per
request (read from /proc: steadier than req/s on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402

from tests.harness import ServerProcess  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far: steadier than req/s on a shared machine."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

CONFIGS = {
    "security off": [],
    "quotas on": ["--tenant-request-rate=1000000", "--tenant-max-concurrent=100000",
                  "--model-max-inflight=100000"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rng = np.random.default_rng(1)
    inputs = {n: rng.integers(-100, 100, (1, 16)).astype(np.int32) for n in ("INPUT0", "INPUT1")}
    payload = loadgen.make_request("simple", inputs, {"INPUT0": "INT32", "INPUT1": "INT32"})
    results: dict[str, list] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, flags in CONFIGS.items():
                proc = ServerProcess([ROOT / "model_repository"], *flags)
                proc.start(Path(tmp) / "inferd.log")
                try:
                    loadgen.run(proc.grpc_url, payload, args.concurrency, 1.0, warmup=0.0)  # warm-up
                    cpu0 = _cpu_seconds(proc.proc.pid)
                    r = loadgen.run(proc.grpc_url, payload, args.concurrency, args.seconds, warmup=0.0)
                    cpu_us = (_cpu_seconds(proc.proc.pid) - cpu0) / max(1, r.requests + r.errors) * 1e6
                finally:
                    proc.stop()
                if r.errors:
                    raise SystemExit(f"{name}: {r.errors} errors, first: {r.first_error}")
                results[name].append((r, cpu_us))
                print(f"{name:13s} {r.throughput:8.0f} req/s  p50 {r.pct(50):6.2f} ms  "
                      f"p99 {r.pct(99):6.2f} ms  server CPU {cpu_us:5.0f} us/request", flush=True)
    for name, runs in results.items():
        print(f"{name:13s} best {max(r.throughput for r, _ in runs):8.0f} req/s, "
              f"least server CPU {min(c for _, c in runs):5.0f} us/request")


if __name__ == "__main__":
    main()
