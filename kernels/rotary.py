"""NeoX-style rotary position embedding (HF `rotate_half`: first half / second half).

`cos_sin_cache` `[max_pos, D]` float32: columns 0..D/2-1 hold cos(pos * inv_freq[i]), columns
D/2..D-1 hold sin(pos * inv_freq[i]).
`apply_rotary` returns NEW (q, k) by default; `inplace=True` writes into q and k and returns them.
The rotation is computed in fp32 and rounded once (HF rounds cos/sin to the model dtype first;
the difference is within one rounding).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, check, check_tensor, next_pow2, pick_backend

__all__ = ["apply_rotary", "apply_rotary_ref", "rotary_cos_sin_cache"]


def rotary_cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """float32 `[max_pos, head_dim]` cache, HF default rope: inv_freq = 1/base^(arange(0,D,2)/D)."""
    if head_dim % 2:
        raise ValueError(f"rotary_cos_sin_cache: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(max_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)  # [max_pos, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


if HAS_TRITON:

    @triton.jit
    def _rotate_heads(ptr, out_ptr, t, stride_t, stride_h, ostride_t, ostride_h, cos, sin, NH,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask = (offs_h[:, None] < NH) & (offs_d[None, :] < HALF)
        base = ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        obase = out_ptr + t * ostride_t + offs_h[:, None] * ostride_h + offs_d[None, :]
        tl.store(obase, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(obase + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr,
        sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h,
        HQ, HK,
        HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)
        dmask = offs_d < HALF
        cos = tl.load(cs_ptr + pos * (2 * HALF) + offs_d, mask=dmask, other=0.0)
        sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + offs_d, mask=dmask, other=0.0)
        _rotate_heads(q_ptr, qo_ptr, t, sq_t, sq_h, sqo_t, sqo_h, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(k_ptr, ko_ptr, t, sk_t, sk_h, sko_t, sko_h, cos, sin, HK, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary_ref(q, k, positions, cos_sin_cache):
    """Plain-torch reference (any device); returns new tensors."""
    D = q.shape[-1]
    half = D // 2
    cs = cos_sin_cache[positions.long()]  # [T, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


def apply_rotary(q, k, positions, cos_sin_cache, *, inplace: bool = False, backend: Optional[str] = None):
    """Rotate q `[T, Hq, D]` and k `[T, Hkv, D]` at `positions` (int64 `[T]`).

    q/k may be strided views (e.g. slices of a fused qkv projection) with a contiguous last dim.
    Returns new (q, k) unless `inplace=True`.
    """
    fn = "apply_rotary"
    check_tensor(fn, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, HQ, D = q.shape
    dev = q.device
    check(D % 2 == 0, f"{fn}: head_dim must be even, got {D}")
    check_tensor(fn, "k", k, ndim=3, shape=(T, None, D), dtypes=(q.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor(fn, "positions", positions, ndim=1, shape=(T,), dtypes=(torch.int64, torch.int32), device=dev,
                 contiguous=True)
    check_tensor(fn, "cos_sin_cache", cos_sin_cache, ndim=2, shape=(None, D), dtypes=(torch.float32,),
                 device=dev, contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        qo, ko = apply_rotary_ref(q, k, positions, cos_sin_cache)
        if inplace:
            q.copy_(qo)
            k.copy_(ko)
            return q, k
        return qo, ko
    HK = k.shape[1]
    qo = q if inplace else torch.empty((T, HQ, D), dtype=q.dtype, device=dev)
    ko = k if inplace else torch.empty((T, HK, D), dtype=k.dtype, device=dev)
    if T > 0:
        _rotary_kernel[(T,)](
            q, k, qo, ko, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            HQ, HK,
            HALF=D // 2, BLOCK_HQ=next_pow2(HQ), BLOCK_HK=next_pow2(HK), BLOCK_HALF=next_pow2(D // 2),
            num_warps=4,
        )
    return qo, ko
