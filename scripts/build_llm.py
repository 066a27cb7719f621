"""Build ``tiny_llm``: a small GPT-2-style causal LM and its byte-level BPE tokenizer, from code.

    python scripts/build_llm.py [--out DIR] [--steps N] [--force]

Nothing is downloaded. The tokenizer (byte-level BPE, 512 tokens, a chat template) is trained
in-process on ``scripts/llm_corpus.txt``; the model (2 layers, 128 wide, 512 positions) starts from
a fixed seed and is trained for a few hundred steps on the same text, so its output is readable
rather than random bytes. Everything is seeded: the same checkout builds the same weights. The
result is a Hugging Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...)
written with ``save_pretrained`` into ``model_repository/tiny_llm/1/``, which the ``llm`` backend
loads with ``local_files_only=True``. An existing build is kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "llm_corpus.txt"
EOS = "<|endoftext|>"
VOCAB_SIZE = 512
# A plain role-tagged template (BOS first, as the tokenizer adds it to plain text); the corpus's dialogues are written in it, so chat answers look right.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def documents(text: str) -> list[str]:
    """One document per prose line; a dialogue turn (user line + assistant line) is one document."""
    docs: list[str] = []
    lines = [line for line in text.splitlines() if line.strip()]
    i = 0
    while i < len(lines):
        if lines[i] == "<|user|>" and i + 3 < len(lines) and lines[i + 2] == "<|assistant|>":
            docs.append(f"<|user|>\n{lines[i + 1]}\n<|assistant|>\n{lines[i + 3]}")
            i += 4
        else:
            docs.append(lines[i])
            i += 1
    return docs


def build_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    # every text starts with <|endoftext|> as its BOS, as every document did in training
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, eos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   pad_token=EOS, model_max_length=512,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, docs: list[str], steps: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPT2LMHeadModel(config)
    # one token stream "<eos> doc <eos> doc ...": every training window starts at a document's
    # <eos>, at position 0, as every prompt does at serving time (BOS first)
    stream: list[int] = []
    starts_at: list[int] = []
    for doc in docs:
        starts_at.append(len(stream))
        stream += [eos] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    stream.append(eos)
    window, batch = 64, 32
    stream += [eos] * window  # windows near the end stay full length
    data = torch.tensor(stream, dtype=torch.long)
    doc_starts = torch.tensor(starts_at)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = doc_starts[torch.randint(0, len(doc_starts), (batch,), generator=generator)]
        x = torch.stack([data[s:s + window] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model, float(loss.detach())


def build(out: Path, steps: int = 150, force: bool = False) -> bool:
    """Write the folder; False when a complete build is already there (and not forced)."""
    if not force and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return False
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        started = time.monotonic()
        docs = documents(CORPUS.read_text(encoding="utf-8"))
        tokenizer = build_tokenizer(docs)
        model, loss = build_model(tokenizer, docs, steps)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        print(f"tiny_llm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{steps} steps, final loss {loss:.2f}, {time.monotonic() - started:.1f} s -> {out}")
    finally:
        torch.set_num_threads(threads)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "model_repository" / "tiny_llm" / "1")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args()
    if not build(args.out, args.steps, args.force):
        print(f"tiny_llm: already built in {args.out} (--force rebuilds)")


if __name__ == "__main__":
    main()
