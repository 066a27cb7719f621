"""Transports: they translate wire messages to core types and back, and decide nothing."""
