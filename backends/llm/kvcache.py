"""The KV cache: one slot per running sequence in preallocated per-layer tensors.

Layout per layer: keys and values ``[slots, kv_heads, max_len, head_dim]``, allocated on the first
forward (shapes and dtype come from the model's own key states, so any decoder that stores its
cache through ``Cache.update`` works). Running sequences occupy slots ``0..n-1`` without gaps, so a
batched step reads ``cache[:n, :, :longest]`` as a view, not a gather; a freed slot is filled by
moving the last one into it. Each sequence's tokens sit at positions ``0..len-1`` of its slot; the
step's 4-D attention mask hides everything past each sequence's own length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """A ``transformers`` Cache whose update writes each row at its own position."""

    def __init__(self, slots: int, max_len: int, device: torch.device) -> None:
        super().__init__(layers=[])
        self.slots = slots
        self.max_len = max_len
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # set before each forward by ``bind``
        self._rows = 0
        self._start: torch.Tensor | None = None  # [rows] write position of each row
        self._single_start = 0  # prefill: one row, a run of tokens from this position
        self._kv_len = 0
        self._arange: torch.Tensor | None = None

    # -- what the engine calls --------------------------------------------------------------

    def bind_prefill(self, slot: int, start: int, count: int) -> None:
        """Next forward: one sequence in ``slot`` writes ``count`` tokens from position ``start``."""
        self._rows, self._row0 = 1, slot
        self._start = None
        self._single_start = start
        self._kv_len = start + count

    def bind_decode(self, rows: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: slots ``0..rows-1`` each write one token at ``positions[row]``."""
        self._rows, self._row0 = rows, 0
        self._start = positions
        self._kv_len = kv_len
        if self._arange is None or len(self._arange) < rows:
            self._arange = torch.arange(self.slots, device=self.device)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (compaction)."""
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- the transformers Cache interface ----------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            _, heads, _, dim = key_states.shape
            shape = (self.slots, heads, self.max_len, dim)
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=self.device))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = slice(self._row0, self._row0 + self._rows)
        if self._start is None:  # prefill of one row
            end = self._single_start + key_states.shape[2]
            keys[self._row0, :, self._single_start:end] = key_states[0]
            values[self._row0, :, self._single_start:end] = value_states[0]
        else:  # decode: row r writes its one token at start[r]
            index = self._arange[:self._rows]
            keys[index, :, self._start] = key_states[:, :, 0]
            values[index, :, self._start] = value_states[:, :, 0]
        return keys[rows, :, :self._kv_len], values[rows, :, :self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self._kv_len, 0

    @property
    def is_compileable(self) -> bool:
        return False
