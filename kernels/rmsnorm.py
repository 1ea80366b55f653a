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
from ._util import FLOAT_DTYPES, cdiv, check_tensor, next_pow2, pick_backend

__all__ = ["rmsnorm", "rmsnorm_ref"]

if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
        n_rows, N, eps,
        HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    ):
        # ROWS rows per program: per-head norms (q/k norm, N = head_dim) have ~T x heads rows of a few
        # hundred bytes each, and one program per row made them launch-bound (48 us at 8192 tokens)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (offs < N)[None, :]
        idx = rows[:, None] * N + offs[None, :]
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + idx, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + idx, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=1) / N
        normed = (xf * tl.rsqrt(var + eps)[:, None]).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
        y = w.to(tl.float32)[None, :] * normed.to(tl.float32)
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


ROWS_ELEMS = 2048  # elements per program for short rows (several rows a program)


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
        ROWS = max(1, ROWS_ELEMS // BLOCK_N)  # ~ROWS_ELEMS elements a program (masks cover the last)
        _rmsnorm_kernel[(cdiv(rows, ROWS),)](
            x, residual if residual is not None else x, weight, out, res_out,
            rows, N, float(eps),
            HAS_RES=residual is not None, BLOCK_N=BLOCK_N, ROWS=ROWS,
            num_warps=min(max(ROWS * BLOCK_N // 256, 1), 16),
        )
    return out if residual is None else (out, res_out)
