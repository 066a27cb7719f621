"""An MLServer runtime (``MLModel``) for one ONNX file, run with onnxruntime on the CPU.

model-settings.json:

    {"name": "simple", "implementation": "mlserver_onnx.OnnxModel",
     "parameters": {"uri": "/path/model.onnx", "extra": {"intra_op_threads": 1}}}

One ``onnxruntime.InferenceSession`` (intra-op threads from parameters.extra.intra_op_threads,
default 1; inter-op 1). ``predict`` passes every input of the request to the session by name
as numpy (MLServer's NumpyCodec) and returns every output of the session, or only the
outputs the request names. Output shapes are the arrays' own shapes (NumpyCodec's
encode_output would turn a 1-D [N] output into [N, 1]).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnxruntime as ort

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.codecs.numpy import to_datatype
from mlserver.errors import InferenceError
from mlserver.logging import logger
from mlserver.types import (
    Datatype,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ResponseOutput,
)
from mlserver.utils import get_model_uri

_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _dims(shape) -> List[int]:
    # symbolic / unknown dimensions ("batch", None) are variable: -1
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


class OnnxModel(MLModel):
    async def load(self) -> bool:
        model_file = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        intra = int(extra.get("intra_op_threads", 1))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(model_file, sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        # Model metadata (ModelMetadata RPC) from the session unless the settings give it.
        if not self._settings.inputs:
            self.inputs = [
                MetadataTensor(name=i.name, datatype=Datatype(_ORT_TO_V2[i.type]), shape=_dims(i.shape))
                for i in self._session.get_inputs() if i.type in _ORT_TO_V2
            ]
        if not self._settings.outputs:
            self.outputs = [
                MetadataTensor(name=o.name, datatype=Datatype(_ORT_TO_V2[o.type]), shape=_dims(o.shape))
                for o in self._session.get_outputs() if o.type in _ORT_TO_V2
            ]
        logger.info("loaded %s (intra_op_threads=%d): inputs %s outputs %s", model_file, intra,
                    [i.name for i in self._session.get_inputs()], self._output_names)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        names: Optional[List[str]] = [o.name for o in payload.outputs] if payload.outputs else None
        if names:
            unknown = [n for n in names if n not in self._output_names]
            if unknown:
                raise InferenceError(f"unknown output(s) {unknown} for model '{self.name}'")
        else:
            names = self._output_names
        try:
            results = self._session.run(names, feeds)
        except Exception as e:  # onnxruntime's errors: bad names, dtypes or shapes
            raise InferenceError(f"onnxruntime: {e}") from e
        outputs = []
        for name, arr in zip(names, results):
            arr = np.asarray(arr)
            outputs.append(ResponseOutput(name=name, shape=list(arr.shape), datatype=to_datatype(arr.dtype),
                                          data=arr.flatten().tolist()))
        return InferenceResponse(id=payload.id, model_name=self.name, model_version=self.version,
                                 outputs=outputs)
