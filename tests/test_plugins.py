"""Third-party backends: a package registered under the ``inferd.backends`` entry-point group serves
a model without any change to inferd.

The test writes what ``pip install`` leaves in a site directory (the package plus its
``*.dist-info`` with METADATA and entry_points.txt) into a temporary folder and puts that folder
on the server's PYTHONPATH, where ``importlib.metadata`` finds the entry point.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

PLUGIN = '''
"""A tiny inferd backend: OUTPUT = INPUT * the factor written in the model file."""
import numpy as np
from server.core.backend import Backend
from server.core.types import TensorSpec


class ScaleBackend(Backend):
    def __init__(self, factor):
        self.factor = factor

    @classmethod
    def load(cls, ctx):
        return cls(float(ctx.model_file.read_text()))

    def io_specs(self):
        return ([TensorSpec("INPUT", "FP32", (-1, 4))], [TensorSpec("OUTPUT", "FP32", (-1, 4))])

    def execute(self, inputs, outputs):
        return {"OUTPUT": (inputs["INPUT"] * self.factor).astype(np.float32)}
'''


def install_plugin(site: Path) -> None:
    """What ``pip install --target site inferd-scale-plugin`` would leave there."""
    (site / "inferd_scale_plugin").mkdir(parents=True)
    (site / "inferd_scale_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "inferd_scale_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: inferd-scale-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[inferd.backends]\nscale = inferd_scale_plugin:ScaleBackend\n")
    (info / "top_level.txt").write_text("inferd_scale_plugin\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def plugin_server(tmp_path, start_server):
    site = tmp_path / "site"
    install_plugin(site)
    repo = tmp_path / "repo"
    (repo / "scaled" / "1").mkdir(parents=True)
    # backend "scale" is unknown to inferd: its default model file is model.scale, as in Triton
    (repo / "scaled" / "1" / "model.scale").write_text("2.5\n")
    (repo / "scaled" / "config.pbtxt").write_text(textwrap.dedent("""
        backend: "scale"
        max_batch_size: 8
        dynamic_batching { }
    """))
    (repo / "unknown" / "1").mkdir(parents=True)
    (repo / "unknown" / "config.pbtxt").write_text('backend: "nosuchbackend"\n')
    return start_server([repo], env={"PYTHONPATH": str(site)})


def test_plugin_backend_serves_a_model(plugin_server):
    with grpcclient.InferenceServerClient(plugin_server.grpc_url) as client:
        assert client.is_model_ready("scaled")
        config = client.get_model_config("scaled", as_json=True)["config"]
        assert config["backend"] == "scale"
        assert [i["name"] for i in config["input"]] == ["INPUT"]  # completed from the plugin's io_specs
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        inp = grpcclient.InferInput("INPUT", [3, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("scaled", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), x * 2.5)


def test_unknown_backend_lists_the_known_ones_including_plugins(plugin_server):
    with grpcclient.InferenceServerClient(plugin_server.grpc_url) as client:
        row = next(m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == "unknown")
    assert row["state"] == "UNAVAILABLE"
    assert "no backend named 'nosuchbackend'" in row["reason"]
    for name in ("onnxruntime", "python", "pytorch", "scale"):
        assert name in row["reason"], row["reason"]
