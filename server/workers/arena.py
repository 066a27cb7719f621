"""A shared-memory arena with a single-owner size-class allocator.

Each direction of a worker's channel has one arena: the side that writes tensors into it owns its
allocator (allocates and frees), the other side only maps it and reads in place, telling the owner
by offset when it is done with a block. Blocks are powers of two from 256 bytes up to a quarter of
the arena, carved from a bump pointer and then reused from per-size free lists (LIFO, so the same
hot pages serve steady traffic). The segment has a fixed size: shared memory cannot grow; a block
that does not fit is reported (-1) and the caller sends those bytes inline instead.
"""

from __future__ import annotations

import secrets
from multiprocessing import shared_memory

MIN_SHIFT = 8  # 256-byte blocks at least: keeps every block 64-byte aligned
ALIGN = 64


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def create(size: int, prefix: str = "inferd") -> shared_memory.SharedMemory:
    """A new segment (the engine creates both arenas of a worker and unlinks them when it goes)."""
    return shared_memory.SharedMemory(name=f"{prefix}-{secrets.token_hex(6)}", create=True, size=size)


def attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment. Python 3.11 registers it with the resource tracker here too; a spawned
    worker shares the engine's tracker, whose set already holds the name, so that is a no-op and
    the engine's ``unlink`` remains the one that ends it (the tracker also ends it if the engine is
    killed)."""
    return shared_memory.SharedMemory(name=name, create=False)


class Allocator:
    """Offsets into an arena of ``size`` bytes; not thread-safe (its owner's event loop only)."""

    __slots__ = ("size", "max_shift", "_top", "_free", "_shift", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self.max_shift = max(MIN_SHIFT, (size // 4).bit_length() - 1)
        self._top = 0
        self._free: list[list[int]] = [[] for _ in range(self.max_shift + 1)]
        self._shift: dict[int, int] = {}  # live block offset -> its size class
        self.used = 0  # bytes in live blocks

    def alloc(self, nbytes: int) -> int:
        """The offset of a block of at least ``nbytes``, or -1 when none is available."""
        shift = max(MIN_SHIFT, (max(nbytes, 1) - 1).bit_length())
        if shift > self.max_shift:
            return -1
        free = self._free[shift]
        if free:
            offset = free.pop()
        else:
            offset = self._top
            if offset + (1 << shift) > self.size:
                return -1
            self._top = offset + (1 << shift)
        self._shift[offset] = shift
        self.used += 1 << shift
        return offset

    def free(self, offset: int) -> bool:
        """Return a block; False for an offset that is not a live block (ignored, never corrupts)."""
        shift = self._shift.pop(offset, None)
        if shift is None:
            return False
        self._free[shift].append(offset)
        self.used -= 1 << shift
        return True

    @property
    def live(self) -> int:
        return len(self._shift)

    @property
    def carved(self) -> int:
        """Bytes of the arena ever handed out (the high-water mark of the bump pointer)."""
        return self._top
