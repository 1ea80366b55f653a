"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

The random draw for a request's i-th generated token depends only on (seed, i) (see
sampling_params.token_seed), so a request gives the same tokens whatever it is batched with, after a
preemption and in every layout.
"""

from __future__ import annotations

import torch

from afsplit.sampling_params import token_seed
from afsplit.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] float32 (one row per sequence) -> one new token id per sequence."""
    greedy_ids = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            out.append(greedy_ids[row])
            continue
        probs = _filtered_probs(logits[row].float() / p.temperature, p.top_k, p.top_p)
        gen = torch.Generator(device="cpu").manual_seed(token_seed(seq.seed, len(seq.output_token_ids)))
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
    return out


def _filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        drop = cum - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
