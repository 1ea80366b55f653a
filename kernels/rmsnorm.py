"""RMSNorm over the last dim, optionally fused with the residual add.

HF semantics: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)`.
With `residual`: `s = x + residual` (rounded to x.dtype, as HF adds in the model dtype),
returns `(rmsnorm(s), s)`.
Outputs are new tensors of x.dtype (the product with `weight` is computed in fp32 and rounded
once).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, check_tensor, next_pow2, pick_backend

__all__ = ["rmsnorm", "rmsnorm_ref"]

if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
        N, eps,
        HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        mask = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * N + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * N + offs, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_ref(x, weight, eps, residual=None):
    """Plain-torch reference (any device), HF formula."""
    dtype = x.dtype
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    out = (weight.float() * normed.float()).to(dtype)
    return out if residual is None else (out, x)


def rmsnorm(x, weight, eps: float, residual=None, *, backend: Optional[str] = None):
    """RMSNorm of x (any leading shape, contiguous) with weight `[N]`; see module docstring."""
    fn = "rmsnorm"
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, contiguous=True)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dim")
    N = x.shape[-1]
    check_tensor(fn, "weight", weight, ndim=1, shape=(N,), dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
    if residual is not None:
        check_tensor(fn, "residual", residual, ndim=x.dim(), shape=tuple(x.shape), dtypes=(x.dtype,),
                     device=x.device, contiguous=True)
    be = pick_backend(backend, x.device, HAS_TRITON, fn)
    if be == "ref":
        return rmsnorm_ref(x, weight, eps, residual)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    rows = x.numel() // N if N else 0
    if rows > 0 and N > 0:
        BLOCK_N = next_pow2(N, 16)
        _rmsnorm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out,
            N, float(eps),
            HAS_RES=residual is not None, BLOCK_N=BLOCK_N,
            num_warps=min(max(BLOCK_N // 256, 1), 16),
        )
    return out if residual is None else (out, res_out)
