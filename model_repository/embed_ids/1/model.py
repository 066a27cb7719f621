"""Token ids -> embedding: the mean of one fixed vector per non-zero id (a stand-in for a learned table)."""

import numpy as np

WIDTH = 4


class TritonPythonModel:
    def execute(self, inputs: dict) -> dict:
        ids = inputs["IDS"]  # [batch, 8] int64, 0 = padding
        # a deterministic vector per id, without a table: sin of the id at four frequencies
        freqs = np.arange(1, WIDTH + 1, dtype=np.float64) * 0.37
        vectors = np.sin(ids[..., None].astype(np.float64) * freqs)  # [batch, 8, WIDTH]
        mask = (ids != 0)[..., None]
        counts = np.maximum(mask.sum(axis=1), 1)
        return {"EMBEDDING": ((vectors * mask).sum(axis=1) / counts).astype(np.float32)}
