"""BLS: MODE 'sync' calls add_sub with exec(), 'async' with async_exec() (see async_bls), 'stream'
calls the decoupled repeat model with exec(decoupled=True) and sums what it streams."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            mode = pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0].decode()
            in0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            if mode == "sync":
                call = pb_utils.InferenceRequest(
                    model_name="add_sub", requested_output_names=["OUTPUT0"],
                    inputs=[pb_utils.Tensor("INPUT0", in0[None]), pb_utils.Tensor("INPUT1", in1[None])])
                reply = call.exec()
                if reply.has_error():
                    raise pb_utils.TritonModelException(reply.error().message())
                out = pb_utils.get_output_tensor_by_name(reply, "OUTPUT0").as_numpy()[0]
                count = 1
            elif mode == "stream":
                call = pb_utils.InferenceRequest(
                    model_name="repeat", requested_output_names=["OUT"],
                    inputs=[pb_utils.Tensor("IN", in0.astype(np.int32)),
                            pb_utils.Tensor("DELAY_MS", np.array([0], np.int32))])
                total, count = 0, 0
                for reply in call.exec(decoupled=True):
                    if reply.has_error():
                        raise pb_utils.TritonModelException(reply.error().message())
                    if reply.output_tensors():
                        total += int(pb_utils.get_output_tensor_by_name(reply, "OUT").as_numpy()[0])
                        count += 1
                out = np.full(4, total, np.float32)
            elif mode == "missing":
                reply = pb_utils.InferenceRequest(model_name="no_such_model", requested_output_names=["X"],
                                                  inputs=[pb_utils.Tensor("X", in0)]).exec()
                responses.append(pb_utils.InferenceResponse(error=reply.error()))
                continue
            else:
                raise pb_utils.TritonModelException(f"unknown MODE {mode!r}")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", out.astype(np.float32)),
                                                         pb_utils.Tensor("COUNT", np.array([count], np.int32))]))
        return responses
