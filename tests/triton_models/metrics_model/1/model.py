import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.requests = pb_utils.MetricFamily(name="custom_requests", description="requests seen",
                                              kind=pb_utils.MetricFamily.COUNTER).Metric(labels={"model": "m"})
        self.last = pb_utils.MetricFamily(name="custom_last_x", description="last X",
                                          kind=pb_utils.MetricFamily.GAUGE).Metric(labels={"model": "m"})
        self.sizes = pb_utils.MetricFamily(name="custom_x", description="X values",
                                           kind=pb_utils.MetricFamily.HISTOGRAM).Metric(
            labels={"model": "m"}, buckets=[1.0, 10.0])

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            self.requests.increment(1)
            self.last.set(float(x[0]))
            self.sizes.observe(float(x[0]))
            pb_utils.Logger.log_info(f"metrics_model saw {float(x[0])}")
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
        return out
