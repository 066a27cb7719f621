"""MLServer (mlserver==1.7.1) custom runtime serving one ONNX file through onnxruntime.

Used by scripts/peers/mlserver_onnx.py; in a model-settings.json it is named as
``"implementation": "mlserver_onnx.OnnxModel"`` (scripts/peers must be on sys.path).
"""

from .runtime import OnnxModel

__all__ = ["OnnxModel"]
