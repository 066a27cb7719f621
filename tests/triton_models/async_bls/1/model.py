import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            calls = [pb_utils.InferenceRequest(
                model_name="add_sub", requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.Tensor("INPUT0", x[None]), pb_utils.Tensor("INPUT1", np.full((1, 4), k, np.float32))]
            ).async_exec() for k in (1.0, 2.0)]
            first, second = await asyncio.gather(*calls)
            total = (pb_utils.get_output_tensor_by_name(first, "OUTPUT0").as_numpy()
                     + pb_utils.get_output_tensor_by_name(second, "OUTPUT0").as_numpy())[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", total)]))
        return responses
