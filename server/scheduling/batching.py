"""Pure batching helpers: compatibility keys, batch cuts, concatenation and splitting."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from server.core.errors import ErrorCode, ServingError

BatchKey = tuple


def batch_key(inputs: Mapping[str, np.ndarray]) -> BatchKey:
    """Requests can share a batch when every input has the same dtype and non-batch shape."""
    return tuple([(name, inputs[name].dtype, inputs[name].shape[1:]) for name in sorted(inputs)])


def cut_size(sizes: Sequence[int], max_batch: int, preferred: Sequence[int]) -> int:
    """How many of the queued requests (batch sizes ``sizes``, oldest first) form the next batch.

    Takes requests in order while they fit ``max_batch``. When preferred sizes are given and some
    prefix adds up to one of them, the longest such prefix wins; otherwise all that fit go.
    """
    total, fits, best = 0, 0, 0
    wanted = set(preferred)
    for i, size in enumerate(sizes):
        if total + size > max_batch:
            break
        total += size
        fits = i + 1
        if total in wanted:
            best = fits
    return best or fits


def concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate requests' inputs along dimension 0 (one request: its arrays, no copy)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split(
    outputs: Mapping[str, np.ndarray], sizes: Sequence[int], wanted: Sequence[Sequence[str]], batched: bool
) -> list[dict[str, np.ndarray]]:
    """Give each request its own slice (views) of the batch outputs it asked for."""
    total = sum(sizes)
    for name in {n for names in wanted for n in names}:
        array = outputs.get(name)
        if array is None:
            raise ServingError(ErrorCode.INTERNAL, f"backend returned no output '{name}'")
        if batched and (array.ndim == 0 or array.shape[0] != total):
            raise ServingError(
                ErrorCode.INTERNAL,
                f"backend output '{name}' has batch dimension {array.shape[:1]} for a batch of {total}",
            )
    if len(sizes) == 1:
        return [{n: outputs[n] for n in wanted[0]}]
    result, start = [], 0
    for size, names in zip(sizes, wanted):
        result.append({n: outputs[n][start : start + size] for n in names})
        start += size
    return result
