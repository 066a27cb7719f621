"""Small language models for the llm tests, built in-process (seeded, nothing downloaded)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tests.harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import build_llm


def tokenizer():
    return build_llm.build_tokenizer(build_llm.documents(build_llm.CORPUS.read_text(encoding="utf-8")))


def random_model(tok, dtype=None, seed: int = 0, n_positions: int = 256):
    """An untrained GPT-2 (2 layers, 64 wide): cheap, deterministic, and with sharp enough logits
    (init std raised) that greedy choices are far from ties."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    return model.to(dtype) if dtype is not None else model


def save_model_folder(folder: Path, n_positions: int = 256) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) of the random model."""
    tok = tokenizer()
    model = random_model(tok, n_positions=n_positions)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


class Collector:
    """Consumer of one sequence's StepOutputs; ``done`` is set by the final one."""

    def __init__(self) -> None:
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, output) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def final(self):
        return self.outputs[-1]

    def wait(self, timeout: float = 60.0):
        assert self.done.wait(timeout), "sequence did not finish"
        return self


LLM_CONFIG = """backend: "llm"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters [
  {{ key: "max_num_seqs" value: {{ string_value: "{max_num_seqs}" }} }},
  {{ key: "kv_cache_tokens" value: {{ string_value: "{kv_cache_tokens}" }} }},
  {{ key: "default_max_tokens" value: {{ string_value: "16" }} }}
]
"""


def llm_repository(root: Path, name: str = "llm", max_num_seqs: int = 8, kv_cache_tokens: int = 4096) -> Path:
    """A repository holding one llm-backend model (the random GPT-2, 1024 positions: room for
    generations long enough to still be running when a test looks)."""
    save_model_folder(root / name / "1", n_positions=1024)
    (root / name / "config.pbtxt").write_text(LLM_CONFIG.format(max_num_seqs=max_num_seqs,
                                                                kv_cache_tokens=kv_cache_tokens))
    return root


def scrape(metrics_port: int) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def wait_metric(metrics_port: int, name: str, value: float, timeout: float = 10.0, **labels: str) -> dict:
    """Scrape until the sample equals ``value`` (or the timeout); the last scrape."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(metrics_port)
        if metric(samples, name, **labels) == value or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert found, f"no sample {name} {labels}"
    return sum(found)
