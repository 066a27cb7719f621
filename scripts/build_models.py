"""Build the ONNX files of the example repository (model_repository/) and of the benchmarks.

    python scripts/build_models.py                 # example repository, in place
    python scripts/build_models.py --bench DIR     # also the add_sub and mlp benchmark repository

The PyTorch example (TorchScript simple_torch) needs torch, and tiny_llm (scripts/build_llm.py, kept
once built) needs torch and transformers; without them they are skipped with a note and everything
else still builds. (torch.export examples are built by the tests: loading a .pt2
imports much of torch's compiler stack, which would slow every start of the example server.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_models as m  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

_BENCH_IO = {
    "add_sub": """platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
""",
    "mlp": """platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 512 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 16 ] } ]
""",
}
# add_sub: the model costs microseconds, so batching only saves per-batch overhead.
# mlp: one instance using both cores, plain dynamic batching: the batcher waits for the cohort of
# closed-loop clients on its own (docs/batching.md); it needed a hand-set 20 ms queue delay before.
# Measured on this 2-core machine at c=64 (inferences/s, mean batch) with the old work-conserving
# batcher: 1 instance no delay 542 (9.8), 2 instances no delay 631 (6.0), 2 instances 20 ms 737
# (22.0), 1 instance 20 ms 1003 (28.1).
_BENCH_INSTANCES = {
    "add_sub": "instance_group [ { kind: KIND_CPU count: 1 } ]\n",
    "mlp": "instance_group [ { kind: KIND_CPU count: 1 } ]\n",
}
_BENCH_BATCHING = {
    "add_sub": "dynamic_batching { }\n",
    "mlp": "dynamic_batching { }\n",
}
# mlp_latency: mlp with a 25 ms latency target for the batcher (docs/batching.md)
LATENCY_MODEL = "mlp_latency"
_LATENCY_TARGET = 'parameters: { key: "latency_target_ms" value: { string_value: "25" } }\n'


def bench_config(model: str, batching: bool) -> str:
    """config.pbtxt of a benchmark model; without batching, the same instances and no batcher."""
    return _BENCH_IO[model] + (_BENCH_BATCHING[model] if batching else "") + _BENCH_INSTANCES[model]


def latency_model(repo: Path) -> None:
    """mlp_latency: the mlp file (a copy: model files may not be links) with a latency target."""
    target = repo / LATENCY_MODEL / "1" / "model.onnx"
    source = repo / "mlp" / "1" / "model.onnx"
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (repo / LATENCY_MODEL / "config.pbtxt").write_text(bench_config("mlp", batching=True) + _LATENCY_TARGET)


def example_repository(repo: Path) -> None:
    m.add_sub(repo / "simple" / "1" / "model.onnx")
    m.identity(repo / "simple_identity" / "1" / "model.onnx", "BYTES", ("batch", 1))
    m.dense(repo / "dense" / "1" / "model.onnx", (4, 8, 3), seed=7)


def torch_examples(repo: Path) -> bool:
    """The PyTorch example's binary (its config.pbtxt is committed); False without torch."""
    try:
        import torch_models as tm
    except ImportError as exc:
        print(f"skipping the PyTorch example: {exc} (pip install 'inferd[torch]')")
        return False
    tm.add_sub_named(repo / "simple_torch" / "1" / "model.pt")
    return True


def llm_example(repo: Path) -> bool:
    """tiny_llm's Hugging Face folder (trained from code, see build_llm.py); False without transformers."""
    try:
        import build_llm
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"skipping the tiny_llm example: {exc} (pip install 'inferd[llm]')")
        return False
    build_llm.build(repo / "tiny_llm" / "1")
    return True


def bench_repository(repo: Path) -> None:
    """add_sub and mlp with dynamic batching, and *_nobatch twins with copies of their model files."""
    m.add_sub(repo / "add_sub" / "1" / "model.onnx")
    m.mlp(repo / "mlp" / "1" / "model.onnx")
    for name in _BENCH_IO:
        (repo / name / "config.pbtxt").write_text(bench_config(name, batching=True))
        twin = repo / f"{name}_nobatch"
        (twin / "1").mkdir(parents=True, exist_ok=True)
        copy = twin / "1" / "model.onnx"  # a copy: a symlink out of the model's folder is refused
        if copy.is_symlink() or not copy.exists():
            copy.unlink(missing_ok=True)
            shutil.copyfile(repo / name / "1" / "model.onnx", copy)
        (twin / "config.pbtxt").write_text(bench_config(name, batching=False))
    latency_model(repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--bench", type=Path, help="also build the benchmark repository here")
    args = parser.parse_args()
    example_repository(args.repository)
    torch_examples(args.repository)
    llm_example(args.repository)
    if args.bench:
        bench_repository(args.bench)
    print("models built")


if __name__ == "__main__":
    main()
