"""Router top-k: scores over all experts in fp32, top-k (descending, ties -> lower expert id),
optional renormalisation of the k weights to sum 1.

scoring="softmax": HF Mixtral (renormalize=True), Qwen2/3-MoE and OLMoE (renormalize =
config.norm_topk_prob). scoring="sigmoid": independent sigmoid scores per expert.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, check, check_tensor, next_pow2, pick_backend

__all__ = ["topk_gating", "topk_gating_ref"]

_SCORINGS = ("softmax", "sigmoid")

if HAS_TRITON:

    @triton.jit
    def _topk_kernel(
        logits_ptr, w_ptr, id_ptr, stride_t, E,
        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        RENORM: tl.constexpr, SIGMOID: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < E
        x = tl.load(logits_ptr + t * stride_t + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            p = tl.sigmoid(x)
        else:
            mx = tl.max(x, axis=0)
            ex = tl.where(mask, tl.exp(x - mx), 0.0)
            p = ex / tl.sum(ex, axis=0)
        # padded lanes rank below every real expert (real scores are >= 0)
        work = tl.where(mask, p, -1.0)
        offs_k = tl.arange(0, BLOCK_K)
        wk = tl.zeros([BLOCK_K], dtype=tl.float32)
        ik = tl.zeros([BLOCK_K], dtype=tl.int32)
        for i in tl.static_range(TOPK):
            best = tl.max(work, axis=0)
            # lowest index among the maxima
            idx = tl.min(tl.where(work == best, offs, BLOCK_E), axis=0)
            wk = tl.where(offs_k == i, best, wk)
            ik = tl.where(offs_k == i, idx, ik)
            work = tl.where(offs == idx, -2.0, work)
        kmask = offs_k < TOPK
        if RENORM:
            wk = wk / tl.sum(tl.where(kmask, wk, 0.0), axis=0)
        tl.store(w_ptr + t * TOPK + offs_k, wk, mask=kmask)
        tl.store(id_ptr + t * TOPK + offs_k, ik, mask=kmask)


def topk_gating_ref(logits, top_k: int, renormalize: bool, scoring: str = "softmax"):
    """Plain-torch reference (any device): stable sort gives ties -> lower expert id."""
    lf = logits.float()
    p = torch.softmax(lf, dim=-1) if scoring == "softmax" else torch.sigmoid(lf)
    vals, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    w = vals[:, :top_k].contiguous()
    ids = idx[:, :top_k].to(torch.int32).contiguous()
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def topk_gating(logits, top_k: int, renormalize: bool, scoring: str = "softmax", *, backend: Optional[str] = None):
    """logits `[T, E]` -> (weights float32 `[T, top_k]`, ids int32 `[T, top_k]`)."""
    fn = "topk_gating"
    check_tensor(fn, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, E = logits.shape
    check(isinstance(top_k, int) and 1 <= top_k <= E, f"{fn}: top_k must be an int in [1, E={E}], got {top_k!r}")
    check(scoring in _SCORINGS, f"{fn}: scoring must be one of {_SCORINGS}, got {scoring!r}")
    be = pick_backend(backend, logits.device, HAS_TRITON, fn)
    if be == "ref":
        return topk_gating_ref(logits, top_k, renormalize, scoring)
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T > 0:
        _topk_kernel[(T,)](logits, w, ids, logits.stride(0), E, TOPK=top_k, BLOCK_K=next_pow2(top_k),
                           BLOCK_E=next_pow2(E, 2), RENORM=bool(renormalize), SIGMOID=scoring == "sigmoid",
                           num_warps=1 if E <= 256 else 4)
    return w, ids
