"""Scores -> softmax probabilities and the name of the most probable label."""

import numpy as np


class TritonPythonModel:
    def initialize(self, config: dict) -> None:
        self.labels = config["parameters"]["labels"]["string_value"].split(",")

    def execute(self, inputs: dict) -> dict:
        scores = inputs["SCORES"].astype(np.float64)  # [batch, 3]
        exp = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        labels = np.array([[self.labels[i].encode("utf-8")] for i in best], dtype=np.object_)
        return {"PROBS": probs.astype(np.float32), "LABEL": labels}
