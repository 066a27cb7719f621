"""Streams a count: one response per step from a thread of its own, so the instance is free for
the next request at once. Stops early when the client cancels; always ends with the final flag."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy().reshape(-1)[0])
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            delay_s = 0.0 if delay is None else int(delay.as_numpy().reshape(-1)[0]) / 1000
            sender = request.get_response_sender()
            if count < 0 or count > 10_000:
                error = pb_utils.TritonError("COUNT must be in 0..10000", pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            threading.Thread(target=self._stream, args=(sender, count, delay_s), daemon=True).start()
        return None

    def _stream(self, sender, count, delay_s):
        for i in range(count):
            if sender.is_cancelled():
                self.logger.log_info(f"count: cancelled after {i} responses")
                break
            out = pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))
            text = pb_utils.Tensor("TEXT", np.array([f"tick {i}".encode()], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out, text]))
            if delay_s:
                time.sleep(delay_s)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
