"""The drain tests of tests/test_lifecycle_drain.py with ``--frontend-workers 2``: on SIGTERM the
engine stops taking work (every worker turns not ready and answers UNAVAILABLE), what is queued or
running finishes and is answered through its worker, then the workers and the engine exit 0; a
second signal stops at once; --exit-timeout-secs bounds it all."""

from __future__ import annotations

import pytest

from tests.test_lifecycle_drain import (  # noqa: F401 - collected here against a workers server
    test_exit_timeout_bounds_the_drain,
    test_second_signal_stops_at_once,
    test_sigterm_under_load_loses_no_accepted_request,
)


@pytest.fixture
def start_server(start_server):
    """conftest's start_server, every server with two frontend workers."""
    def start(repositories, *extra: str, **kwargs):
        return start_server(repositories, *extra, "--frontend-workers", "2", **kwargs)

    return start
