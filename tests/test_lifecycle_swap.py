"""Atomic swaps in poll mode under continuous load: a version added, a model file changed in place,
a config change and a version removed each fail no request; version routing follows every swap."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.lifecycle_helpers import CONFIG, Load, index, offset_model, wait_for

POLICY_ALL = "version_policy: { all: {} }\n"


def _infer(client, version: str):
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    return client.infer("m", [inp], model_version=version)


def test_swaps_under_load_fail_no_request(tmp_path, start_server):
    model = tmp_path / "repo" / "m"
    offset_model(model / "1" / "model.onnx", 1)
    (model / "config.pbtxt").write_text(CONFIG + POLICY_ALL)
    proc = start_server([tmp_path / "repo"], "--model-control-mode=poll", "--repository-poll-secs=0.25")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    stats = lambda v: client.get_inference_statistics("m", v).model_stats[0].inference_count

    # requests with an empty version follow the swaps; requests pinned to version 1 must never notice
    with Load(proc.grpc_url, "m", clients=4) as load, Load(proc.grpc_url, "m", clients=1, version="1") as pinned:
        wait_for(lambda: load.served_since(("1", 1.0)), what="version 1 serving")

        # 1. a version added: the default moves to it; version 1 is not loaded a second time
        served_v1 = stats("1")
        offset_model(model / "2" / "model.onnx", 2)
        wait_for(lambda: load.served_since(("2", 2.0)), what="version 2 serving")
        assert stats("1") >= served_v1  # same instance, same counters: it was kept, not reloaded
        assert "serving versions [1, 2] (loaded [2])" in proc.log()

        # 2. the model file of the serving version changed in place: that version reloads
        offset_model(model / "2" / "model.onnx", 20)
        wait_for(lambda: load.served_since(("2", 20.0)), what="the new file of version 2 serving")

        # 3. a config change reloads every version with the new configuration
        (model / "config.pbtxt").write_text(
            CONFIG.replace("dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 100 }")
            + POLICY_ALL)
        wait_for(lambda: client.get_model_config("m").config.dynamic_batching.max_queue_delay_microseconds == 100,
                 what="the new config")
        mark = load.snapshot()[("2", 20.0)]
        wait_for(lambda: load.served_since(("2", 20.0), mark + 20), what="traffic after the config change")

        # 4. a version removed: the default falls back to version 1 once version 2 drained
        shutil.rmtree(model / "2")
        wait_for(lambda: load.snapshot()[("1", 1.0)] and load.tally.last == ("1", 1.0), what="back on version 1")
        mark = load.snapshot()[("1", 1.0)]
        wait_for(lambda: load.served_since(("1", 1.0), mark + 20), what="traffic on version 1")
    tally, pinned_tally = load.tally, pinned.tally

    print(f"\nswap test: default-version clients sent {tally.sent}, failed {len(tally.failures)}; "
          f"pinned clients sent {pinned_tally.sent}, failed {len(pinned_tally.failures)}; served {dict(tally.served)}")
    assert tally.failures == [] and pinned_tally.failures == []
    assert set(tally.served) == {("1", 1.0), ("2", 2.0), ("2", 20.0)}
    assert set(pinned_tally.served) == {("1", 1.0)}

    # routing after the swaps: exact versions, and errors that say which versions are ready
    wait_for(lambda: index(client).get(("m", "2")) == ("UNAVAILABLE", "unloaded"), what="version 2 unloaded")
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "2")
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "ready versions: 1" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "3")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "ready versions: 1" in info.value.message()
    assert _infer(client, "").get_response().model_version == "1"
    assert client.get_model_metadata("m").versions == ["1"]
    client.close()


def test_api_reload_of_a_new_version_that_fails_keeps_the_old_one(tmp_path, start_server):
    """Explicit mode: version 2 arrives broken and is loaded through the API while clients run;
    the load fails, version 1 keeps serving, then a good version 2 takes over."""
    model = tmp_path / "repo" / "m"
    offset_model(model / "1" / "model.onnx", 1)
    (model / "config.pbtxt").write_text(CONFIG)
    proc = start_server([tmp_path / "repo"], "--model-control-mode=explicit", "--load-model=m")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    with Load(proc.grpc_url, "m", clients=3) as load:
        wait_for(lambda: load.served_since(("1", 1.0)), what="version 1 serving")
        (model / "2").mkdir()
        (model / "2" / "model.onnx").write_bytes(b"\x08\x07 not a model")
        with pytest.raises(InferenceServerException) as info:
            client.load_model("m")
        assert "version 2" in info.value.message()
        mark = load.snapshot()[("1", 1.0)]
        wait_for(lambda: load.served_since(("1", 1.0), mark + 20), what="version 1 still serving")
        state, reason = index(client)[("m", "2")]
        assert state == "UNAVAILABLE" and "version 2" not in reason and reason
        assert index(client)[("m", "1")][0] == "READY"
        offset_model(model / "2" / "model.onnx", 2)
        client.load_model("m")
        wait_for(lambda: load.served_since(("2", 2.0)), what="version 2 serving")
    print(f"\nfailed-reload test: sent {load.tally.sent}, failed {len(load.tally.failures)}")
    assert load.tally.failures == []
    client.close()
