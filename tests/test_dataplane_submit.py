"""DataPlane.submit (the synchronous unary entry) and the validation of request shapes once per
model configuration (validation.CheckedShapes), in process on the example "simple" model."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from server import validation
from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, RequestedOutput, Tensor
from server.dataplane import DataPlane
from server.repository.manager import RepositoryManager
from tests.harness import ROOT

SIMPLE_JSON = {
    "name": "simple", "platform": "onnxruntime_onnx", "max_batch_size": 8,
    "input": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
    "output": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("OUTPUT0", "OUTPUT1")],
}


class Shape:
    """A request template stand-in: hashed by identity, as the worker port's templates are."""


def _request(rows: int = 1, key: object = None, outputs: tuple[str, ...] = (), names=("INPUT0", "INPUT1"),
             value: int = 1) -> InferRequest:
    a = np.full((rows, 16), value, dtype=np.int32)
    request = InferRequest("simple", "", "r1", [Tensor(n, "INT32", [rows, 16], a) for n in names],
                           [RequestedOutput(o) for o in outputs])
    request.shape_key = key
    return request


def _run(tmp_path, body) -> None:
    """``body(dataplane)`` on a loop, with "simple" loaded (explicit model control)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")

    async def main() -> None:
        manager = RepositoryManager([repo])
        await manager.load("simple")
        dataplane = DataPlane(manager, control_mode="explicit")
        dataplane.started = True
        try:
            await body(dataplane)
        finally:
            await manager.shutdown()

    asyncio.run(main())


def _submitted(dataplane: DataPlane, request: InferRequest) -> tuple[asyncio.Future, object]:
    """submit() with a callback that records each call (the future: the first call's arguments)."""
    loop = asyncio.get_running_loop()
    done, calls = loop.create_future(), []

    def on_done(response, error) -> None:
        calls.append((response, error))
        if not done.done():
            done.set_result((response, error))

    sink = dataplane.submit(request, on_done)
    done.calls = calls
    return done, sink


def test_submit_answers_through_its_callback_exactly_as_infer_answers(tmp_path):
    async def body(dataplane: DataPlane) -> None:
        expected = await dataplane.infer(_request(2, value=3))
        done, _ = _submitted(dataplane, _request(2, value=3))
        response, error = await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.05)
        assert error is None and len(done.calls) == 1  # exactly once
        assert (response.model_name, response.model_version, response.id, response.final) == \
               (expected.model_name, expected.model_version, expected.id, expected.final)
        assert [(t.name, t.datatype, t.shape) for t in response.outputs] == \
               [(t.name, t.datatype, t.shape) for t in expected.outputs]
        for got, want in zip(response.outputs, expected.outputs):
            np.testing.assert_array_equal(got.data, want.data)
        np.testing.assert_array_equal(response.outputs[0].data, np.full((2, 16), 6, np.int32))
        # one output asked for: only that one
        done, _ = _submitted(dataplane, _request(1, outputs=("OUTPUT1",)))
        response, error = await asyncio.wait_for(done, 10)
        assert [t.name for t in response.outputs] == ["OUTPUT1"]

    _run(tmp_path, body)


def test_submit_refuses_at_once_with_the_message_infer_gives(tmp_path):
    async def body(dataplane: DataPlane) -> None:
        for bad in (_request(9), _request(1, names=("INPUT0", "NOPE")), _request(1, outputs=("NOPE",))):
            with pytest.raises(ServingError) as by_infer:
                await dataplane.infer(bad)
            with pytest.raises(ServingError) as by_submit:
                _submitted(dataplane, bad)
            assert by_submit.value.code == by_infer.value.code == ErrorCode.INVALID_ARGUMENT
            assert by_submit.value.message == by_infer.value.message
        unknown = _request(1)
        unknown.model_name = "nothing_here"
        with pytest.raises(ServingError) as refused:
            _submitted(dataplane, unknown)
        assert refused.value.code == ErrorCode.NOT_FOUND
        dataplane.draining = True
        with pytest.raises(ServingError) as refused:
            _submitted(dataplane, _request(1))
        assert refused.value.code == ErrorCode.UNAVAILABLE

    _run(tmp_path, body)


def test_a_cancelled_submission_is_never_answered(tmp_path):
    async def body(dataplane: DataPlane) -> None:
        done, sink = _submitted(dataplane, _request(1))
        sink.cancel()  # queued or already on its instance thread: either way it is not answered
        await asyncio.sleep(0.2)
        assert done.calls == []
        [stats] = dataplane.statistics("simple")
        assert stats["inference_stats"]["success"]["count"] == 0
        # the server goes on answering others
        done, _ = _submitted(dataplane, _request(1))
        assert (await asyncio.wait_for(done, 10))[1] is None

    _run(tmp_path, body)


