"""Closed-loop gRPC load generator for KServe v2 ModelInfer (any server speaking the protocol).

Requests are serialized once and sent as bytes, so the client spends its CPU on the transport,
not on protobuf; several client processes can share the concurrency.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass

import grpc
import numpy as np

from server.protos import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


def make_request(model: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        req.inputs.add(name=name, datatype=datatypes[name], shape=list(array.shape))
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return req.SerializeToString()


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


async def _run(url: str, payload: bytes, concurrency: int, seconds: float, warmup: float, channels: int):
    chans = [grpc.aio.insecure_channel(url, options=_OPTIONS) for _ in range(channels)]
    calls = [c.unary_unary(METHOD) for c in chans]  # bytes in, bytes out: no (de)serialization
    latencies: list[float] = []
    errors = [0, ""]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker(i: int) -> None:
        call = calls[i % len(calls)]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await call(payload, timeout=30)
            except grpc.RpcError as exc:
                if t0 >= measure_from:
                    errors[0] += 1
                    errors[1] = errors[1] or f"{exc.code()}: {exc.details()}"
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append((t1 - t0) * 1000)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    for c in chans:
        await c.close()
    return latencies, errors[0], errors[1]


def _proc(url, payload, concurrency, seconds, warmup, channels, out):
    lat, err, first = asyncio.run(_run(url, payload, concurrency, seconds, warmup, channels))
    out.put((lat, err, first))


def run(url: str, payload: bytes, concurrency: int, seconds: float = 10.0, warmup: float = 2.0,
        processes: int = 1, channels: int = 1) -> Result:
    """Drive ``concurrency`` closed loops for ``seconds`` (after ``warmup``) from ``processes`` procs."""
    if processes <= 1:
        lat, err, first = asyncio.run(_run(url, payload, concurrency, seconds, warmup, channels))
    else:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
        procs = [ctx.Process(target=_proc, args=(url, payload, n, seconds, warmup, channels, out))
                 for n in shares if n]
        for p in procs:
            p.start()
        lat, err, first = [], 0, ""
        for _ in procs:
            part = out.get()
            lat += part[0]
            err += part[1]
            first = first or part[2]
        for p in procs:
            p.join()
    return Result(len(lat), err, seconds, np.array(lat), first)
