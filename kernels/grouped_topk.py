"""Grouped (group-limited) router top-k: DeepSeek-V2's and V3's expert choice, one program per token.

Per token, over E experts split into `n_group` equal groups:

1. scores = softmax(logits) ("softmax", V2) or sigmoid(logits) ("sigmoid", V3), in fp32;
   choice = scores + bias (V3's e_score_correction_bias; no bias = scores);
2. with n_group > 1: every group is ranked by its best choice ("max", V2) or the sum of its two
   best ("top2_sum", V3); only the `topk_group` best groups stay eligible;
3. the `top_k` eligible experts with the highest choice (descending; ties -> lower id);
4. weights are their *unbiased* scores, divided by their sum (+ 1e-20) if `renormalize`, then
   multiplied by `scaling` (routed_scaling_factor).

Everything stays on the device (no host sync), so CUDA graphs capture it. Group sizes need not
be powers of two (DeepSeek-V2: 160 experts in 8 groups): the scores are held as a
[groups, group size] tile.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, check, check_tensor, next_pow2, pick_backend

__all__ = ["grouped_topk", "grouped_topk_ref"]

_SCORINGS = ("softmax", "sigmoid")
_GROUP_RANKS = ("max", "top2_sum")

if HAS_TRITON:

    @triton.jit
    def _grouped_topk_kernel(
        logits_ptr, bias_ptr, w_ptr, id_ptr, stride_t, scaling,
        GS: tl.constexpr, NG: tl.constexpr, TOPK: tl.constexpr, TOPK_GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, BLOCK_K: tl.constexpr,
        SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, TOP2: tl.constexpr, GROUPED: tl.constexpr,
        RENORM: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_j = tl.arange(0, BLOCK_GS)
        eid = offs_g[:, None] * GS + offs_j[None, :]  # expert id of each lane
        valid = (offs_g[:, None] < NG) & (offs_j[None, :] < GS)
        x = tl.load(logits_ptr + t * stride_t + eid, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            p = tl.sigmoid(x)
        else:
            mx = tl.max(tl.max(x, axis=1), axis=0)
            ex = tl.where(valid, tl.exp(x - mx), 0.0)
            p = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
        choice = p
        if HAS_BIAS:
            choice = p + tl.load(bias_ptr + eid, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
        alive = valid
        if GROUPED:
            best1 = tl.max(choice, axis=1)  # [BLOCK_G]
            if TOP2:
                first = tl.min(tl.where(choice == best1[:, None], offs_j[None, :], BLOCK_GS), axis=1)
                rest = tl.where(offs_j[None, :] == first[:, None], float("-inf"), choice)
                gscore = best1 + tl.max(rest, axis=1)
            else:
                gscore = best1
            gscore = tl.where(offs_g < NG, gscore, float("-inf"))
            keep = offs_g < 0  # all False
            for _ in tl.static_range(TOPK_GROUP):
                cand = tl.where(keep, float("-inf"), gscore)
                top = tl.max(cand, axis=0)
                g = tl.min(tl.where((cand == top) & (offs_g < NG) & ~keep, offs_g, BLOCK_G), axis=0)
                keep = keep | (offs_g == g)
            alive = valid & keep[:, None]
        offs_k = tl.arange(0, BLOCK_K)
        wk = tl.zeros([BLOCK_K], dtype=tl.float32)
        ik = tl.zeros([BLOCK_K], dtype=tl.int32)
        for i in tl.static_range(TOPK):
            cand = tl.where(alive, choice, float("-inf"))
            top = tl.max(tl.max(cand, axis=1), axis=0)
            hit = alive & (cand == top)
            e = tl.min(tl.min(tl.where(hit, eid, NG * GS), axis=1), axis=0)
            sel = eid == e
            score = tl.sum(tl.sum(tl.where(sel, p, 0.0), axis=1), axis=0)
            wk = tl.where(offs_k == i, score, wk)
            ik = tl.where(offs_k == i, e, ik)
            alive = alive & ~sel
        kmask = offs_k < TOPK
        if RENORM:
            wk = wk / (tl.sum(tl.where(kmask, wk, 0.0), axis=0) + 1e-20)
        wk = wk * scaling
        tl.store(w_ptr + t * TOPK + offs_k, wk, mask=kmask)
        tl.store(id_ptr + t * TOPK + offs_k, ik, mask=kmask)


def grouped_topk_ref(logits, top_k: int, scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                     group_rank: str = "max", bias=None, renormalize: bool = False, scaling: float = 1.0):
    """Plain-torch reference (any device), transformers' formulas; stable sorts give ties -> lower id."""
    T, E = logits.shape
    lf = logits.float()
    scores = torch.softmax(lf, dim=-1) if scoring == "softmax" else torch.sigmoid(lf)
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        if group_rank == "max":
            gscore = grouped.max(dim=-1).values
        else:
            gscore = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
        gidx = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, gidx, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return (w * scaling).contiguous(), ids.to(torch.int32).contiguous()


def grouped_topk(logits, top_k: int, scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 group_rank: str = "max", bias=None, renormalize: bool = False, scaling: float = 1.0, *,
                 backend: Optional[str] = None):
    """logits `[T, E]` (bias `[E]` or None) -> (weights float32 `[T, top_k]`, ids int32 `[T, top_k]`)."""
    fn = "grouped_topk"
    check_tensor(fn, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, E = logits.shape
    check(scoring in _SCORINGS, f"{fn}: scoring must be one of {_SCORINGS}, got {scoring!r}")
    check(group_rank in _GROUP_RANKS, f"{fn}: group_rank must be one of {_GROUP_RANKS}, got {group_rank!r}")
    check(isinstance(n_group, int) and n_group >= 1 and E % n_group == 0,
          f"{fn}: n_group must be an int >= 1 dividing E={E}, got {n_group!r}")
    check(isinstance(topk_group, int) and 1 <= topk_group <= n_group,
          f"{fn}: topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
    eligible = topk_group * (E // n_group)
    check(isinstance(top_k, int) and 1 <= top_k <= eligible,
          f"{fn}: top_k must be an int in [1, {eligible}] (the experts of topk_group groups), got {top_k!r}")
    check(group_rank != "top2_sum" or n_group == 1 or E // n_group >= 2,
          f"{fn}: group_rank top2_sum needs >= 2 experts per group, got {E // n_group}")
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=1, shape=(E,), dtypes=FLOAT_DTYPES, device=logits.device,
                     contiguous=True)
    be = pick_backend(backend, logits.device, HAS_TRITON, fn)
    if be == "ref":
        return grouped_topk_ref(logits, top_k, scoring, n_group, topk_group, group_rank, bias, renormalize, scaling)
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T > 0:
        GS = E // n_group
        _grouped_topk_kernel[(T,)](
            logits, bias if bias is not None else logits, w, ids, logits.stride(0), float(scaling),
            GS=GS, NG=n_group, TOPK=top_k, TOPK_GROUP=topk_group,
            BLOCK_G=next_pow2(n_group), BLOCK_GS=next_pow2(GS, 2), BLOCK_K=next_pow2(top_k),
            SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None, TOP2=group_rank == "top2_sum",
            GROUPED=n_group > 1, RENORM=bool(renormalize), num_warps=1 if E <= 256 else 4,
        )
    return w, ids
