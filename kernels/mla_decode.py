"""Paged MLA decode (absorbed form): one query token per sequence against its paged latent cache.

Multi-head latent attention (DeepSeek-V2/V3) caches one latent per token: `[c | k_pe]`, the
compressed KV (`kv_lora_rank` = R values) followed by the shared rotary key (DR values). With
W_UK folded into the query (q_lat = W_UK^T q_nope per head) and W_UV applied after attention,
decode is multi-query attention with Hq query heads over that one latent "head":

    score[h, s] = scale * (q[h, :R] . c[s] + q[h, R:] . k_pe[s]),   out[h] = softmax(score[h]) @ c

so per token only the latent (R + DR values) is read, once for all heads.

Split-KV (FlashDecoding): grid (head blocks, B, splits). Each program takes BLOCK_H query heads
(one `tl.dot` of [BLOCK_H, R] x [R, BLOCK_N] plus the narrower rope dot), walks its slice of the
context through the block table with an online softmax in fp32 and writes the output (one split) or
a partial (acc, log2-sum-exp) merged by the paged-decode merge kernel. Head blocks of one slice are
neighbouring programs that read the same latent tiles at about the same time, so the later ones can
find them in L2 (Hq 128: two blocks of 64 heads; the accumulator does not fit a larger block). The
split count comes from shapes alone (`mla_num_splits`: a wave model of the grid), and a sequence's
slices are cut from its own length on the device, so a bucket-padded block table (CUDA graphs)
wastes no split. With PREFETCH the next tile's block-table entries are loaded a tile ahead, so the
software pipeline spends all its stages on latent tiles.

seq_lens include the current token (already stored in the cache).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, cdiv, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend, sm_count)
from .paged_decode_attention import MAX_SPLITS

if HAS_TRITON:
    from .paged_decode_attention import _first_pages, _tile_pages

__all__ = ["mla_decode", "mla_decode_ref", "mla_num_splits", "plan"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:
    from .flash_attention import _update  # the online-softmax step

    # NUM_SPLITS is a plain runtime int (not specialised): one compile serves every split count
    @triton.jit(do_not_specialize=["NUM_SPLITS"])
    def _mla_decode_kernel(
        q_ptr, c_ptr, bt_ptr, sl_ptr, o_ptr, po_ptr, plse_ptr,
        qk_scale, HQ, NUM_SPLITS,
        s_qb, s_qh, s_cblk, s_ctok, s_btb, s_ob, s_oh,
        R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SINGLE: tl.constexpr,
        PREFETCH: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # head blocks of one (sequence, split) are neighbouring programs: they run together and the
        # second one finds the latent tiles in L2, so HBM sees each latent once however Hq is cut
        hb = tl.program_id(0)
        b = tl.program_id(1)
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
        page_n = _first_pages(bt_row, lo, hi, offs_base, PAGE, PREFETCH)  # block-table prefetch, as GQA decode
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_base
            nmask = offs_n < hi
            page, page_n = _tile_pages(bt_row, offs_n, hi, page_n, BLOCK_N, PAGE, PREFETCH)
            row = c_ptr + page[:, None] * s_cblk + (offs_n % PAGE)[:, None] * s_ctok
            c = tl.load(row + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            k_pe = tl.load(row + R + offs_p[None, :], mask=nmask[:, None] & pmask[None, :], other=0.0)
            # scores: the latent part and the (narrower) rope part as two dots into one accumulator
            s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PREC)
            s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PREC)
            s = tl.where(nmask[None, :], s, float("-inf"))
            # the scale enters in _update's one FMA per score; each tile has a key, so no -inf rows
            acc, l_i, m_i = _update(acc, l_i, m_i, s, c, qk_scale, False, DOT_PREC)

        omask = hmask[:, None] & rmask[None, :]
        if SINGLE:
            out = acc / l_i[:, None]
            tl.store(o_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + offs_r[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=omask)
        else:
            empty = l_i == 0.0  # no key in this split
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


# Tiles per shape class, the fastest of the batch-64 context-4k sweep of launch/mla_gpu_check.py on
# 1 H200 (docs/benchmarks/mla-h200.md). `ctas` is how many programs of the config one SM holds (registers
# and shared memory from an sm_90 AOT compile, Triton 3.9; kernels/NOTES.md): the split rule sizes waves by it.
#   H16 N32 4 warps 3 stages + prefetch: 244 regs, 93 KB (2 latent buffers), mma.sync -> 2 per SM
#   H64 N64 8 warps 2 stages:            255 regs + 216 B of spills, 221 KB, wgmma    -> 1 per SM
# H64's [64, 512] fp32 accumulator alone is 128 registers a thread; N64 spills a little yet beats N32
# (no spills, 462 vs 345 us at batch 64, context 4k): a wider key tile amortises the shared-memory
# reads of the query operand that both warpgroups repeat for every tile.
_TILES = {
    16: dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=3, PREFETCH=True, ctas=2),
    64: dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2, PREFETCH=False, ctas=1),
}


def _config(HQ: int, R: int, dev: torch.device, dtype: torch.dtype) -> dict:
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, PREFETCH=False, ctas=1)
    if dtype == torch.float32 or R > 512:
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, PREFETCH=False, ctas=1)
    return dict(_TILES[16 if HQ < 64 else 64])


MIN_CHUNK = 256  # keys a split keeps at least (as the paged decode rule)


def mla_num_splits(batch: int, n_hblocks: int, max_len: int, num_sms: int, block_n: int, ctas_per_sm: int,
                   heads: int, kv_lora_rank: int, latent: int) -> int:
    """Splits per sequence from shapes alone (no host sync, so CUDA graphs capture it): the count that
    minimises a wave model of the split kernel, in key-reads: ceil(programs / slots) waves of programs
    that each walk ceil(max_len / S) keys (an SM with a free slot waits for the wave), plus the partials'
    fp32 round trip (S * heads * (R + 1) * 4 bytes written and read per sequence) in latent-read units."""
    slots = max(1, num_sms * max(1, ctas_per_sm))
    max_by_len = max(1, cdiv(max_len, max(MIN_CHUNK, block_n)))
    merge_keys = heads * (kv_lora_rank + 1) * 8 / (latent * 2)
    best, best_cost = 1, None
    for s in range(1, min(max_by_len, MAX_SPLITS) + 1):
        progs = batch * n_hblocks * s
        keys = cdiv(cdiv(max_len, s), block_n) * block_n
        # head blocks of one split share its latent reads in L2, so one program-key costs 1 / n_hblocks
        cost = cdiv(progs, slots) * slots * keys / n_hblocks + (batch * s * merge_keys if s > 1 else 0)
        if best_cost is None or cost < best_cost * 0.98:  # ties -> fewer splits
            best, best_cost = s, cost
    return best


def plan(B: int, HQ: int, R: int, L: int, max_len: int, dev: torch.device, dtype: torch.dtype,
         config: Optional[dict] = None, num_splits: Optional[int] = None):
    """(launch config, split count) mla_decode uses for these shapes: the tiles of _config updated by
    `config`, BLOCK_H cut to the padded head count, and the split count of mla_num_splits (or
    `num_splits`) capped by the number of key blocks. The config keeps BLOCK_H, BLOCK_N, PREFETCH,
    num_warps and num_stages (`ctas` is consumed here)."""
    cfg = _config(HQ, R, dev, dtype)
    cfg.update(config or {})
    ctas = cfg.pop("ctas", 1)
    cfg["BLOCK_H"] = min(cfg["BLOCK_H"], next_pow2(HQ, 16))
    max_len = max(int(max_len), 1)
    S = num_splits or mla_num_splits(B, cdiv(HQ, cfg["BLOCK_H"]), max_len, sm_count(dev), cfg["BLOCK_N"], ctas,
                                     HQ, R, L)
    return cfg, max(1, min(S, cdiv(max_len, cfg["BLOCK_N"])))  # never more splits than key blocks


def mla_decode(q, cache, block_tables, seq_lens, scale: float, kv_lora_rank: int, *,
               max_seq_len: Optional[int] = None, num_splits: Optional[int] = None,
               backend: Optional[str] = None, config: Optional[dict] = None):
    """q `[B, Hq, R + DR]` (absorbed query: latent part, then rope part), cache
    `[num_blocks, page, 1, R + DR]` (latent, then rotary key), block_tables int32 `[B, max_blocks]`,
    seq_lens int32 `[B]` (>= 1, current token included) -> out `[B, Hq, R]` in q.dtype (the
    attention-weighted latent; W_UV is applied by the caller).

    max_seq_len: optional host-side bound on seq_lens (default max_blocks * page, no sync); it only
    sizes the split count. num_splits / config: override the heuristics (benchmarks; config keys
    BLOCK_H, BLOCK_N, num_warps, num_stages, PREFETCH, ctas); splits are merged by the paged-decode
    merge kernel.
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
    check(float(scale) > 0, f"{fn}: scale must be > 0, got {scale!r}")
    check(num_splits is None or (isinstance(num_splits, int) and 1 <= num_splits <= 4096),
          f"{fn}: num_splits must be None or an int in [1, 4096], got {num_splits!r}")
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return mla_decode_ref(q, cache, block_tables, seq_lens, scale, R)
    from .paged_decode_attention import _decode_merge_kernel

    out = torch.empty((B, HQ, R), dtype=q.dtype, device=dev)
    if B == 0:
        return out
    cfg, S = plan(B, HQ, R, L, PAGE * block_tables.shape[1] if max_seq_len is None else max_seq_len, dev, q.dtype,
                  config, num_splits)
    BLOCK_H, BLOCK_N = cfg.pop("BLOCK_H"), cfg.pop("BLOCK_N")
    prefetch = bool(cfg.pop("PREFETCH", False))
    n_hblocks = cdiv(HQ, BLOCK_H)
    if S > 1:
        po = torch.empty((B, HQ, S, R), dtype=torch.float32, device=dev)
        plse = torch.empty((B, HQ, S), dtype=torch.float32, device=dev)
    else:
        po = plse = out  # unused
    BLOCK_R = next_pow2(R, 16)
    _mla_decode_kernel[(n_hblocks, B, S)](
        q, cache, block_tables, seq_lens, out, po, plse,
        float(scale) * _LOG2E, HQ, S,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        R=R, DR=L - R, BLOCK_R=BLOCK_R, BLOCK_DR=next_pow2(L - R, 16), BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        PAGE=PAGE, SINGLE=S == 1, PREFETCH=prefetch, DOT_PREC=dot_precision(q.dtype), **cfg,
    )
    if S > 1:
        _decode_merge_kernel[(B, HQ)](
            po, plse, out, out.stride(0), out.stride(1), HQ, S,
            D=R, BLOCK_D=BLOCK_R, BLOCK_S=next_pow2(S), num_warps=4,
        )
    return out
