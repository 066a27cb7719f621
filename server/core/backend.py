"""The Backend interface and its LoadContext: the only contract a backend implements.

A backend is found by name (server/repository/backends.py): the built-in table or the
``inferd.backends`` entry-point group, so third parties add one without touching inferd.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .config import ModelConfig
from .types import TensorSpec


@dataclass(frozen=True, slots=True)
class LoadContext:
    model_name: str
    version: int
    model_path: Path  # <repository>/<model>
    version_path: Path  # <repository>/<model>/<version>
    model_file: Path  # version_path / default_model_filename (may not exist for some backends)
    config: ModelConfig  # may lack inputs/outputs when the server probes io_specs for auto-complete
    device: str  # "cpu" or "cuda:<index>"
    instance_name: str
    instance_index: int
    cpu_threads: int  # intra-op threads this instance may use without oversubscribing the cores


class Backend(abc.ABC):
    """One loaded instance of one model version. Synchronous; called from its instance thread.

    ``execute`` receives whole batches: every input has the batch dimension first when the
    model's max_batch_size > 0. It returns at least the requested outputs, with the same batch
    size. BYTES tensors are object arrays of bytes; BF16 tensors are uint16 bit patterns.
    """

    @classmethod
    @abc.abstractmethod
    def load(cls, ctx: LoadContext) -> "Backend":
        """Load the model for one instance; raise on bad files (the server reports the reason)."""

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs as the model file declares them, for config auto-complete."""
        raise NotImplementedError(f"{type(self).__name__} cannot describe its inputs and outputs")

    @abc.abstractmethod
    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch."""

    def warmup(self) -> None:
        """Backend-specific warm-up beyond the config's model_warmup samples (optional)."""

    def close(self) -> None:
        """Free sessions and device memory."""
