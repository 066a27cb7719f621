"""Text -> hashed token ids (the "hashing trick"): lowercase, split into words, crc32 each word.

IDS [8] holds the first 8 word ids (1..vocab_size; 0 pads), LENGTH the number of words.
"""

import re
import zlib

import numpy as np

WORD = re.compile(r"\w+")


class TritonPythonModel:
    def initialize(self, config: dict) -> None:
        self.vocab = int(config["parameters"]["vocab_size"]["string_value"])
        ids = next(o for o in config["output"] if o["name"] == "IDS")
        self.width = ids["dims"][0]

    def execute(self, inputs: dict) -> dict:
        texts = inputs["TEXT"]  # object array [batch, 1] of bytes
        ids = np.zeros((len(texts), self.width), dtype=np.int64)
        lengths = np.zeros((len(texts), 1), dtype=np.int32)
        for row, text in enumerate(texts[:, 0]):
            words = WORD.findall(text.decode("utf-8").lower())
            lengths[row, 0] = len(words)
            for col, word in enumerate(words[: self.width]):
                ids[row, col] = zlib.crc32(word.encode("utf-8")) % self.vocab + 1
        return {"IDS": ids, "LENGTH": lengths}

    def finalize(self) -> None:
        # called at unload: a model holding files, threads or GPU memory releases them here
        self.vocab = self.width = 0
