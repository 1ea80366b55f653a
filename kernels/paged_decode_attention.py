"""Paged decode attention: one query token per sequence against its paged KV cache.

Split-KV (FlashDecoding): grid (B, Hkv, splits). Each program takes the G = Hq/Hkv query heads
of one KV head together (a [G, D] x [D, BLOCK_N] tl.dot, so GQA runs on tensor cores and each
K/V byte is read once for the whole group), walks its slice of the context through the block
table with an online softmax in fp32, and writes either the final output (one split) or a
partial (acc, log-sum-exp) that a merge kernel combines.

seq_lens include the current token (already stored in the cache). Query position p =
seq_len - 1; with a sliding window W only keys at positions > p - W are used (HF Mixtral).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _tuning
from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, cdiv, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend, sm_count)

__all__ = ["paged_decode_attention", "paged_decode_attention_ref", "decode_num_splits"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    # G and NUM_SPLITS are plain runtime ints (not specialised): one compile serves every head ratio
    @triton.jit(do_not_specialize=["G", "NUM_SPLITS", "window"])
    def _decode_split_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, o_ptr, po_ptr, plse_ptr,
        qk_scale, window, G, NUM_SPLITS,
        s_qb, s_qh,
        s_kblk, s_ktok, s_kh,
        s_vblk, s_vtok, s_vh,
        s_btb,
        s_ob, s_oh,
        BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, SINGLE: tl.constexpr,
        PREFETCH: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(seq_len - window, 0)
        # this sequence's keys split into NUM_SPLITS equal BLOCK_N-aligned shares (by its own length,
        # so a loose host-side bound on the context costs no empty work)
        n_keys = seq_len - start
        chunk = (n_keys + NUM_SPLITS - 1) // NUM_SPLITS
        chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = start + sp * chunk
        hi = tl.minimum(lo + chunk, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < G
        dmask = offs_d < D
        heads = kvh * G + offs_g
        q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * s_btb
        offs_base = tl.arange(0, BLOCK_N)
        page_n = _first_pages(bt_row, lo, hi, offs_base, PAGE, PREFETCH)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_base
            nmask = offs_n < hi
            page, page_n = _tile_pages(bt_row, offs_n, hi, page_n, BLOCK_N, PAGE, PREFETCH)
            tok = offs_n % PAGE
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + page[:, None] * s_kblk + tok[:, None] * s_ktok + kvh * s_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + page[:, None] * s_vblk + tok[:, None] * s_vtok + kvh * s_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = tl.where(nmask[None, :], s, float("-inf"))
            # the scale is folded into one FMA per score: max(s) * scale == max(s * scale) for scale > 0
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        omask = gmask[:, None] & dmask[None, :]
        empty = l_i == 0.0  # no key in this split (or a padded sequence of length 0)
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        if SINGLE:
            tl.store(o_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=omask)
        else:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            # partials: po [B, Hq, S, D] fp32, plse [B, Hq, S] fp32 (log2 domain)
            row = (b.to(tl.int64) * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + sp
            tl.store(po_ptr + row[:, None] * D + offs_d[None, :], out, mask=omask)
            tl.store(plse_ptr + row, lse, mask=gmask)

    @triton.jit
    def _first_pages(bt_row, lo, hi, offs_base, PAGE: tl.constexpr, PREFETCH: tl.constexpr):
        """Before a paged key loop: with PREFETCH the first tile's page numbers (what `_tile_pages` carries from
        one iteration to the next), else a placeholder nobody reads."""
        if PREFETCH:
            nxt = lo + offs_base
            return tl.load(bt_row + nxt // PAGE, mask=nxt < hi, other=0)
        else:
            return offs_base

    @triton.jit
    def _tile_pages(bt_row, offs_n, hi, page_n, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREFETCH: tl.constexpr):
        """(cache pages of the keys `offs_n` as int64, the carried value for the next tile). With PREFETCH the
        block-table entries are loaded one iteration ahead into registers (`page_n` holds this tile's), so the
        cache copies never wait on them and the pipeliner spends every stage on the cache; without it, on demand."""
        if PREFETCH:
            page = page_n.to(tl.int64)
            nxt = offs_n + BLOCK_N
            page_n = tl.load(bt_row + nxt // PAGE, mask=nxt < hi, other=0)
        else:
            page = tl.load(bt_row + offs_n // PAGE, mask=offs_n < hi, other=0).to(tl.int64)
        return page, page_n

    @triton.jit
    def _decode_merge_kernel(
        po_ptr, plse_ptr, o_ptr, s_ob, s_oh, HQ, NUM_SPLITS,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        smask = offs_s < NUM_SPLITS
        row = (b.to(tl.int64) * HQ + h) * NUM_SPLITS
        lse = tl.load(plse_ptr + row + offs_s, mask=smask, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - mx))
        parts = tl.load(po_ptr + (row + offs_s)[:, None] * D + offs_d[None, :],
                        mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
        den = tl.sum(w, axis=0)
        out = tl.sum(parts * w[:, None], axis=0) / tl.where(den == 0.0, 1.0, den)  # 0: zero-length sequence
        tl.store(o_ptr + b.to(tl.int64) * s_ob + h * s_oh + offs_d, out.to(o_ptr.dtype.element_ty),
                 mask=offs_d < D)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None):
    """Plain-torch reference (any device): per sequence, gather the context and attend."""
    B, HQ, D = q.shape
    page = k_cache.shape[1]
    HK = k_cache.shape[2]
    G = HQ // HK
    out = torch.empty_like(q)
    lens = seq_lens.tolist()
    for b in range(B):
        L = int(lens[b])
        start = max(L - sliding_window, 0) if sliding_window is not None else 0
        pos = torch.arange(start, L, device=q.device)
        pages = block_tables[b].long()[pos // page]
        k = k_cache[pages, pos % page].float()  # [n, HK, D]
        v = v_cache[pages, pos % page].float()
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def decode_num_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int, block_n: int,
                      min_chunk: int = 256) -> int:
    """Splits per sequence so that B*Hkv*splits covers ~2 waves of programs, each split >= min_chunk keys."""
    progs = batch * num_kv_heads
    want = max(1, math.ceil(2 * num_sms / max(progs, 1)))
    max_by_len = max(1, math.ceil(max_len / max(min_chunk, block_n)))
    return int(min(want, max_by_len, MAX_SPLITS))


MAX_SPLITS = 128


def _config(D: int, dev: torch.device, dtype: torch.dtype):
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_N=16, num_warps=4, num_stages=1, PREFETCH=False)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2, PREFETCH=False)
    return dict(BLOCK_N=64 if D > 64 else 128, num_warps=4, num_stages=3, PREFETCH=False)


def tuning_key(G: int, HK: int, D: int, page: int, dtype: torch.dtype, window: bool) -> dict:
    """Fields a tuning-table entry must match exactly (kernels/tune.py writes them)."""
    return dict(G=G, HK=HK, D=D, page=page, dtype=str(dtype).replace("torch.", ""), window=bool(window))


def splits_from_entry(key: dict, splits: int, B: int, eff_len: int) -> int:
    """Split count for (B, eff_len) from a table entry measured at (key B, key L) with `splits`: the
    entry's own count on its shape, else the same number of programs (B * splits), capped so that a
    split keeps >= 128 keys."""
    if key.get("B") == B and key.get("L") == eff_len:
        return splits
    s = round(key.get("B", B) * splits / max(B, 1))
    return max(1, min(s, math.ceil(max(eff_len, 1) / 128), MAX_SPLITS))


def _pick(B: int, HK: int, G: int, D: int, page: int, eff_len: int, dev, dtype, window: bool, sms: int):
    """(tile config, num_splits): the device's tuning table where it has an entry, else the heuristics.
    An entry measured at another (B, L) keeps its tiles and scales its split count to the same number
    of programs (capped so that a split keeps >= 128 keys)."""
    cfg = _config(D, dev, dtype)
    splits = None
    if dev.type == "cuda" and dtype != torch.float32:
        found = _tuning.lookup("paged_decode_attention", _tuning.device_name(dev),
                               tuning_key(G, HK, D, page, dtype, window), dict(B=B, L=eff_len))
        if found is not None:
            tcfg, key = found
            ts = int(tcfg.pop("num_splits", 0) or 0)
            cfg.update(tcfg)
            if ts:
                splits = splits_from_entry(key, ts, B, eff_len)
    if splits is None:
        splits = decode_num_splits(B, HK, eff_len, sms, cfg["BLOCK_N"])
    return cfg, splits


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, sliding_window=None, *,
                           max_seq_len: Optional[int] = None, num_splits: Optional[int] = None,
                           backend: Optional[str] = None, config: Optional[dict] = None):
    """q `[B, Hq, D]`, caches `[num_blocks, page, Hkv, D]`, block_tables int32 `[B, max_blocks]`,
    seq_lens int32 `[B]` (>= 1, current token included) -> out `[B, Hq, D]` in q.dtype.

    max_seq_len: optional host-side bound on seq_lens (default: max_blocks * page, no sync); it only
    sizes the split count, each sequence's keys are shared among the splits by its own length.
    num_splits / config: override the tuning table and heuristics (benchmarks, tuning; config keys
    BLOCK_N, num_warps, num_stages, PREFETCH).
    """
    fn = "paged_decode_attention"
    check_tensor(fn, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    B, HQ, D = q.shape
    dev = q.device
    check_tensor(fn, "k_cache", k_cache, ndim=4, shape=(None, None, None, D), dtypes=(q.dtype,), device=dev,
                 last_dim_contiguous=True)
    NB, PAGE, HK, _ = k_cache.shape
    check_tensor(fn, "v_cache", v_cache, ndim=4, shape=tuple(k_cache.shape), dtypes=(q.dtype,), device=dev,
                 last_dim_contiguous=True)
    check(HK >= 1 and HQ % HK == 0, f"{fn}: q heads {HQ} must be a multiple of k_cache kv heads {HK}")
    check_tensor(fn, "block_tables", block_tables, ndim=2, shape=(B, None), dtypes=INT_DTYPES, device=dev,
                 last_dim_contiguous=True)
    check_tensor(fn, "seq_lens", seq_lens, ndim=1, shape=(B,), dtypes=INT_DTYPES, device=dev, contiguous=True)
    check(sliding_window is None or (isinstance(sliding_window, int) and sliding_window >= 1),
          f"{fn}: sliding_window must be None or an int >= 1, got {sliding_window!r}")
    check(float(scale) > 0, f"{fn}: scale must be > 0, got {scale!r}")
    check(num_splits is None or (isinstance(num_splits, int) and 1 <= num_splits <= 4096),
          f"{fn}: num_splits must be None or an int in [1, 4096], got {num_splits!r}")
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    G = HQ // HK
    check(G <= 256, f"{fn}: {G} query heads per kv head is more than this kernel handles (256)")
    out = torch.empty((B, HQ, D), dtype=q.dtype, device=dev)
    if B == 0:
        return out
    max_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * PAGE
    eff_len = min(max_len, sliding_window) if sliding_window is not None else max_len
    cfg, S = _pick(B, HK, G, D, PAGE, eff_len, dev, q.dtype, sliding_window is not None, sm_count(dev))
    if config:
        cfg.update(config)
    BLOCK_N = cfg.pop("BLOCK_N")
    prefetch = bool(cfg.pop("PREFETCH", False))
    S = num_splits or S
    S = max(1, min(S, cdiv(max(eff_len, 1), BLOCK_N)))  # never more splits than key blocks
    BLOCK_D = next_pow2(D, 16)
    BLOCK_G = next_pow2(G, 16)
    if S > 1:
        po = torch.empty((B, HQ, S, D), dtype=torch.float32, device=dev)
        plse = torch.empty((B, HQ, S), dtype=torch.float32, device=dev)
    else:
        po = plse = out  # unused
    _decode_split_kernel[(B, HK, S)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, plse,
        float(scale) * _LOG2E, int(sliding_window or 0), G, S,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PAGE=PAGE,
        HAS_WINDOW=sliding_window is not None, SINGLE=S == 1, PREFETCH=prefetch, DOT_PREC=dot_precision(q.dtype),
        **cfg,
    )
    if S > 1:
        _decode_merge_kernel[(B, HQ)](
            po, plse, out, out.stride(0), out.stride(1), HQ, S,
            D=D, BLOCK_D=BLOCK_D, BLOCK_S=next_pow2(S), num_warps=4,
        )
    return out
