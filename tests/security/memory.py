"""Reading a server process's memory from /proc for the limit tests: current RSS, peak RSS (VmHWM)
and resetting that peak, so a test can measure what one request cost."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss(pid: int) -> int:
    """Resident set size now, in bytes."""
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    """Peak resident set size since the process started or since ``reset_peak``, in bytes."""
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the RSS it starts from."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)
