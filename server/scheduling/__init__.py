"""Batching (pure functions), instances (worker threads) and the per-version scheduler."""
