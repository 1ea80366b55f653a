"""The ops layer: every piece of model math the engine does goes through these functions.

CUDA tensors take the Triton kernels in ``kernels/`` when they import; everything else takes the
plain-torch reference here (which is also what the CPU parity tests check against transformers).
Set ``AFSPLIT_KERNELS=ref`` to force the references on CUDA too (for A/B checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def _triton_kernels():
    if os.environ.get("AFSPLIT_KERNELS", "auto") == "ref":
        return None
    try:
        import kernels as triton_kernels  # ours: the repo's top-level kernels/ package

        if not hasattr(triton_kernels, "fused_moe"):
            return None
        return triton_kernels
    except Exception:  # no triton, or an unrelated package named `kernels`
        return None


def _kernels_for(t: torch.Tensor):
    return _triton_kernels() if t.is_cuda else None


@dataclass
class AttentionMetadata:
    """Where the tokens of one forward pass sit: a packed batch of per-sequence chunks.

    A decode is a chunk of length 1; a prefill (or a piece of a chunked prefill) is a longer chunk
    whose first `prefix_lens[b]` tokens are already in the paged KV cache.
    """

    positions: torch.Tensor  # [T] int64 absolute positions
    slot_mapping: torch.Tensor  # [T] int64 KV cache slot of each token
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    prefix_lens: torch.Tensor  # [B] int32 tokens already cached before this chunk
    seq_lens: torch.Tensor  # [B] int32 prefix + chunk
    block_tables: torch.Tensor  # [B, max_blocks] int32
    decode_only: bool  # every chunk has length 1
    cu_seqlens_list: list[int]  # host copies, to avoid device syncs in the reference path
    prefix_lens_list: list[int]


# ----------------------------------------------------------------------------------------------
# Norms, rotary, activations


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in fp32 (HF semantics). With `residual`: returns (norm(x + residual), x + residual)."""
    k = _kernels_for(x)
    if k is not None:
        return k.rmsnorm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        return _rmsnorm_ref(x, weight, eps), x
    return _rmsnorm_ref(x, weight, eps)


def _rmsnorm_ref(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_cache(max_pos: int, head_dim: int, base: float, device) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half of the columns, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """NeoX-style rotary embedding (HF rotate_half) on q [T, Hq, D] and k [T, Hkv, D]."""
    kern = _kernels_for(q)
    if kern is not None:
        return kern.apply_rotary(q, k, positions, cos_sin)
    half = q.shape[-1] // 2
    cs = cos_sin[positions]  # [T, D]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)

    return rot(q), rot(k)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on gate|up halves of the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# KV cache and attention


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the paged cache [num_blocks, block_size, Hkv, D] at their slots."""
    kern = _kernels_for(k)
    if kern is not None:
        return kern.store_kv(k, v, k_cache, v_cache, slot_mapping)
    nb, bs = k_cache.shape[:2]
    k_cache.view(nb * bs, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(nb * bs, *v_cache.shape[2:])[slot_mapping] = v


def attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None):
    """Causal attention of each chunk's queries over its cached prefix plus the chunk itself.

    q [T, Hq, D], k/v [T, Hkv, D] (already stored in the cache); returns [T, Hq, D].
    """
    kern = _kernels_for(q)
    if kern is not None:
        if meta.decode_only:
            return kern.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window)
        return kern.flash_attention(q, k, v, meta.cu_seqlens_q, k_cache, v_cache, meta.block_tables,
                                    meta.prefix_lens, scale, window)
    return _attention_ref(q, k_cache, v_cache, meta, scale, window)


def _attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale, window):
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    for b in range(len(meta.prefix_lens_list)):
        start, end = meta.cu_seqlens_list[b], meta.cu_seqlens_list[b + 1]
        if start == end:
            continue
        prefix = meta.prefix_lens_list[b]
        ctx = prefix + (end - start)
        nblocks = (ctx + block_size - 1) // block_size
        blocks = meta.block_tables[b, :nblocks].long()
        keys = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        vals = v_cache[blocks].flatten(0, 1)[:ctx]
        keys = keys.repeat_interleave(group, dim=1).float()
        vals = vals.repeat_interleave(group, dim=1).float()
        qb = q[start:end].float()  # [n, Hq, D]
        scores = torch.einsum("nhd,chd->hnc", qb, keys) * scale
        qpos = torch.arange(prefix, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hnc,chd->nhd", probs, vals).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# MoE


def topk_gating(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax router: (weights float32 [T, K], ids int32 [T, K]), HF order (descending)."""
    kern = _kernels_for(logits)
    if kern is not None:
        return kern.topk_gating(logits, top_k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over local expert slots; ids of -1 are skipped.

    x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I] -> [T, H] in x.dtype.
    """
    kern = _kernels_for(x)
    if kern is not None:
        return kern.fused_moe(x, w13, w2, topk_ids, topk_weights)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, kk = torch.nonzero(ids == e, as_tuple=True)
        h = silu_mul(x[tok] @ w13[e].t()) @ w2[e].t()
        out.index_add_(0, tok, h.float() * topk_weights[tok, kk, None].float())
    return out.to(x.dtype)
