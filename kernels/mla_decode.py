"""Paged MLA decode (absorbed form): one query token per sequence against its paged latent cache.

Multi-head latent attention (DeepSeek-V2/V3) caches one latent per token: `[c | k_pe]`, the
compressed KV (`kv_lora_rank` = R values) followed by the shared rotary key (DR values). With
W_UK folded into the query (q_lat = W_UK^T q_nope per head) and W_UV applied after attention,
decode is multi-query attention with Hq query heads over that one latent "head":

    score[h, s] = scale * (q[h, :R] . c[s] + q[h, R:] . k_pe[s]),   out[h] = softmax(score[h]) @ c

so per token only the latent (R + DR values) is read, once for all heads.

Split-KV (FlashDecoding): grid (B, head blocks, splits). Each program takes BLOCK_H query heads
(one `tl.dot` of [BLOCK_H, R] x [R, BLOCK_N] plus the rope part), walks its slice of the context
through the block table with an online softmax in fp32 and writes the output (one split) or a
partial (acc, log2-sum-exp) merged by the paged-decode merge kernel. A sequence's slices are cut
from its own length on the device, so a bucket-padded block table (CUDA graphs) wastes no split.

seq_lens include the current token (already stored in the cache).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend, sm_count)

__all__ = ["mla_decode", "mla_decode_ref"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:
    from .flash_attention import _update  # the online-softmax step

    @triton.jit
    def _mla_decode_kernel(
        q_ptr, c_ptr, bt_ptr, sl_ptr, o_ptr, po_ptr, plse_ptr,
        qk_scale, HQ,
        s_qb, s_qh, s_cblk, s_ctok, s_btb, s_ob, s_oh,
        NUM_SPLITS,
        R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SINGLE: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        b = tl.program_id(0)
        hb = tl.program_id(1)
        sp = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        # each sequence's own context is cut into NUM_SPLITS slices (whole key blocks): no host-side length
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, seq_len)

        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < HQ
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_DR)
        rmask = offs_r < R
        pmask = offs_p < DR
        q_row = q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh
        q_lat = tl.load(q_row + offs_r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
        q_pe = tl.load(q_row + R + offs_p[None, :], mask=hmask[:, None] & pmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * s_btb
        offs_base = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_base
            nmask = offs_n < hi
            page = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            row = c_ptr + page[:, None] * s_cblk + (offs_n % PAGE)[:, None] * s_ctok
            c = tl.load(row + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            k_pe = tl.load(row + R + offs_p[None, :], mask=nmask[:, None] & pmask[None, :], other=0.0)
            s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PREC)
            s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PREC) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            acc, l_i, m_i = _update(acc, l_i, m_i, s, c, 1.0, False, DOT_PREC)  # s is scaled; each tile has a key

        omask = hmask[:, None] & rmask[None, :]
        if SINGLE:
            out = acc / l_i[:, None]
            tl.store(o_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + offs_r[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=omask)
        else:
            empty = l_i == 0.0
            out = acc / tl.where(empty, 1.0, l_i)[:, None]
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            # partials in the paged-decode merge layout: po [B, Hq, S, R] fp32, plse [B, Hq, S] (log2 domain)
            prow = (b.to(tl.int64) * HQ + heads) * NUM_SPLITS + sp
            tl.store(po_ptr + prow[:, None] * R + offs_r[None, :], out, mask=omask)
            tl.store(plse_ptr + prow, lse, mask=hmask)


def mla_decode_ref(q, cache, block_tables, seq_lens, scale, kv_lora_rank: int):
    """Plain-torch reference (any device): per sequence, gather the latents and attend."""
    B, HQ, L = q.shape
    R = kv_lora_rank
    page = cache.shape[1]
    flat = cache.reshape(-1, L)
    out = torch.empty((B, HQ, R), dtype=q.dtype, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(int(n), device=q.device)
        lat = flat[block_tables[b].long()[pos // page] * page + pos % page].float()  # [n, L]
        p = torch.softmax((q[b].float() @ lat.T) * scale, dim=-1)  # [HQ, n]
        out[b] = (p @ lat[:, :R]).to(q.dtype)
    return out


def _config(HQ: int, R: int, dev: torch.device, dtype: torch.dtype) -> dict:
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    # bf16/fp16, R = 512 (sm_90 AOT compile): the [BLOCK_H, R] fp32 accumulator sits in registers;
    # H16/N32/4 warps: 202 regs, 55 KB smem, mma.sync; H64/N16/8 warps: 254 regs, 128 KB, wgmma;
    # N64 with 4 warps spills. launch/mla_gpu_check.py sweeps these on the GPU.
    if HQ >= 64:
        return dict(BLOCK_H=64, BLOCK_N=16, num_warps=8, num_stages=2)
    if HQ > 16:
        return dict(BLOCK_H=32, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_H=16, BLOCK_N=32 if R >= 256 else 64, num_warps=4, num_stages=2)


def mla_decode(q, cache, block_tables, seq_lens, scale: float, kv_lora_rank: int, *,
               max_seq_len: Optional[int] = None, num_splits: Optional[int] = None,
               backend: Optional[str] = None, config: Optional[dict] = None):
    """q `[B, Hq, R + DR]` (absorbed query: latent part, then rope part), cache
    `[num_blocks, page, 1, R + DR]` (latent, then rotary key), block_tables int32 `[B, max_blocks]`,
    seq_lens int32 `[B]` (>= 1, current token included) -> out `[B, Hq, R]` in q.dtype (the
    attention-weighted latent; W_UV is applied by the caller).

    max_seq_len: optional host-side bound on seq_lens (default max_blocks * page, no sync);
    num_splits / config: override the heuristics (benchmarks; config keys BLOCK_H, BLOCK_N,
    num_warps, num_stages).
    """
    fn = "mla_decode"
    check_tensor(fn, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    B, HQ, L = q.shape
    R = kv_lora_rank
    check(isinstance(R, int) and 1 <= R < L, f"{fn}: kv_lora_rank must be an int in [1, {L}), got {R!r}")
    dev = q.device
    check_tensor(fn, "cache", cache, ndim=4, shape=(None, None, 1, L), dtypes=(q.dtype,), device=dev,
                 last_dim_contiguous=True)
    PAGE = cache.shape[1]
    check_tensor(fn, "block_tables", block_tables, ndim=2, shape=(B, None), dtypes=INT_DTYPES, device=dev,
                 last_dim_contiguous=True)
    check_tensor(fn, "seq_lens", seq_lens, ndim=1, shape=(B,), dtypes=INT_DTYPES, device=dev, contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return mla_decode_ref(q, cache, block_tables, seq_lens, scale, R)
    from .paged_decode_attention import _decode_merge_kernel, decode_num_splits

    out = torch.empty((B, HQ, R), dtype=q.dtype, device=dev)
    if B == 0:
        return out
    cfg = dict(_config(HQ, R, dev, q.dtype))
    if config:
        cfg.update(config)
    BLOCK_H, BLOCK_N = cfg.pop("BLOCK_H"), cfg.pop("BLOCK_N")
    n_hblocks = triton.cdiv(HQ, BLOCK_H)
    max_len = max(max_seq_len if max_seq_len is not None else block_tables.shape[1] * PAGE, 1)
    S = num_splits or decode_num_splits(B, n_hblocks, max_len, sm_count(dev), BLOCK_N)
    if S > 1:
        po = torch.empty((B, HQ, S, R), dtype=torch.float32, device=dev)
        plse = torch.empty((B, HQ, S), dtype=torch.float32, device=dev)
    else:
        po = plse = out  # unused
    BLOCK_R = next_pow2(R, 16)
    _mla_decode_kernel[(B, n_hblocks, S)](
        q, cache, block_tables, seq_lens, out, po, plse,
        float(scale) * _LOG2E, HQ,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        S,
        R=R, DR=L - R, BLOCK_R=BLOCK_R, BLOCK_DR=next_pow2(L - R, 16), BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        PAGE=PAGE, SINGLE=S == 1, DOT_PREC=dot_precision(q.dtype), **cfg,
    )
    if S > 1:
        _decode_merge_kernel[(B, HQ)](
            po, plse, out, out.stride(0), out.stride(1), HQ, S,
            D=R, BLOCK_D=BLOCK_R, BLOCK_S=next_pow2(S), num_warps=4,
        )
    return out