def test_a_callback_that_fails_does_not_break_its_batch_mates(tmp_path, caplog):
    async def body(dataplane: DataPlane) -> None:
        def broken(response, error) -> None:
            raise RuntimeError("a caller's bug")

        dataplane.submit(_request(1), broken)
        done, _ = _submitted(dataplane, _request(1))  # the same batch
        assert (await asyncio.wait_for(done, 10))[1] is None
        await asyncio.sleep(0.05)
        assert "completion callback" in caplog.text

    _run(tmp_path, body)


def test_a_request_shape_is_checked_once_per_configuration_and_a_reload_checks_again(tmp_path, monkeypatch):
    walks = []
    check_inputs = validation.check_inputs
    monkeypatch.setattr(validation, "check_inputs", lambda config, request: walks.append(1) or
                        check_inputs(config, request))

    async def body(dataplane: DataPlane) -> None:
        shape = Shape()
        for value in (1, 2, 3):
            response = await dataplane.infer(_request(6, shape, value=value))
            np.testing.assert_array_equal(response.outputs[0].data, np.full((6, 16), 2 * value, np.int32))
        assert len(walks) == 1  # the first request of the shape only
        await dataplane.infer(_request(6))  # no shape key: checked request by request
        assert len(walks) == 2
        # the configuration changes (max_batch_size 8 -> 4): the same shape is checked again, and
        # refused with the message a request without a shape key gets
        await dataplane.load("simple", {"config": json.dumps({**SIMPLE_JSON, "max_batch_size": 4})})
        with pytest.raises(ServingError) as plain:
            await dataplane.infer(_request(6))
        for _ in range(2):  # a refusal is never remembered as a pass: refused each time, same words
            with pytest.raises(ServingError) as keyed:
                await dataplane.infer(_request(6, shape))
            assert keyed.value.code == ErrorCode.INVALID_ARGUMENT
            assert keyed.value.message == plain.value.message
            assert "batch-size must be <= 4" in keyed.value.message
        small = Shape()
        for _ in range(2):
            response = await dataplane.infer(_request(3, small))
            assert response.outputs[0].shape == [3, 16]

    _run(tmp_path, body)


def test_checked_shapes_is_bounded_and_keys_on_the_configuration_object():
    class Config:  # what CheckedShapes reads of a configuration goes through check_inputs/outputs
        pass

    calls = []
    checked = validation.CheckedShapes(limit=3)
    original = (validation.check_inputs, validation.check_outputs)
    try:
        validation.check_inputs = lambda config, request: calls.append(config) or {
            t.name: t.data for t in request.inputs}
        validation.check_outputs = lambda config, requested: ["OUT"]
        config = Config()
        config.input = lambda name: type("Spec", (), {"reshape": None})()
        keys = [Shape() for _ in range(5)]
        for key in keys:
            checked.check(config, _request(1, key))
        assert len(checked) == 3  # the oldest went first
        checked.check(config, _request(1, keys[-1]))
        assert len(calls) == 5  # the newest was still known
        checked.check(config, _request(1, keys[0]))
        assert len(calls) == 6  # the oldest was not
        other = Config()
        other.input = config.input
        checked.check(other, _request(1, keys[-1]))
        assert calls[-1] is other  # another configuration object: checked again
    finally:
        validation.check_inputs, validation.check_outputs = original


def test_an_output_shape_is_checked_once_and_a_bad_output_is_refused_each_time():
    class Spec:
        def __init__(self, datatype, dims, reshape=None) -> None:
            self.datatype, self.dims, self.reshape = datatype, dims, reshape

    class Config:
        name, max_batch_size = "m", 8
        specs = {"OUT": Spec("FP32", [4]), "R": Spec("FP32", [2, 2], reshape=[4])}

        def output(self, name):
            return self.specs.get(name)

    checked, config = validation.CheckedShapes(), Config()
    first = checked.output(config, "OUT", np.zeros((3, 4), np.float32))
    again = checked.output(config, "OUT", np.ones((3, 4), np.float32))
    assert (again.name, again.datatype, again.shape) == (first.name, first.datatype, first.shape) == \
           ("OUT", "FP32", [3, 4])
    assert again.data[0, 0] == 1.0  # the new array, not the first one's
    reshaped = checked.output(config, "R", np.arange(8, dtype=np.float32).reshape(2, 4))
    reshaped_again = checked.output(config, "R", np.arange(8, dtype=np.float32).reshape(2, 4) + 1)
    assert reshaped.shape == reshaped_again.shape == [2, 2, 2] and reshaped_again.data.shape == (2, 2, 2)
    assert reshaped_again.data[0, 0, 0] == 1.0
    for _ in range(2):
        with pytest.raises(ServingError) as wrong:
            checked.output(config, "OUT", np.zeros((3, 4), np.float64))
        assert wrong.value.code == ErrorCode.INTERNAL and "float64" in wrong.value.message
