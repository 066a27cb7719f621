"""A default-mode model that breaks the rules on request (HOW), for the error texts."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            how = pb_utils.get_input_tensor_by_name(r, "HOW").as_numpy()[0].decode()
            good = pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.zeros(2, np.float32))])
            if how == "two":
                sender = r.get_response_sender()
                sender.send(good)
                try:
                    sender.send(good)
                except pb_utils.TritonError as exc:
                    pb_utils.Logger.log_error(f"second send refused: {exc.message()}")
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                out.append(None)
            elif how == "shape":
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.zeros(3, np.float32))]))
            elif how == "raise":
                raise pb_utils.TritonModelException("model says no")
            elif how == "short":
                return []
            elif how == "sender":
                sender = r.get_response_sender()
                sender.send(good, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return None
            else:
                out.append(good)
        return out
