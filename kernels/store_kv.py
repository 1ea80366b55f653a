"""Write new tokens' K and V into the paged KV cache.

Cache layout: k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous.
Token t goes to flat slot `slot_mapping[t] = block_id * block_size + offset`; slots < 0 are
padding and are skipped. In place.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, check, check_tensor, next_pow2, pick_backend

__all__ = ["store_kv", "store_kv_ref"]

if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        H: tl.constexpr, D: tl.constexpr, BLOCK_HD: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK_HD)
            mask = offs < H * D
            h = offs // D
            d = offs % D
            k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
            # cache is contiguous: a slot is H*D consecutive elements
            tl.store(kc_ptr + slot * (H * D) + offs, k, mask=mask)
            tl.store(vc_ptr + slot * (H * D) + offs, v, mask=mask)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain-torch reference (any device)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d)[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(nb * bs, h, d)[slots] = v[valid].to(v_cache.dtype)


def store_kv(k, v, k_cache, v_cache, slot_mapping, *, backend: Optional[str] = None) -> None:
    """Scatter k, v `[T, Hkv, D]` into the caches at `slot_mapping` (int64 `[T]`, < 0 skipped).

    k/v may be strided views (last dim contiguous); caches must be contiguous and of k's dtype.
    Slots must be < num_blocks * block_size (not checked on the device: no host sync).
    """
    fn = "store_kv"
    check_tensor(fn, "k", k, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, H, D = k.shape
    dev = k.device
    check_tensor(fn, "v", v, shape=(T, H, D), ndim=3, dtypes=(k.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor(fn, "k_cache", k_cache, ndim=4, dtypes=(k.dtype,), device=dev, contiguous=True)
    check(k_cache.shape[2] == H and k_cache.shape[3] == D,
          f"{fn}: k_cache has shape {tuple(k_cache.shape)}, expected [num_blocks, block_size, {H}, {D}]")
    check_tensor(fn, "v_cache", v_cache, shape=tuple(k_cache.shape), ndim=4, dtypes=(k.dtype,), device=dev,
                 contiguous=True)
    check_tensor(fn, "slot_mapping", slot_mapping, ndim=1, shape=(T,), dtypes=(torch.int64, torch.int32),
                 device=dev, contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if T == 0:
        return
    if be == "ref":
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H=H, D=D, BLOCK_HD=next_pow2(H * D, 16), num_warps=4,
    )
