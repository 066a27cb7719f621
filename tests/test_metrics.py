"""The Prometheus endpoint: scraped for real during and after gRPC traffic, parsed with prometheus_client.

Checks Triton's names, types and labels, that counters equal what the clients saw and what the
ModelStatistics RPC reports, that every scrape is internally consistent while traffic runs, the
failure reasons, the pending gauge, and the histograms' buckets, counts and sums.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server.telemetry.metrics import Metrics
from tests.harness import ServerProcess

TRITON_COUNTERS = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
HISTOGRAMS = ("inferd_request_duration_seconds", "inferd_queue_duration_seconds",
              "inferd_compute_duration_seconds", "inferd_batch_size")
REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

# batches up to 8, one instance; waits up to 60 s for a full batch, so requests stay queued (pending)
# until the test fills the batch; per-request timeouts allowed (REJECTED failures)
DELAYED_CONFIG = """
max_batch_size: 8
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching {
  max_queue_delay_microseconds: 60000000
  default_queue_policy { allow_timeout_override: true }
}
"""
# Reshape [batch, n] -> [batch, n/3, 3]: ONNX Runtime fails at execution when n % 3 != 0 (BACKEND)
RESHAPE_CONFIG = """
max_batch_size: 8
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { }
"""


def _reshape3(path: Path) -> None:
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "m", 3])
    shape = numpy_helper.from_array(np.array([0, -1, 3], np.int64), "shape")
    node = helper.make_node("Reshape", ["INPUT0", "shape"], ["OUTPUT0"])
    model = helper.make_model(helper.make_graph([node], "reshape3", [x], [y], [shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def metrics_server(example_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics_models")
    onnx_models.identity(repo / "delayed" / "1" / "model.onnx", "FP32")
    (repo / "delayed" / "config.pbtxt").write_text(DELAYED_CONFIG)
    _reshape3(repo / "reshape3" / "1" / "model.onnx")
    (repo / "reshape3" / "config.pbtxt").write_text(RESHAPE_CONFIG)
    proc = ServerProcess([example_repo, repo], "--model-control-mode=explicit", "--load-model=*")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-metrics.log")
    yield proc
    proc.stop()


# ---------------------------------------------------------------- scraping


class Scrape:
    """One parsed scrape: samples by (sample name, labels), and the families' types."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """A counter by Triton's name (the parser files counter samples under ``<name>_total``)."""
        key = name + "_total" if self.types.get(name) == "counter" else name
        return self.samples[(key, frozenset(labels.items()))]

    def labelsets(self, sample: str) -> list[dict[str, str]]:
        return [dict(labels) for name, labels in self.samples if name == sample]

    def buckets(self, family: str, model: str) -> list[tuple[float, float]]:
        out = [(float(labels["le"]), v) for (name, fs), v in self.samples.items()
               if name == family + "_bucket" and (labels := dict(fs))["model"] == model]
        return sorted(out)


def scrape(server) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(response.read().decode())


def poll(server, condition, what: str, timeout: float = 15.0) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(server)
        if condition(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{s.text}")
        time.sleep(0.02)


def check_consistent(s: Scrape, model: str) -> None:
    """What must hold within any single scrape, even mid-traffic."""
    v = {"model": model, "version": "1"}
    success = s.get("nv_inference_request_success", **v)
    execs = s.get("nv_inference_exec_count", **v)
    for family in HISTOGRAMS:
        buckets = s.buckets(family, model)
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{family} buckets not cumulative: {buckets}"
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == s.get(family + "_count", **v)
    assert s.get("inferd_request_duration_seconds_count", **v) == success
    assert s.get("inferd_queue_duration_seconds_count", **v) == success
    assert s.get("inferd_compute_duration_seconds_count", **v) == execs
    assert s.get("inferd_batch_size_count", **v) == execs
    assert s.get("inferd_batch_size_sum", **v) == s.get("nv_inference_count", **v)
    # the histogram sums shadow Triton's microsecond counters (these truncate to whole microseconds)
    assert s.get("inferd_request_duration_seconds_sum", **v) * 1e6 == pytest.approx(
        s.get("nv_inference_request_duration_us", **v), abs=1.0)
    assert s.get("inferd_queue_duration_seconds_sum", **v) * 1e6 == pytest.approx(
        s.get("nv_inference_queue_duration_us", **v), abs=1.0)


def infer_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, list(array.shape), "FP32")
    x.set_data_from_numpy(array)
    return x


# ---------------------------------------------------------------- tests


def test_counters_and_histograms_follow_traffic(metrics_server):
    """Concurrent traffic on dense (batched) and reshape3 (some requests fail in the backend)."""
    client = grpcclient.InferenceServerClient(metrics_server.grpc_url)
    jobs = []  # (model, batch, n): reshape3 fails for n == 4
    for i in range(160):
        jobs.append(("dense", 1 + i % 4, 4))
        if i % 4 == 0:
            jobs.append(("reshape3", 1 + i % 2, 6 if i % 8 else 4))

    def one(job):
        model, batch, n = job
        name = "INPUT" if model == "dense" else "INPUT0"
        try:
            client.infer(model, [infer_input(name, np.ones((batch, n), np.float32))])
            return True
        except InferenceServerException as exc:
            assert model == "reshape3" and n == 4, exc
            return False

    scrapes: list[Scrape] = []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        while not all(f.done() for f in futures):
            scrapes.append(scrape(metrics_server))
        ok = [f.result() for f in futures]
    after = scrape(metrics_server)

    total = sum(j[0] == "dense" for j in jobs)
    progress = [s.get("nv_inference_request_success", model="dense", version="1") for s in scrapes]
    mid = [n for n in progress if 0 < n < total]
    assert mid, "no scrape landed while the traffic ran"
    previous = None
    for s in scrapes + [after]:
        for model in ("dense", "reshape3"):
            check_consistent(s, model)
        if previous is not None:  # counters never go back
            for (name, labels), value in previous.samples.items():
                if name.endswith("_total"):
                    assert s.samples[(name, labels)] >= value, name
        previous = s

    for model in ("dense", "reshape3"):
        v = {"model": model, "version": "1"}
        sent = [(j, r) for j, r in zip(jobs, ok) if j[0] == model]
        successes = sum(r for _, r in sent)
        assert after.get("nv_inference_request_success", **v) == successes
        assert after.get("nv_inference_request_failure", reason="BACKEND", **v) == len(sent) - successes
        for reason in ("REJECTED", "CANCELED", "OTHER"):
            assert after.get("nv_inference_request_failure", reason=reason, **v) == 0
        assert after.get("nv_inference_count", **v) == sum(j[1] for j, r in sent if r)
        assert 0 < after.get("nv_inference_exec_count", **v) <= successes
        assert after.get("nv_inference_pending_request_count", **v) == 0
        # the statistics extension reports the same numbers
        stats = client.get_inference_statistics(model, "1").model_stats[0]
        inference = stats.inference_stats
        assert after.get("nv_inference_request_success", **v) == inference.success.count
        assert sum(after.get("nv_inference_request_failure", reason=r, **v) for r in REASONS) \
            == inference.fail.count
        assert after.get("nv_inference_count", **v) == stats.inference_count
        assert after.get("nv_inference_exec_count", **v) == stats.execution_count
        assert after.get("nv_inference_request_duration_us", **v) == inference.success.ns // 1000
        assert after.get("nv_inference_queue_duration_us", **v) == inference.queue.ns // 1000
        for part in ("input", "infer", "output"):
            assert after.get(f"nv_inference_compute_{part}_duration_us", **v) \
                == getattr(inference, f"compute_{part}").ns // 1000
    assert sum(ok) < len(jobs), "the traffic was meant to include backend failures"
    # dense's dynamic batcher merged concurrent requests at least once
    assert after.get("nv_inference_exec_count", model="dense", version="1") < total
    client.close()


def test_pending_gauge_and_failure_reasons(metrics_server):
    """Requests wait in 'delayed' until a batch of 8 fills: pending, CANCELED, REJECTED, then success."""
    client = grpcclient.InferenceServerClient(metrics_server.grpc_url)
    v = {"model": "delayed", "version": "1"}
    results: dict[int, object] = {}
    done = threading.Event()

    def send(i: int):
        def callback(result, error, i=i):
            results[i] = error if error is not None else result
            if len(results) == 9:
                done.set()
        x = infer_input("INPUT0", np.full((1, 4), i, np.float32))
        return client.async_infer("delayed", [x], callback)

    calls = [send(i) for i in range(3)]
    poll(metrics_server, lambda s: s.get("nv_inference_pending_request_count", **v) == 3, "3 pending")

    calls[2].cancel()  # a queued request whose client gives up
    s = poll(metrics_server, lambda s: s.get("nv_inference_request_failure", reason="CANCELED", **v) == 1,
             "the cancellation to be counted")
    assert s.get("nv_inference_pending_request_count", **v) == 2

    with pytest.raises(InferenceServerException, match="timeout"):  # 50 ms in a queue that waits 60 s
        client.infer("delayed", [infer_input("INPUT0", np.zeros((1, 4), np.float32))], timeout=50_000)
    s = scrape(metrics_server)
    assert s.get("nv_inference_request_failure", reason="REJECTED", **v) == 1
    assert s.get("nv_inference_pending_request_count", **v) == 2
    assert s.get("nv_inference_request_success", **v) == 0
    check_consistent(s, "delayed")

    calls += [send(i) for i in range(3, 9)]  # 2 queued + 6 = a full batch of 8: it runs at once
    assert done.wait(30), f"only {len(results)} of 9 callbacks came back"
    assert isinstance(results[2], InferenceServerException)
    assert all(isinstance(results[i], grpcclient.InferResult) for i in range(9) if i != 2)

    s = poll(metrics_server, lambda s: s.get("nv_inference_request_success", **v) == 8, "8 successes")
    check_consistent(s, "delayed")
    assert s.get("nv_inference_pending_request_count", **v) == 0
    assert s.get("nv_inference_exec_count", **v) == 1
    assert s.get("nv_inference_count", **v) == 8
    assert s.get("nv_inference_request_failure", reason="BACKEND", **v) == 0
    assert s.get("nv_inference_request_failure", reason="OTHER", **v) == 0
    # one batch of 8: in the le=8 bucket, not in le=4
    assert dict(s.buckets("inferd_batch_size", "delayed"))[4.0] == 0
    assert dict(s.buckets("inferd_batch_size", "delayed"))[8.0] == 1
    # requests 0 and 1 were queued before the 50 ms rejection started and stayed until the batch ran
    assert s.get("inferd_queue_duration_seconds_sum", **v) > 2 * 0.05
    stats = client.get_inference_statistics("delayed", "1").model_stats[0]
    assert stats.inference_stats.fail.count == 2 and stats.inference_stats.success.count == 8
    client.close()


def test_exposition_uses_tritons_names_types_and_labels(metrics_server):
    s = scrape(metrics_server)
    for name in TRITON_COUNTERS:
        assert s.types[name] == "counter"
        # Triton's names exactly: no "_total" suffix, declared under the same name as the samples
        assert f"# TYPE {name} counter\n" in s.text
        assert re.search(rf'^{name}{{model="simple",(reason="OTHER",)?version="1"}} \d', s.text, re.MULTILINE)
        assert f"{name}_total" not in s.text
        expected = {"model", "version"} | ({"reason"} if name == "nv_inference_request_failure" else set())
        assert all(set(labels) == expected for labels in s.labelsets(name + "_total"))
    failure_reasons = {labels["reason"] for labels in s.labelsets("nv_inference_request_failure_total")
                       if labels["model"] == "simple"}
    assert failure_reasons == set(REASONS)
    assert s.types["nv_inference_pending_request_count"] == "gauge"
    for family in HISTOGRAMS:
        assert s.types[family] == "histogram"
        assert all(set(labels) == {"model", "version", "le"} for labels in s.labelsets(family + "_bucket"))
    # every serving version appears, models without traffic at zero
    models = {labels["model"] for labels in s.labelsets("nv_inference_request_success_total")}
    assert {"simple", "simple_identity", "dense", "delayed", "reshape3"} <= models
    assert s.get("nv_inference_request_success", model="simple_identity", version="1") >= 0
    # GPU gauges exactly when NVML sees a GPU (never an error without one)
    gpu_families = {name for name in s.types if name.startswith("nv_gpu_")}
    assert gpu_families in (set(), {"nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                                    "nv_gpu_utilization"})
    if gpu_families:
        assert all(set(labels) == {"gpu_uuid"} for labels in s.labelsets("nv_gpu_memory_total_bytes"))


def test_only_metrics_path_is_served(metrics_server):
    base = f"http://127.0.0.1:{metrics_server.metrics_port}"
    for path in ("/", "/metrics/extra", "/v2/health/ready"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + path, timeout=10)
        assert info.value.code == 404
    request = urllib.request.Request(base + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip"


def test_allow_metrics_false_serves_nothing(example_repo, start_server):
    # explicit control and no --load-model: nothing to load, quick to start
    server = start_server([example_repo], "--allow-metrics=false", "--model-control-mode=explicit")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)


def test_reload_and_unload_reset_the_series(metrics_server):
    """Counters and histograms belong to one loaded version: a reload restarts both, together."""
    client = grpcclient.InferenceServerClient(metrics_server.grpc_url)
    v = {"model": "simple", "version": "1"}
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inputs.append(grpcclient.InferInput(name, [1, 16], "INT32"))
        inputs[-1].set_data_from_numpy(x)
    before = scrape(metrics_server).get("nv_inference_request_success", **v)
    for _ in range(3):
        client.infer("simple", inputs)
    s = scrape(metrics_server)
    assert s.get("nv_inference_request_success", **v) == before + 3
    check_consistent(s, "simple")

    client.load_model("simple")  # a reload: a fresh version, fresh statistics
    s = scrape(metrics_server)
    assert s.get("nv_inference_request_success", **v) == 0
    assert s.get("inferd_request_duration_seconds_count", **v) == 0
    client.infer("simple", inputs)
    s = scrape(metrics_server)
    assert s.get("nv_inference_request_success", **v) == 1
    check_consistent(s, "simple")

    client.unload_model("simple")  # an unloaded model has no series, as in Triton
    s = scrape(metrics_server)
    assert not [labels for labels in s.labelsets("nv_inference_request_success_total")
                if labels["model"] == "simple"]
    assert not [labels for labels in s.labelsets("inferd_batch_size_bucket") if labels["model"] == "simple"]
    client.load_model("simple")
    assert scrape(metrics_server).get("nv_inference_request_success", **v) == 0
    client.close()


class _FakeNvml:
    """The few NVML calls GpuCollector makes, answering for two GPUs."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, handle):  # bytes in old bindings, str in new ones
        return b"GPU-aaaa" if handle == 0 else "GPU-bbbb"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": (handle + 1) << 30, "total": 80 << 30})

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Rates", (), {"gpu": 37 + handle})


