"""Bad drops change nothing (poll mode, under continuous load): a corrupt model file, a bad config
and a version folder still being copied never replace the serving version; the index and the log
say why; a later good drop is picked up."""

from __future__ import annotations

import tritonclient.grpc as grpcclient

from tests.lifecycle_helpers import CONFIG, Load, index, offset_bytes, offset_model, wait_for

POLL = 0.4


def test_bad_drops_change_nothing(tmp_path, start_server):
    model = tmp_path / "repo" / "m"
    offset_model(model / "1" / "model.onnx", 1)
    (model / "config.pbtxt").write_text(CONFIG)
    proc = start_server([tmp_path / "repo"], "--model-control-mode=poll", f"--repository-poll-secs={POLL}")
    client = grpcclient.InferenceServerClient(proc.grpc_url)

    def still_serving(key, what):
        mark = load.snapshot()[key]
        wait_for(lambda: load.served_since(key, mark + 20), what=what)

    with Load(proc.grpc_url, "m", clients=4) as load:
        wait_for(lambda: load.served_since(("1", 1.0)), what="version 1 serving")

        # 1. a corrupt model file in a new version: version 1 keeps serving, the index says why
        (model / "2").mkdir()
        (model / "2" / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX model")
        state, reason = wait_for(lambda: index(client).get(("m", "2"), ("LOADING",))[0] != "LOADING"
                                 and index(client)[("m", "2")], what="version 2's load to end")
        assert state == "UNAVAILABLE" and "protobuf" in reason.lower(), (state, reason)
        assert "reload of model 'm' failed, previous versions keep serving" in proc.log()
        assert index(client)[("m", "1")][0] == "READY"
        still_serving(("1", 1.0), "version 1 after the corrupt drop")

        # ... and a good file in its place is picked up
        offset_model(model / "2" / "model.onnx", 2)
        wait_for(lambda: load.served_since(("2", 2.0)), what="the good version 2")

        # 2. a config that does not parse: version 2 keeps serving; its index row says why
        good_config = (model / "config.pbtxt").read_text()
        (model / "config.pbtxt").write_text(good_config + "\ninput [ { name: \n")
        _, reason = wait_for(lambda: index(client)[("m", "2")][1] and index(client)[("m", "2")],
                             what="the failed reload in the index")
        assert index(client)[("m", "2")][0] == "READY" and "latest load failed" in reason, reason
        assert "config.pbtxt" in reason
        assert "model 'm' failed to load" in proc.log()
        still_serving(("2", 2.0), "version 2 after the bad config")

        # ... and a good config clears it
        (model / "config.pbtxt").write_text(good_config + "# fixed\n")
        wait_for(lambda: index(client)[("m", "2")] == ("READY", ""), what="the fixed config")

        # 3. version 3 copied in two steps, with a poll in between: never loaded half-written
        data = offset_bytes(3, tmp_path)
        before = proc.log().count("model 'm' is changing on disk")
        (model / "3").mkdir()
        (model / "3" / "model.onnx").write_bytes(data[: len(data) // 2])
        wait_for(lambda: proc.log().count("model 'm' is changing on disk") > before, interval=0.01,
                 what="a poll that saw the half-written file")
        with open(model / "3" / "model.onnx", "ab") as f:
            f.write(data[len(data) // 2:])
        wait_for(lambda: load.served_since(("3", 3.0)), what="version 3 serving")
        assert index(client)[("m", "3")] == ("READY", "")
    tally = load.tally

    print(f"\nbad-drop test: sent {tally.sent}, failed {len(tally.failures)}; served {dict(tally.served)}")
    assert tally.failures == []
    assert set(tally.served) == {("1", 1.0), ("2", 2.0), ("3", 3.0)}
    assert "failed" not in "".join(line for line in proc.log().splitlines() if "version 3" in line)
    client.close()
