"""The one shape every transport has, so the app runs them alike and a new transport is one module."""

from __future__ import annotations

from typing import Protocol


class Frontend(Protocol):
    async def start(self) -> None:
        """Listen and serve (the data plane may still be loading models: probes answer not-ready)."""

    async def state_changed(self) -> None:
        """Readiness or draining changed on the data plane: publish it (gRPC health, worker processes).
        While draining, a frontend keeps answering and refuses new work through the data plane."""

    async def stop(self, grace: float) -> None:
        """Stop listening; requests already answered get ``grace`` seconds to flush."""
