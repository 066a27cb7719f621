"""Statistics, metrics, tracing and logging set-up."""
