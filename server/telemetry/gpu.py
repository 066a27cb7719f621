"""The GPU probe: how many GPUs this process may use (for instance placement), and the GPU gauges
for the metrics endpoint (memory used/total and utilization per GPU, Triton's names).

NVML (the ``nvidia-ml-py`` package, module ``pynvml``) is the source when it loads: it reads every
GPU without creating a CUDA context. Without it, a process that already runs torch on CUDA reports
its current device through ``torch.cuda`` (memory only: utilization needs NVML). With neither, or
without a GPU, the families are simply absent; nothing here ever fails the server.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    uuid: str
    used_bytes: int
    total_bytes: int
    utilization: float | None  # 0.0 - 1.0, as Triton reports it; None when unknown


class _Nvml:
    def __init__(self, pynvml) -> None:
        self.nvml = pynvml
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.devices = [(h, _text(pynvml.nvmlDeviceGetUUID(h))) for h in handles]

    def sample(self) -> list[GpuSample]:
        out = []
        for handle, uuid in self.devices:
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            out.append(GpuSample(uuid, int(memory.used), int(memory.total), rates.gpu / 100.0))
        return out


class _Torch:
    def __init__(self, torch) -> None:
        self.cuda = torch.cuda

    def sample(self) -> list[GpuSample]:
        # only the current device: asking about another one would create a CUDA context there
        device = self.cuda.current_device()
        free, total = self.cuda.mem_get_info(device)
        uuid = getattr(self.cuda.get_device_properties(device), "uuid", None)
        name = f"GPU-{uuid}" if uuid is not None else f"cuda:{device}"
        return [GpuSample(name, int(total - free), int(total), None)]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _open_source() -> _Nvml | _Torch | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        source = _Nvml(pynvml)
        return source if source.devices else None
    except ImportError:
        pass
    # no driver or no GPU (NVMLError_LibraryNotFound, ..._DriverNotLoaded, ...): metrics go on without
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML unavailable (%s): no NVML GPU metrics", exc)
    torch = sys.modules.get("torch")  # never import torch (seconds, and GPU memory) just for metrics
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return _Torch(torch)
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup only costs the GPU gauges
        log.debug("torch.cuda unavailable for GPU metrics: %s", exc)
    return None


def gpu_count() -> int:
    """GPUs visible to this process, without creating a CUDA context or importing a framework.

    CUDA_VISIBLE_DEVICES, when set, decides (NVML does not read it: it always sees every GPU);
    otherwise NVML's device count, or the /dev/nvidia<N> device files where NVML is missing.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    count = _nvml_count()
    return count if count is not None else len(list(Path("/dev").glob("nvidia[0-9]*")))


@functools.cache
def _nvml_count() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver or library: no GPU as far as NVML knows
        log.debug("NVML unavailable (%s): counting GPUs from /dev", exc)
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML device count failed (%s): counting GPUs from /dev", exc)
        return None
    finally:
        pynvml.nvmlShutdown()  # NVML counts its initializations: the metrics collector keeps its own


class GpuCollector(Collector):
    """Yields the GPU gauges from the last :meth:`refresh` (which blocks: call it off the event loop)."""

    def __init__(self) -> None:
        self._source: _Nvml | _Torch | None = None
        self._opened = False
        self._samples: list[GpuSample] = []

    def refresh(self) -> None:
        if not self._opened:
            self._opened = True
            self._source = _open_source()
            if self._source is not None:
                log.info("GPU metrics from %s", "NVML" if isinstance(self._source, _Nvml) else "torch.cuda")
        if self._source is None:
            return
        try:
            self._samples = self._source.sample()
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus must not break the scrape
            log.warning("reading GPU metrics failed: %s", exc)
            self._samples = []

    @property
    def enabled(self) -> bool:
        return not self._opened or self._source is not None

    def collect(self) -> Iterator[Metric]:
        if not self._samples:
            return
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes",
                                  labels=["gpu_uuid"])
        util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0]",
                                 labels=["gpu_uuid"])
        for s in self._samples:
            used.add_metric([s.uuid], s.used_bytes)
            total.add_metric([s.uuid], s.total_bytes)
            if s.utilization is not None:
                util.add_metric([s.uuid], s.utilization)
        yield used
        yield total
        if util.samples:
            yield util
