"""The REST router's remembered matches give the same answers as the table walk, and stay bounded."""

from __future__ import annotations

import pytest

from server.frontends.http.routes import ROUTES, HttpError, Router, infer, model_metadata


def test_a_remembered_path_matches_as_the_first_time_and_its_groups_are_the_callers_own():
    router = Router(ROUTES)
    first = router.match("POST", "/v2/models/a%2Eb/versions/2/infer")
    assert first == (infer, {"model": "a.b", "version": "2"})
    first[1]["model"] = "changed by a caller"
    assert router.match("POST", "/v2/models/a%2Eb/versions/2/infer") == (infer, {"model": "a.b", "version": "2"})
    assert router.match("GET", "/v2/models/m") == (model_metadata, {"model": "m"})


def test_errors_are_not_remembered_and_the_memory_is_bounded():
    router = Router(ROUTES)
    for _ in range(2):
        with pytest.raises(HttpError) as missing:
            router.match("GET", "/v2/nowhere")
        assert missing.value.status == 404
        with pytest.raises(HttpError) as wrong:
            router.match("GET", "/v2/models/m/infer")
        assert wrong.value.status == 405
    for i in range(Router._CACHED * 3):
        router.match("GET", f"/v2/models/m{i}")
    assert len(router._found) <= Router._CACHED
    long = "/v2/models/" + "x" * Router._CACHED_PATH
    assert router.match("GET", long) == (model_metadata, {"model": "x" * Router._CACHED_PATH})
    assert ("GET", long) not in router._found
