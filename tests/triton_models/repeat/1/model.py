"""Decoupled: one response per element of IN, DELAY_MS apart, from a thread; counts what it sent and
how often it saw a cancellation in custom metrics (the tests read them on /metrics)."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        family = pb_utils.MetricFamily(name="repeat_sent", description="responses sent",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.sent = family.Metric(labels={"model": "repeat"})
        cancelled = pb_utils.MetricFamily(name="repeat_cancelled", description="requests stopped by a cancel",
                                          kind=pb_utils.MetricFamily.COUNTER)
        self.cancelled = cancelled.Metric(labels={"model": "repeat"})

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            delay = int(pb_utils.get_input_tensor_by_name(request, "DELAY_MS").as_numpy()[0]) / 1000
            threading.Thread(target=self.run, args=(request.get_response_sender(), values, delay),
                             daemon=True).start()
        return None

    def run(self, sender, values, delay):
        for i, value in enumerate(values):
            if sender.is_cancelled():
                self.cancelled.increment(1)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "Request was cancelled", pb_utils.TritonError.CANCELLED)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            out = pb_utils.Tensor("OUT", np.array([value], dtype=np.int32))
            idx = pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out, idx]))
            self.sent.increment(1)
            time.sleep(delay)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
