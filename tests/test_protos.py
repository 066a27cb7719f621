"""The project's protos: stubs are fresh, wire-compatible with Triton's, and parse config.pbtxt."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory, text_format

from server.protos import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- generated stubs are fresh


def test_generated_stubs_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "server/protos is stale; run scripts/gen_proto.py\n" + proc.stdout + proc.stderr
    )


# ---------------------------------------------------------------- Triton's descriptors


def _serialized_file_descriptor(pb2_path: Path) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers, read without importing it.

    Importing tritonclient's modules here would register them in the default descriptor pool,
    where they would clash with ours if the two ever diverged; reading them into a private
    pool keeps this comparison meaningful (and its failure readable) in every case.
    """
    tree = ast.parse(pb2_path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise AssertionError(f"no AddSerializedFile(b'...') call in {pb2_path}")


@pytest.fixture(scope="module")
def triton_files() -> tuple[descriptor.FileDescriptor, descriptor.FileDescriptor]:
    spec = importlib.util.find_spec("tritonclient")  # a dev dependency: missing is a failure, not a skip
    assert spec is not None and spec.submodule_search_locations, "tritonclient is not installed (pip install -e .[dev])"
    grpc_dir = Path(list(spec.submodule_search_locations)[0]) / "grpc"
    pool = descriptor_pool.DescriptorPool()
    model_config = pool.AddSerializedFile(_serialized_file_descriptor(grpc_dir / "model_config_pb2.py"))
    service = pool.AddSerializedFile(_serialized_file_descriptor(grpc_dir / "service_pb2.py"))
    return model_config, service


OUR_FILES = (model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR)


def _messages(container):
    """Every message type of a file (or message), nested ones included."""
    children = (
        container.message_types_by_name.values()
        if isinstance(container, descriptor.FileDescriptor)
        else container.nested_types
    )
    for msg in children:
        yield msg
        yield from _messages(msg)


def _enums(file: descriptor.FileDescriptor):
    yield from file.enum_types_by_name.values()
    for msg in _messages(file):
        yield from msg.enum_types


def _index(files):
    messages, enums, services = {}, {}, {}
    for f in files:
        messages.update((m.full_name, m) for m in _messages(f))
        enums.update((e.full_name, e) for e in _enums(f))
        services.update((s.full_name, s) for s in f.services_by_name.values())
    return messages, enums, services


def _field_signature(field: descriptor.FieldDescriptor) -> dict:
    return {
        "number": field.number,
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "repeated": field.is_repeated,
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


def _compatibility_mismatches(triton_files) -> list[str]:
    ours_msgs, ours_enums, ours_services = _index(OUR_FILES)
    theirs_msgs, theirs_enums, theirs_services = _index(triton_files)
    problems = []

    for f_ours, f_theirs in zip(OUR_FILES, triton_files):
        if f_ours.package != f_theirs.package:
            problems.append(f"{f_ours.name}: package {f_ours.package!r} != Triton's {f_theirs.package!r}")

    for name, theirs in theirs_msgs.items():
        ours = ours_msgs.get(name)
        if ours is None:
            problems.append(f"message {name}: missing")
            continue
        if ours.GetOptions().map_entry != theirs.GetOptions().map_entry:
            problems.append(f"message {name}: map_entry differs")
        for fname, tfield in theirs.fields_by_name.items():
            ofield = ours.fields_by_name.get(fname)
            if ofield is None:
                problems.append(f"field {name}.{fname}: missing")
                continue
            want, got = _field_signature(tfield), _field_signature(ofield)
            for key in want:
                if want[key] != got[key]:
                    problems.append(f"field {name}.{fname}: {key} is {got[key]!r}, Triton has {want[key]!r}")

    for name, theirs in theirs_enums.items():
        ours = ours_enums.get(name)
        if ours is None:
            problems.append(f"enum {name}: missing")
            continue
        ours_values = {v.name: v.number for v in ours.values}
        for v in theirs.values:
            if ours_values.get(v.name) != v.number:
                problems.append(f"enum {name}.{v.name}: ours {ours_values.get(v.name)!r}, Triton {v.number}")

    for name, theirs in theirs_services.items():
        ours = ours_services.get(name)
        if ours is None:
            problems.append(f"service {name}: missing")
            continue
        for tm in theirs.methods:
            om = ours.methods_by_name.get(tm.name)
            if om is None:
                problems.append(f"rpc {name}.{tm.name}: missing")
                continue
            for attr in ("client_streaming", "server_streaming"):
                if getattr(om, attr) != getattr(tm, attr):
                    problems.append(f"rpc {name}.{tm.name}: {attr} differs")
            for attr in ("input_type", "output_type"):
                if getattr(om, attr).full_name != getattr(tm, attr).full_name:
                    problems.append(
                        f"rpc {name}.{tm.name}: {attr} {getattr(om, attr).full_name}"
                        f" != Triton's {getattr(tm, attr).full_name}"
                    )
    return problems


def test_wire_compatible_with_triton(triton_files):
    problems = _compatibility_mismatches(triton_files)
    assert not problems, f"{len(problems)} incompatibilities with Triton's protos:\n" + "\n".join(problems)


def test_walk_covers_everything(triton_files):
    # Guards the comparison itself against silently walking nothing.
    msgs, enums, services = _index(triton_files)
    assert "inference.ModelInferRequest.InferInputTensor" in msgs
    assert "inference.ModelSequenceBatching.InitialState" in msgs
    assert "inference.ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound" in msgs
    assert "inference.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind" in enums
    assert len(services["inference.GRPCInferenceService"].methods) == 20
    assert len(msgs) > 100


def test_bytes_round_trip_through_triton_classes(triton_files):
    """Messages serialized by our classes parse into Triton's and vice versa, losslessly."""
    _, service = triton_files
    pool = service.pool

    req = grpc_service_pb2.ModelInferRequest(model_name="m", model_version="2", id="r1")
    req.parameters["priority"].uint64_param = 3
    req.parameters["sequence_id"].string_param = "abc"
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    t.parameters["shared_memory_region"].string_param = "r"
    t.contents.fp32_contents.extend([1.0, 2.0])
    req.outputs.add(name="OUT").parameters["classification"].int64_param = 2
    req.raw_input_contents.append(b"\x00\x01")

    cfg = grpc_service_pb2.ModelConfigResponse()
    text_format.Parse(REALISTIC_CONFIG, cfg.config)

    for msg in (req, cfg):
        triton_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(msg.DESCRIPTOR.full_name))
        theirs = triton_cls.FromString(msg.SerializeToString())
        assert text_format.MessageToString(theirs) == text_format.MessageToString(msg)
        assert type(msg).FromString(theirs.SerializeToString()) == msg


def test_shares_a_process_with_tritonclient():
    """tritonclient registers Triton's descriptors under the same file names in the default pool.

    protobuf only accepts a second registration of grpc_service.proto / model_config.proto when it
    is byte-identical, so server.protos and tritonclient.grpc can be imported together (in either
    order) only while our descriptors serialize exactly like Triton's: same fields, same order,
    no extra fields. Run in subprocesses so the import order is controlled.
    """
    orders = [
        "import tritonclient.grpc; import server.protos.grpc_service_pb2_grpc",
        "import server.protos.grpc_service_pb2_grpc; import tritonclient.grpc",
    ]
    for code in orders:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{code!r} failed:\n{proc.stderr[-2000:]}"


# ---------------------------------------------------------------- config.pbtxt text format

REALISTIC_CONFIG = r"""
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  },
  {
    name: "MASK"
    data_type: TYPE_BOOL
    dims: [ -1 ]
    optional: true
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
instance_group [
  { name: "gpu_group" kind: KIND_GPU count: 2 gpus: [ 0, 1 ] },
  { kind: KIND_CPU count: 1 }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 5000
    allow_timeout_override: true
    max_queue_size: 16
  }
  priority_queue_policy {
    key: 1
    value: { timeout_action: REJECT max_queue_size: 4 }
  }
  priority_queue_policy {
    key: 2
    value: { default_timeout_microseconds: 100000 }
  }
}
parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
parameters: { key: "cudnn_conv_algo_search" value: { string_value: "HEURISTIC" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 2
    count: 3
    inputs { key: "INPUT__0" value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
    inputs { key: "MASK" value: { data_type: TYPE_BOOL dims: [ 7 ] input_data_file: "mask.bin" } }
  }
]
optimization {
  graph { level: 1 }
  priority: PRIORITY_MAX
  execution_accelerators {
    gpu_execution_accelerator: [
      {
        name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" }
      }
    ]
    cpu_execution_accelerator: [ { name: "openvino" } ]
  }
  input_pinned_memory { enable: true }
  cuda {
    graphs: true
    graph_spec [ { batch_size: 4 input { key: "INPUT__0" value { dim: [ 3, 224, 224 ] } } } ]
  }
}
model_transaction_policy { decoupled: false }
response_cache { enable: true }
metric_tags { key: "team" value: "vision" }
"""


def test_realistic_config_pbtxt_parses():
    MC = model_config_pb2.ModelConfig
    cfg = text_format.Parse(REALISTIC_CONFIG, MC())

    assert cfg.name == "resnet"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 2

    inp0, mask = cfg.input
    assert inp0.name == "INPUT__0"
    assert inp0.data_type == model_config_pb2.TYPE_FP32
    assert inp0.format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert list(inp0.dims) == [3, 224, 224]
    assert inp0.HasField("reshape") and list(inp0.reshape.shape) == [1, 3, 224, 224]
    assert mask.data_type == model_config_pb2.TYPE_BOOL and list(mask.dims) == [-1] and mask.optional
    assert not mask.HasField("reshape")
    (out,) = cfg.output
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == (
        "OUTPUT__0",
        model_config_pb2.TYPE_FP32,
        [1000],
        "labels.txt",
    )

    gpu_group, cpu_group = cfg.instance_group
    assert gpu_group.name == "gpu_group"
    assert gpu_group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert gpu_group.count == 2 and list(gpu_group.gpus) == [0, 1]
    assert cpu_group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and list(cpu_group.gpus) == []

    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.max_queue_delay_microseconds == 100
    assert db.preserve_ordering
    assert db.priority_levels == 2 and db.default_priority_level == 2
    QP = model_config_pb2.ModelQueuePolicy
    assert db.default_queue_policy.timeout_action == QP.DELAY
    assert db.default_queue_policy.default_timeout_microseconds == 5000
    assert db.default_queue_policy.allow_timeout_override
    assert db.default_queue_policy.max_queue_size == 16
    assert sorted(db.priority_queue_policy) == [1, 2]
    assert db.priority_queue_policy[1].timeout_action == QP.REJECT
    assert db.priority_queue_policy[1].max_queue_size == 4
    assert db.priority_queue_policy[2].default_timeout_microseconds == 100000

    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "intra_op_thread_count": "4",
        "cudnn_conv_algo_search": "HEURISTIC",
    }

    (warm,) = cfg.model_warmup
    assert (warm.name, warm.batch_size, warm.count) == ("zeros", 2, 3)
    assert set(warm.inputs) == {"INPUT__0", "MASK"}
    assert warm.inputs["INPUT__0"].WhichOneof("input_data_type") == "zero_data"
    assert list(warm.inputs["INPUT__0"].dims) == [3, 224, 224]
    assert warm.inputs["MASK"].WhichOneof("input_data_type") == "input_data_file"
    assert warm.inputs["MASK"].input_data_file == "mask.bin"

    opt = cfg.optimization
    assert opt.graph.level == 1
    assert opt.priority == model_config_pb2.ModelOptimizationPolicy.PRIORITY_MAX
    (trt,) = opt.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert dict(trt.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}
    assert [a.name for a in opt.execution_accelerators.cpu_execution_accelerator] == ["openvino"]
    assert opt.input_pinned_memory.enable and not opt.HasField("output_pinned_memory")
    assert opt.cuda.graphs
    assert list(opt.cuda.graph_spec[0].input["INPUT__0"].dim) == [3, 224, 224]

    assert not cfg.model_transaction_policy.decoupled
    assert cfg.response_cache.enable
    assert dict(cfg.metric_tags) == {"team": "vision"}

    # Text format round trip is lossless.
    assert text_format.Parse(text_format.MessageToString(cfg), MC()) == cfg


