"""Token sampling for a whole step at once, on the logits' device: greedy, temperature, top-k, top-p, seeds.

The draw for a request's i-th generated token depends only on (seed, i) (sampling_params.token_seed), so a
request gives the same tokens whatever it is batched with, after a preemption and in every layout. Instead of
a random generator per request (a host round trip, a copy of its vocabulary-sized row and a handful of
launches per sampled row: ~20-30 ms a step at 64 sampled rows of a 151k vocabulary), each row's key
(token_seed) and each vocabulary index go through a counter-based hash (murmur3's 32-bit finaliser, in
integer tensor ops) to a uniform u_v and an exponential variate E_v = -log u_v; the token is
argmax_v p_v / E_v, which is v with probability p_v (the exponential race, i.e. the Gumbel-max trick). So
the step's sampling is a few elementwise passes and one argmax over [B, V] with no host sync, and its
tokens stay on the device, where async scheduling feeds them to the step ahead (afsplit/step_ahead.py).
"""

from __future__ import annotations

import torch

from afsplit.sampling_params import token_seed
from afsplit.sequence import Sequence
from afsplit.transfers import to_device

MAX_ELEMENTS = 1 << 24  # logits sampled at once: rows are taken in chunks of this many values (memory)
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), in 16-bit halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijection of 32-bit values whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def exponentials(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Exp(1) variates, a pure function of (keys[b], v): keys int64 [B] of 64 bits."""
    v = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    lo, hi = (keys & _M32)[:, None], ((keys >> 32) & _M32)[:, None]
    h = _fmix32(_fmix32((v + hi) & _M32) ^ lo)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, inside (0, 1)
    return -torch.log(u)


def filtered_probs(logits: torch.Tensor, temperature: list[float], top_k: list[int],
                   top_p: list[float]) -> torch.Tensor:
    """Row-wise softmax(logits / temperature) after top-k (values below the k-th largest dropped; k <= 0 or
    k >= V: none) and top-p (the smallest prefix of the sorted probabilities whose mass reaches p kept,
    renormalised; p >= 1: none). logits [B, V]; one setting per row, as host lists (what to filter is decided
    on the host, so nothing here waits for the device)."""
    dev, V = logits.device, logits.shape[-1]
    scaled = logits.float() / to_device(temperature, torch.float32, dev)[:, None]
    ks = [k if 0 < k < V else V for k in top_k]
    cut = [k < V for k in ks]
    if any(cut):
        kmax = max(k for k, c in zip(ks, cut) if c)
        index = to_device([min(k, kmax) - 1 for k in ks], torch.int64, dev)[:, None]
        kth = scaled.topk(kmax, dim=-1).values.gather(1, index)
        rows = to_device(cut, torch.bool, dev)[:, None]
        scaled = scaled.masked_fill(rows & (scaled < kth), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    nucleus = [b for b, p in enumerate(top_p) if p < 1.0]
    if nucleus:
        rows = to_device(nucleus, torch.int64, dev)
        p = to_device([top_p[b] for b in nucleus], torch.float32, dev)[:, None]
        sub = probs[rows]
        sorted_probs, order = sub.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > p
        kept = torch.zeros_like(sub).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
        probs[rows] = kept / kept.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence], positions: list[int] | None = None) -> torch.Tensor:
    """logits [B, V] (one row per sequence) -> the new token ids [B] (int64, on the logits' device).

    positions[b]: which generated token of seqs[b] is drawn (default: the next, len(output_token_ids)).
    Greedy rows take the argmax; the others the draw described in the module docstring."""
    greedy = [s.params.greedy for s in seqs]
    tokens = logits.argmax(dim=-1)
    if all(greedy):
        return tokens
    rows = [b for b, g in enumerate(greedy) if not g]
    if positions is None:
        positions = [len(s.output_token_ids) for s in seqs]
    dev, V = logits.device, logits.shape[-1]
    chunk = max(1, MAX_ELEMENTS // V)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        params = [seqs[b].params for b in part]
        index = to_device(part, torch.int64, dev)
        probs = filtered_probs(logits[index], [p.temperature for p in params], [p.top_k for p in params],
                               [p.top_p for p in params])
        keys = to_device([token_seed(seqs[b].seed, positions[b]) for b in part], torch.int64, dev)
        tokens[index] = (probs / exponentials(keys, V)).argmax(dim=-1)
    return tokens
