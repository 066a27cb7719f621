"""OpenTelemetry across the worker/engine boundary: the span tests of tests/test_tracing.py, run
against inferd with ``--frontend-workers 2``. The caller's traceparent is read by a worker and the
spans are made by the engine: they must still be children of the caller's span, streams included."""

from __future__ import annotations

import pytest

from tests.harness import ServerProcess
from tests.test_tracing import (  # noqa: F401 - collected here against the workers server
    client,
    otel_env,
    receiver,
    repo,
    test_a_batch_links_to_every_member_request,
    test_backend_failure_marks_the_batch_and_logs_the_trace_id,
    test_failed_requests_have_error_status_and_message,
    test_grpc_request_is_a_child_of_the_callers_span,
    test_off_by_default_then_enabled_at_run_time,
    test_rest_request_is_a_child_of_the_callers_span,
    test_trace_setting_changes_take_effect,
    test_unsampled_caller_is_not_traced_and_stream_gets_one_span,
)


@pytest.fixture(scope="module")
def traced(repo, receiver, tmp_path_factory):
    proc = ServerProcess([repo], "--model-control-mode", "explicit", "--load-model", "*",
                         "--frontend-workers", "2", env=otel_env(receiver.port))
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-traced-workers.log", timeout=120)
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def start_server(start_server):
    """conftest's start_server, every server with two frontend workers."""
    def start(repositories, *extra: str, **kwargs):
        return start_server(repositories, *extra, "--frontend-workers", "2", **kwargs)

    return start
