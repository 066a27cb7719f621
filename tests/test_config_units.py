"""Repository configuration without a server: version policy, parsing, auto-complete, normalize, validate."""

from __future__ import annotations

import logging

import pytest
from google.protobuf import text_format

from server.core.errors import ErrorCode, ServingError
from server.core.types import TensorSpec
from server.protos import model_config_pb2 as mc
from server.repository import config as configs
from server.repository import layout, pbtxt
from server.telemetry.gpu import gpu_count


def _config(text: str, name: str = "m") -> mc.ModelConfig:
    config = text_format.Parse(text, mc.ModelConfig())
    config.name = name
    return config


def _fails(call, *says: str, code: ErrorCode = ErrorCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(ServingError) as info:
        call()
    assert info.value.code == code, info.value
    for text in says:
        assert text in info.value.message, info.value.message
    return info.value.message


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize("policy, available, chosen", [
    ("", [1, 2, 3], [3]),  # default: latest 1
    ("latest { num_versions: 2 }", [3, 1, 10, 2], [10, 3]),  # numeric, not string, order
    ("latest { num_versions: 5 }", [1, 2], [2, 1]),
    ("all {}", [2, 1, 7], [7, 2, 1]),
    ("specific { versions: [1, 3, 9] }", [1, 2, 3], [3, 1]),  # 9 does not exist: logged, skipped
    ("specific { versions: [4] }", [1, 2], []),
])
def test_version_policy_selection(policy, available, chosen, caplog):
    proto = text_format.Parse(policy, mc.ModelVersionPolicy())
    with caplog.at_level(logging.ERROR):
        assert layout.select(proto, available) == chosen
    if "9" in policy:
        assert "[9]" in caplog.text


def test_version_folders(tmp_path, caplog):
    for name in ("1", "0", "12", "01", "v2", "latest", "warmup", "configs", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING):
        found = layout.versions(tmp_path)
    assert sorted(found) == [0, 1, 12]  # "01" starts with 0: ignored, as Triton does
    assert all(f"'{n}'" in caplog.text for n in ("01", "v2", "latest"))
    assert "warmup" not in caplog.text  # special folders are skipped silently


def test_backend_fields_completed_like_triton(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"")
    versions = {1: tmp_path / "1"}
    for text, backend, platform in [
        ("", "onnxruntime", "onnxruntime_onnx"),  # found by file name
        ('platform: "onnxruntime_onnx"', "onnxruntime", "onnxruntime_onnx"),
        ('backend: "onnxruntime"', "onnxruntime", "onnxruntime_onnx"),
    ]:
        config = _config(text)
        layout.complete_backend_fields(config, tmp_path, versions)
        assert (config.backend, config.platform) == (backend, platform)
        assert config.default_model_filename == "model.onnx"
    custom = _config('backend: "onnxruntime" default_model_filename: "net.onnx"')
    layout.complete_backend_fields(custom, tmp_path, versions)
    assert custom.default_model_filename == "net.onnx"
    (tmp_path / "1" / "model.onnx").unlink()
    _fails(lambda: layout.complete_backend_fields(_config(""), tmp_path, versions), "cannot tell its backend")


# ---------------------------------------------------------------- parsing


def test_parse_reports_unknown_fields_and_keeps_the_rest(caplog):
    text = ('name: "m"\nmax_batch_size: 8\nfrobnicate: 3\n'
            'dynamic_batching { max_queue_delay_microseconds: 100 turbo: true }\n'
            'input [ { name: "X", data_type: TYPE_FP32, colour: "r}d", dims: [ 2 ] } ]\n'
            'extra {\n  a: 1\n  b { c: [ 1, 2 ] }\n}\nbackend: "onnxruntime"\n')
    with caplog.at_level(logging.WARNING):
        config, warnings = pbtxt.parse_text("m", text)
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(i.name, list(i.dims)) for i in config.input] == [("X", [2])]
    assert config.backend == "onnxruntime"
    # each unknown field is named once, nested and multi-line ones included, and nothing else is
    assert [w.split("'")[1] for w in warnings] == ["frobnicate", "turbo", "colour", "extra"]
    assert "frobnicate" in caplog.text and "model 'm'" in caplog.text
    # each warning says where the field is and which message has no such field
    assert "line 4, in inference.ModelDynamicBatching" in warnings[1]
    assert "line 6, in inference.ModelConfig" in warnings[3]