class _NoDriver(_FakeNvml):
    def nvmlInit(self):  # what nvidia-ml-py does on a machine without the NVIDIA driver
        raise self.NVMLError("NVML Shared Library Not Found")


def test_gpu_gauges_map_nvml_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    metrics = Metrics(list)
    metrics.gpu.refresh()
    s = Scrape(metrics.render().decode())
    assert s.types["nv_gpu_utilization"] == "gauge"
    assert s.get("nv_gpu_memory_used_bytes", gpu_uuid="GPU-aaaa") == 1 << 30
    assert s.get("nv_gpu_memory_used_bytes", gpu_uuid="GPU-bbbb") == 2 << 30
    assert s.get("nv_gpu_memory_total_bytes", gpu_uuid="GPU-bbbb") == 80 << 30
    assert s.get("nv_gpu_utilization", gpu_uuid="GPU-aaaa") == pytest.approx(0.37)
    assert s.get("nv_gpu_utilization", gpu_uuid="GPU-bbbb") == pytest.approx(0.38)


@pytest.mark.parametrize("nvml", ["missing", "no-driver"])
def test_no_gpu_means_no_gpu_families(monkeypatch, nvml):
    if nvml == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    else:
        monkeypatch.setitem(sys.modules, "pynvml", _NoDriver())
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    metrics = Metrics(list)
    metrics.gpu.refresh()
    assert not metrics.gpu.enabled
    assert b"nv_gpu" not in metrics.render()


@pytest.mark.gpu
def test_gpu_gauges_on_a_gpu(metrics_server):
    pynvml = pytest.importorskip("pynvml", reason="GPU gauges come from NVML (pip install nvidia-ml-py)")
    pynvml.nvmlInit()
    uuids = {pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
             for i in range(pynvml.nvmlDeviceGetCount())}
    uuids = {u.decode() if isinstance(u, bytes) else u for u in uuids}
    s = scrape(metrics_server)
    for family in ("nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_utilization"):
        assert {labels["gpu_uuid"] for labels in s.labelsets(family)} == uuids
    for uuid in uuids:
        assert 0 < s.get("nv_gpu_memory_total_bytes", gpu_uuid=uuid)
        assert 0 <= s.get("nv_gpu_utilization", gpu_uuid=uuid) <= 1
