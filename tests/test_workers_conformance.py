"""The conformance table (tests/cases.py over every gRPC and REST transport), the gRPC RPC tests and
the control-plane case table (tests/control_cases.py: metadata, config, statistics, index, trace
settings, errors), run unchanged against inferd with ``--frontend-workers 2``: the frontends live in
two worker processes and talk to the engine process through the worker channel and shared memory;
the answers come from the engine through whichever worker took the connection, and must read exactly
as in one process."""

from __future__ import annotations

import pytest

from tests.harness import ServerProcess
from tests.test_conformance import (  # noqa: F401 - collected here against the workers server
    test_bad_request_does_not_fail_its_batch_mates,
    test_case,
    test_server_unharmed_after_errors,
    transports,
)
from tests.test_control_conformance import (  # noqa: F401
    test_both_transports_render_the_same_config,
    test_control_case,
    transport,
)
from tests.test_grpc_rpcs import (  # noqa: F401
    client,
    stub,
    test_model_config_is_the_effective_config,
    test_model_metadata,
    test_model_ready,
    test_model_statistics_count_requests,
    test_repository_index,
    test_server_live_ready_metadata,
    test_64_mib_tensor_round_trip,
    test_load_and_unload_refused_without_explicit_mode,
    test_stream_error_message_with_plain_stubs,
    test_stream_infer_answers_and_reports_errors_in_band,
    test_unimplemented_extensions,
    test_unregister_all_shared_memory_succeeds,
)
from tests.test_http_infer import (  # noqa: F401 - REST beyond the table: compression, framing, errors
    base,
    test_binary_response_framing,
    test_client_leaving_mid_body_harms_nothing,
    test_compressed_responses,
    test_json_tensor_errors,
    test_large_tensor_streams_out_and_compresses,
    test_malformed_request_bodies,
    test_unknown_model_and_version,
)


@pytest.fixture(scope="module")
def models_server(test_models, tmp_path_factory):
    """The session's test models, served by an engine with two frontend workers."""
    proc = ServerProcess([test_models], "--frontend-workers", "2")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-workers.log", timeout=120)
    yield proc
    assert proc.stop() == 0