def test_unknown_fields_in_every_value_form():
    # map entries, adjacent strings, signs, <> bodies, lists of messages, separators and comments:
    # none of the known fields may be reported, and every unknown one exactly once
    text = ('parameters { key: "k" value: { string_value: "a" "b" } }\n'
            '# frob: 1 (a comment)\n'
            'z: -5, w: "x"\n"y"; q: [<a: 1>, <b: 2>] r: 1.5e3 s: -inf\n'
            'model_warmup < name: "w" inputs { key: "I" value { dims: 2 zz < a: 1 > } } >\n'
            'instance_group: [{count: 1 kind: KIND_CPU}]\n')
    config, warnings = pbtxt.parse_text("m", text)
    assert config.parameters["k"].string_value == "ab" and config.instance_group[0].count == 1
    assert [w.split("'")[1] for w in warnings] == ["z", "w", "q", "r", "s", "zz"]
    last = pbtxt.unknown_fields(text, mc.ModelConfig.DESCRIPTOR)[-1]
    assert last == ("zz", 5, "inference.ModelWarmup.Input")


def test_a_config_of_100_unknown_fields_is_read_in_one_pass():
    text = "".join(f"f{i} {{ x: {i} }}\n" for i in range(150)) + "max_batch_size: 3\n"
    config, warnings = pbtxt.parse_text("m", text)
    assert config.max_batch_size == 3 and len(warnings) == 150


def test_gpu_count_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2,-1,")
    assert gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_count() >= 0  # NVML's count, or the /dev/nvidia<N> files, on this machine


@pytest.mark.parametrize("text, says", [
    ('input [ { name: "X"\n', "does not parse"),
    ("max_batch_size: lots\n", "does not parse"),
    ("frobnicate: 3\nmax_batch_size: [\n", "does not parse"),  # unknown field and a real error
])
def test_parse_errors_are_fatal(text, says):
    _fails(lambda: pbtxt.parse_text("m", text), "model 'm'", says)


def test_read_without_config_file(tmp_path):
    config, warnings = pbtxt.read(tmp_path)
    assert config == mc.ModelConfig() and warnings == []


# ---------------------------------------------------------------- auto-complete


def _specs(*shapes, datatype="FP32", prefix="IN"):
    return [TensorSpec(f"{prefix}{i}", datatype, shape) for i, shape in enumerate(shapes)]


def test_autocomplete_batchable_model():
    config = _config("")
    configs.autocomplete(config, _specs((-1, 4), (-1, -1)), _specs((-1, 3), prefix="OUT"), 4)
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [
        ("IN0", [4], mc.TYPE_FP32), ("IN1", [-1], mc.TYPE_FP32)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUT0", [3])]


def test_autocomplete_non_batchable_and_scalar_tensors():
    config = _config("")
    configs.autocomplete(config, _specs((2, 3), datatype="BYTES"), _specs((2, 3), prefix="OUT"), 4)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 3] and config.input[0].data_type == mc.TYPE_STRING
    scalar = _config("")  # [batch] only: dims [1] with an empty reshape, as Triton does
    configs.autocomplete(scalar, _specs((-1,)), _specs((-1,), prefix="OUT"), 8)
    assert scalar.max_batch_size == 8 and list(scalar.input[0].dims) == [1]
    assert scalar.input[0].HasField("reshape") and list(scalar.input[0].reshape.shape) == []


def test_autocomplete_keeps_what_the_config_says():
    config = _config('max_batch_size: 2 input [ { name: "IN0" data_type: TYPE_FP32 dims: [ 4 ] } ]')
    configs.autocomplete(config, _specs((-1, 4)), _specs((-1, 3), prefix="OUT"), 4)
    assert config.max_batch_size == 2 and not config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == ["IN0"] and list(config.output[0].dims) == [3]
    one = _config("max_batch_size: 1")  # max_batch_size 1: no dynamic batching added
    configs.autocomplete(one, _specs((-1, 4)), _specs((-1, 3), prefix="OUT"), 4)
    assert one.max_batch_size == 1


def test_autocomplete_refuses_batching_a_fixed_model():
    config = _config("max_batch_size: 4")
    _fails(lambda: configs.autocomplete(config, _specs((2, 3)), _specs((2, 3), prefix="OUT"), 4),
           "max_batch_size is 4", "no variable first dimension")


def test_configured_tensors_must_match_the_model():
    unknown = _config('input [ { name: "NOPE" data_type: TYPE_FP32 dims: [ 4 ] } ]')
    _fails(lambda: configs.check_against_model(unknown, _specs((-1, 4)), []), "input 'NOPE'", "IN0")
    wrong = _config('input [ { name: "IN0" data_type: TYPE_INT32 dims: [ 4 ] } ]')
    _fails(lambda: configs.check_against_model(wrong, _specs((-1, 4)), []), "'IN0'", "INT32", "FP32")