@pytest.mark.parametrize(
    "text, which, check",
    [
        ("version_policy: { all { }}", "all", lambda vp: True),
        ("version_policy: { latest: { num_versions: 1 }}", "latest", lambda vp: vp.latest.num_versions == 1),
        (
            "version_policy: { specific: { versions: [1, 3] }}",
            "specific",
            lambda vp: list(vp.specific.versions) == [1, 3],
        ),
    ],
)
def test_version_policy_forms(text, which, check):
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.HasField("version_policy")
    assert cfg.version_policy.WhichOneof("policy_choice") == which
    assert check(cfg.version_policy)


def test_sequence_and_ensemble_configs_parse():
    seq = text_format.Parse(
        """
        backend: "python"
        max_batch_size: 4
        sequence_batching {
          max_sequence_idle_microseconds: 5000000
          oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }
          control_input [
            { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
            { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
          ]
          state [
            {
              input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
              initial_state: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "init" }
            }
          ]
        }
        """,
        model_config_pb2.ModelConfig(),
    )
    sb = seq.sequence_batching
    assert seq.WhichOneof("scheduling_choice") == "sequence_batching"
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences == 4
    Kind = model_config_pb2.ModelSequenceBatching.Control.Kind
    assert [ci.control[0].kind for ci in sb.control_input] == [
        Kind.Value("CONTROL_SEQUENCE_START"),
        Kind.Value("CONTROL_SEQUENCE_CORRID"),
    ]
    assert list(sb.control_input[0].control[0].fp32_false_true) == [0.0, 1.0]
    assert sb.state[0].initial_state[0].WhichOneof("state_data") == "zero_data"

    ens = text_format.Parse(
        """
        platform: "ensemble"
        ensemble_scheduling {
          step [
            { model_name: "pre" model_version: -1 input_map { key: "RAW" value: "IN" }
              output_map { key: "OUT" value: "mid" } },
            { model_name: "net" model_version: 2 input_map { key: "x" value: "mid" } }
          ]
        }
        """,
        model_config_pb2.ModelConfig(),
    )
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["pre", "net"]
    assert steps[0].model_version == -1 and dict(steps[0].output_map) == {"OUT": "mid"}


def test_unknown_config_field_is_rejected():
    with pytest.raises(text_format.ParseError):
        text_format.Parse('max_batch_size: 1 no_such_field: 3', model_config_pb2.ModelConfig())
