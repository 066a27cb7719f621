"""Next-token choice for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .params import SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 + how many tokens were more likely
    top: list[tuple[int, float]]  # the most likely tokens of the step, best first


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over one row of logits."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of ``logits`` [rows, vocab]."""
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        chosen = chosen.clone()
        for i in sampled:
            probs = torch.softmax(_filtered(logits[i].float(), params[i]), dim=-1)
            chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen.tolist()


def logprobs(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int],
             counts: Sequence[int]) -> list[TokenLogprobs]:
    """The model's log-probabilities (before sampling filters, as vLLM reports them) of the chosen
    token in each of ``rows``, with the ``counts[i]`` most likely alternatives."""
    out = []
    for row, token, count in zip(rows, tokens, counts):
        lp = torch.log_softmax(logits[row].float(), dim=-1)
        top: list[tuple[int, float]] = []
        if count:
            values, ids = torch.topk(lp, count)
            top = list(zip(ids.tolist(), values.tolist()))
        chosen = lp[token]
        out.append(TokenLogprobs(token, float(chosen), int((lp > chosen).sum()) + 1, top))
    return out