# ---------------------------------------------------------------- normalize and validate


def test_normalize_applies_triton_defaults():
    config = _config('backend: "onnxruntime" max_batch_size: 8 dynamic_batching {}')
    configs.normalize(config, has_gpu=False)
    assert config.version_policy.latest.num_versions == 1
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    groups = [(g.name, g.kind, g.count) for g in config.instance_group]
    assert groups == [("m_0", mc.ModelInstanceGroup.KIND_CPU, 2)]
    assert config.optimization.input_pinned_memory.enable and config.optimization.output_pinned_memory.enable
    gpu = _config('backend: "onnxruntime" instance_group [ { name: "g" }, { kind: KIND_CPU count: 3 } ]')
    configs.normalize(gpu, has_gpu=True)
    assert [(g.name, g.kind, g.count) for g in gpu.instance_group] == [
        ("g", mc.ModelInstanceGroup.KIND_GPU, 1), ("m_1", mc.ModelInstanceGroup.KIND_CPU, 3)]
    kept = _config("version_policy { all {} } max_batch_size: 8 "
                   "dynamic_batching { preferred_batch_size: [2] }")
    configs.normalize(kept, has_gpu=False)
    assert kept.version_policy.HasField("all") and list(kept.dynamic_batching.preferred_batch_size) == [2]


_IO = ('input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ] '
       'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ] ')


@pytest.mark.parametrize("text, says", [
    ("max_batch_size: -1 " + _IO, "max_batch_size must be >= 0"),
    ('output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]', "lists no inputs"),
    ('input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]', "lists no outputs"),
    (_IO + 'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]', "input 'X' is listed twice"),
    ('input [ { name: "X" dims: [ 4 ] } ] output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
     "input 'X' has no data_type"),
    ('input [ { name: "X" data_type: TYPE_FP32 } ] output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
     "input 'X' has no dims"),
    ('input [ { name: "X" data_type: TYPE_FP32 dims: [ 0 ] } ] '
     'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
     "invalid dims [0]"),
    ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] } " + _IO, "preferred_batch_size 8"),
    ("max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 3 } " + _IO,
     "default_priority_level 3 is outside 1..2"),
    ('instance_group [ { kind: KIND_CPU gpus: [0] } ] ' + _IO, "cannot list gpus"),
])
def test_validation_errors_say_what_is_wrong(text, says):
    _fails(lambda: configs.validate(_config(text)), "model 'm'", says)


def test_unsupported_scheduling_is_unimplemented():
    _fails(lambda: configs.validate(_config("sequence_batching {} " + _IO)), "sequence_batching",
           code=ErrorCode.UNIMPLEMENTED)


def test_to_core_reads_the_normalized_config():
    proto = _config('backend: "onnxruntime" max_batch_size: 4 dynamic_batching { priority_levels: 2 '
                    'default_priority_level: 1 default_queue_policy { allow_timeout_override: true } } '
                    'input [ { name: "X" data_type: TYPE_STRING dims: [ 1 ] reshape { shape: [] } } ] '
                    'output [ { name: "Y" data_type: TYPE_BF16 dims: [ -1 ] } ] '
                    'parameters { key: "intra_op_thread_count" value { string_value: "1" } }')
    configs.normalize(proto, has_gpu=False)
    configs.validate(proto)
    core = configs.to_core(proto, gpu_count=0)
    assert (core.inputs[0].datatype, core.inputs[0].dims, core.inputs[0].reshape) == ("BYTES", (1,), ())
    assert (core.outputs[0].datatype, core.outputs[0].dims) == ("BF16", (-1,))
    assert core.dynamic_batching.priority_levels == 2 and core.dynamic_batching.preferred_batch_sizes == (4,)
    assert core.dynamic_batching.default_queue_policy.allow_timeout_override
    assert core.parameters == {"intra_op_thread_count": "1"}
    assert [(g.kind, g.count) for g in core.instance_groups] == [("KIND_CPU", 2)]
    rendered = configs.to_json_dict(proto)  # the REST rendering: int64 as numbers, defaults printed
    assert rendered["max_batch_size"] == 4 and rendered["input"][0]["data_type"] == "TYPE_STRING"
    assert rendered["dynamic_batching"]["max_queue_delay_microseconds"] == 0
