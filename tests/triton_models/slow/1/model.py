import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            ms = pb_utils.get_input_tensor_by_name(r, "MS").as_numpy()
            time.sleep(int(ms[0]) / 1000)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("MS_OUT", ms)]))
        return out
