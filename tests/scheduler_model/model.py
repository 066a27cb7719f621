"""A Python-backend probe for scheduler tests: it sleeps, records what it executed, and says so.

Inputs: INPUT0 INT32 [batch, N]; DELAY_MS FP32 [batch, 1] (the batch sleeps for the largest).
Outputs: OUTPUT0 = 2 * INPUT0; BATCH = rows in the executed batch; SEQ = execution number.
A negative INPUT0 value makes execute() raise. Every executed INPUT0 row's first value is
appended to executed.log in the model folder, so a test can prove a request never ran.
"""

import itertools
import threading
import time
from pathlib import Path

import numpy as np

_seq = itertools.count()
_lock = threading.Lock()


class TritonPythonModel:
    def initialize(self, config):
        self.log = Path(config["model_repository"]) / "executed.log"

    def execute(self, inputs):
        values = inputs["INPUT0"]
        delay = float(inputs["DELAY_MS"].max()) / 1000.0
        if (values < 0).any():
            raise ValueError(f"negative input {int(values.min())}")
        time.sleep(delay)
        with _lock:
            seq = next(_seq)
            with self.log.open("a") as f:
                f.write("".join(f"{int(v)}\n" for v in values[:, 0]))
        batch = values.shape[0]
        return {
            "OUTPUT0": values * 2,
            "BATCH": np.full((batch, 1), batch, dtype=np.int32),
            "SEQ": np.full((batch, 1), seq, dtype=np.int64),
        }
