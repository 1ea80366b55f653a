"""Prefill / chunked-prefill FlashAttention over packed variable-length sequences with an
optional paged prefix.

Sequence b has `Lq = cu_seqlens_q[b+1] - cu_seqlens_q[b]` new tokens (rows of q, k, v) and
`P = prefix_lens[b]` earlier tokens already in the paged cache. Query i sits at absolute
position P + i and attends to every key at position <= P + i: positions < P are read from the
cache through block_tables, positions >= P from k/v. With a sliding window W only keys at
positions > (P + i) - W are used (HF Mixtral: keys p-W+1..p).

Grid (q-blocks, Hq, B); each program owns BLOCK_M queries of one head, runs an online softmax in
fp32 (exp2 with the scale folded in) over (1) the cached prefix and (2) the chunk: full key
blocks left of the diagonal without masks, the diagonal blocks with the causal mask. The
heaviest q-blocks (the last ones of each sequence) are launched first.
Any head_dim: D is padded to a power of two (>= 16) with masked loads.
On Hopper+ (bf16/fp16, power-of-two D, heads packed, T >= one tile) the chunk's q/k/v tiles are
loaded through host-side TMA descriptors (+19% at 8k tokens on H100, kernels/NOTES.md); the paged
prefix is always gathered with pointer loads.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _tuning
from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, cdiv, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend, tma_available)

__all__ = ["flash_attention", "flash_attention_ref"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _exp2_poly(x):
        """2^x for finite x <= ~0 on the FMA pipe instead of the MUFU unit: x = n + f by
        round-to-nearest (|f| <= 1/2, the 1.5 * 2^23 trick), 2^f by a degree-4 polynomial (relative
        error 2.7e-6, far below the bf16/fp16 rounding of P), n added to the exponent bits.
        Results below 2^-126 come out as 2^-126 (x is clamped): nothing next to a row sum >= 1."""
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        p = f * 0.009560510516166687 + 0.05591703951358795
        p = p * f + 0.24024981260299683
        p = p * f + 0.6931219696998596
        p = p * f + 0.9999991655349731
        bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _update(acc, l_i, m_i, s, v, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
        """Online-softmax step on raw scores s (masked entries -inf): the scale (> 0) is applied in
        one FMA per score, s * scale - m, since max(s) * scale == max(s * scale). (Shared with the MLA
        kernels; `_update_x` is the same step with the speed knobs.)"""
        return _update_x(acc, l_i, m_i, s, v, qk_scale, MASKED, DOT_PREC, False)

    @triton.jit
    def _update_x(acc, l_i, m_i, s, v, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                  POLY_EXP: tl.constexpr):
        """`_update` with POLY_EXP (unmasked blocks only): every second column's exp2 runs as a
        polynomial on the FMA pipe, halving the MUFU work that the tensor cores otherwise wait for
        (FA4's trick; a speed knob: the values agree with exp2 to 2.7e-6 relative)."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        if MASKED:
            # a row may have seen no key yet (window / padding): keep exp2 away from -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        if POLY_EXP:
            x = tl.reshape(s * qk_scale - m_use[:, None], (s.shape[0], s.shape[1] // 2, 2))
            x_even, x_odd = tl.split(x)
            p = tl.reshape(tl.join(tl.exp2(x_even), _exp2_poly(x_odd)), (s.shape[0], s.shape[1]))
        else:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _load_paged(c_ptr, page, tok, kvh, s_blk, s_tok, s_h, offs_d, mask):
        return tl.load(c_ptr + page[:, None] * s_blk + tok[:, None] * s_tok + kvh * s_h + offs_d[None, :],
                       mask=mask, other=0.0)

    @triton.jit
    def _load_rows(ptr, desc, row0, rows, col, s_t, offs_d, mask, USE_TMA: tl.constexpr):
        """[len(rows), BLOCK_D] tile of a packed [T, H*D] tensor: TMA descriptor or masked pointer load."""
        if USE_TMA:
            return desc.load([row0, col])
        else:
            return tl.load(ptr + rows[:, None] * s_t + col + offs_d[None, :], mask=mask, other=0.0)

    # G is a plain runtime int (not specialised): one compile serves every head ratio
    @triton.jit(do_not_specialize=["G", "window"])
    def _flash_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
        kc_ptr, vc_ptr, bt_ptr, pl_ptr,
        q_desc, k_desc, v_desc,
        qk_scale, window,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
        s_kcblk, s_kctok, s_kch, s_vcblk, s_vctok, s_vch, s_btb, G,
        D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
        WARP_SPEC: tl.constexpr, POLY_EXP: tl.constexpr, HEADS_FIRST: tl.constexpr, Q_REG: tl.constexpr,
    ):
        if HEADS_FIRST:
            # grid (Hq, q-blocks, B): blocks start in launch order, so every head's heaviest q-block
            # goes first (longest rows first over the whole grid, light ones fill the tail) and the G
            # q heads of one kv head read the same K/V tiles side by side (L2 reuse)
            h = tl.program_id(0)
            pid = tl.program_id(1)
        else:
            pid = tl.program_id(0)
            h = tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(cu_ptr + b)
        q_end = tl.load(cu_ptr + b + 1)
        Lq = q_end - q_start
        n_mblocks = tl.cdiv(Lq, BLOCK_M)
        if pid >= n_mblocks:
            return
        m0 = (n_mblocks - 1 - pid) * BLOCK_M
        kvh = h // G
        P = 0
        if HAS_PREFIX:
            P = tl.load(pl_ptr + b)

        offs_m = m0 + tl.arange(0, BLOCK_M)  # chunk-relative query index
        offs_d = tl.arange(0, BLOCK_D)
        offs_nb = tl.arange(0, BLOCK_N)
        mmask = offs_m < Lq
        dmask = offs_d < D
        q_rows = (q_start + offs_m).to(tl.int64)
        q = _load_rows(q_ptr, q_desc, q_start + m0, q_rows, h * s_qh, s_qt, offs_d,
                       mmask[:, None] & dmask[None, :], USE_TMA)
        if Q_REG:
            # an opaque register copy: the QK^T wgmma then reads q from registers, not shared memory,
            # leaving the shared-memory bandwidth to the K/V tiles (64-row tiles are bound by it)
            q = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [q], dtype=q.dtype, is_pure=True, pack=2)
        qpos = P + offs_m  # absolute positions

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # ---- (1) cached prefix: absolute key positions [lo, P), gathered through the block table ----
        if HAS_PREFIX:
            bt_row = bt_ptr + b.to(tl.int64) * s_btb
            if HAS_WINDOW:
                lo = tl.maximum(P + m0 - window + 1, 0)
                for n0 in range(lo, P, BLOCK_N):
                    offs_n = n0 + offs_nb
                    nmask = offs_n < P
                    page = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
                    tok = offs_n % PAGE
                    kvm = nmask[:, None] & dmask[None, :]
                    k = _load_paged(kc_ptr, page, tok, kvh, s_kcblk, s_kctok, s_kch, offs_d, kvm)
                    v = _load_paged(vc_ptr, page, tok, kvh, s_vcblk, s_vctok, s_vch, offs_d, kvm)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                    valid = nmask[None, :] & (offs_n[None, :] > qpos[:, None] - window)
                    s = tl.where(valid, s, float("-inf"))
                    acc, l_i, m_i = _update(acc, l_i, m_i, s, v, qk_scale, True, DOT_PREC)
            else:
                # every prefix key is visible to every query: full blocks without masks, then the tail
                P_full = (P // BLOCK_N) * BLOCK_N
                for n0 in tl.range(0, P_full, BLOCK_N, warp_specialize=WARP_SPEC):
                    offs_n = n0 + offs_nb
                    page = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
                    tok = offs_n % PAGE
                    k = _load_paged(kc_ptr, page, tok, kvh, s_kcblk, s_kctok, s_kch, offs_d, dmask[None, :])
                    v = _load_paged(vc_ptr, page, tok, kvh, s_vcblk, s_vctok, s_vch, offs_d, dmask[None, :])
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                    acc, l_i, m_i = _update_x(acc, l_i, m_i, s, v, qk_scale, False, DOT_PREC, POLY_EXP)
                for n0 in range(P_full, P, BLOCK_N):
                    offs_n = n0 + offs_nb
                    nmask = offs_n < P
                    page = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
                    tok = offs_n % PAGE
                    kvm = nmask[:, None] & dmask[None, :]
                    k = _load_paged(kc_ptr, page, tok, kvh, s_kcblk, s_kctok, s_kch, offs_d, kvm)
                    v = _load_paged(vc_ptr, page, tok, kvh, s_vcblk, s_vctok, s_vch, offs_d, kvm)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                    s = tl.where(nmask[None, :], s, float("-inf"))
                    acc, l_i, m_i = _update(acc, l_i, m_i, s, v, qk_scale, False, DOT_PREC)

        # ---- (2) this chunk: chunk-relative key index [lo2, hi), rows q_start + index of k/v ----
        hi = tl.minimum(m0 + BLOCK_M, Lq)
        kcol = kvh * s_kh
        vcol = kvh * s_vh
        if HAS_WINDOW:
            lo2 = tl.maximum(m0 - window + 1, 0)
            for n0 in range(lo2, hi, BLOCK_N):
                offs_n = n0 + offs_nb
                nmask = offs_n < hi
                rows = (q_start + offs_n).to(tl.int64)
                kvm = nmask[:, None] & dmask[None, :]
                k = _load_rows(k_ptr, k_desc, q_start + n0, rows, kcol, s_kt, offs_d, kvm, USE_TMA)
                v = _load_rows(v_ptr, v_desc, q_start + n0, rows, vcol, s_vt, offs_d, kvm, USE_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window)
                valid = valid & nmask[None, :]
                s = tl.where(valid, s, float("-inf"))
                acc, l_i, m_i = _update(acc, l_i, m_i, s, v, qk_scale, True, DOT_PREC)
        else:
            # keys left of the diagonal block: visible to every query of the block, no mask
            for n0 in tl.range(0, m0, BLOCK_N, warp_specialize=WARP_SPEC):
                offs_n = n0 + offs_nb
                rows = (q_start + offs_n).to(tl.int64)
                k = _load_rows(k_ptr, k_desc, q_start + n0, rows, kcol, s_kt, offs_d, dmask[None, :], USE_TMA)
                v = _load_rows(v_ptr, v_desc, q_start + n0, rows, vcol, s_vt, offs_d, dmask[None, :], USE_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                acc, l_i, m_i = _update_x(acc, l_i, m_i, s, v, qk_scale, False, DOT_PREC, POLY_EXP)
            # diagonal block(s): causal mask (rows past hi, TMA-loaded from the next sequence or
            # zero-filled, are masked out)
            for n0 in range(m0, hi, BLOCK_N):
                offs_n = n0 + offs_nb
                nmask = offs_n < hi
                rows = (q_start + offs_n).to(tl.int64)
                kvm = nmask[:, None] & dmask[None, :]
                k = _load_rows(k_ptr, k_desc, q_start + n0, rows, kcol, s_kt, offs_d, kvm, USE_TMA)
                v = _load_rows(v_ptr, v_desc, q_start + n0, rows, vcol, s_vt, offs_d, kvm, USE_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                valid = (offs_n[None, :] <= offs_m[:, None]) & nmask[None, :]
                s = tl.where(valid, s, float("-inf"))
                acc, l_i, m_i = _update(acc, l_i, m_i, s, v, qk_scale, True, DOT_PREC)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows (not stored) can have l == 0
        out = acc / l_safe[:, None]
        tl.store(o_ptr + q_rows[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mmask[:, None] & dmask[None, :])


def flash_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, prefix_lens, scale,
                        sliding_window=None):
    """Plain-torch reference (any device): per sequence, gather prefix + chunk keys, mask, softmax."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    G = HQ // HK
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    pls = prefix_lens.tolist()
    for b in range(len(cu) - 1):
        s0, s1 = int(cu[b]), int(cu[b + 1])
        Lq, P = s1 - s0, int(pls[b])
        if Lq == 0:
            continue
        kk, vv = k[s0:s1].float(), v[s0:s1].float()
        if P > 0:
            page = k_cache.shape[1]
            pos = torch.arange(P, device=q.device)
            pages = block_tables[b].long()[pos // page]
            kk = torch.cat([k_cache[pages, pos % page].float(), kk], dim=0)
            vv = torch.cat([v_cache[pages, pos % page].float(), vv], dim=0)
        kk = kk.repeat_interleave(G, dim=1)
        vv = vv.repeat_interleave(G, dim=1)
        qpos = torch.arange(P, P + Lq, device=q.device)[:, None]
        kpos = torch.arange(P + Lq, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed = allowed & (kpos > qpos - sliding_window)
        s = torch.einsum("qhd,khd->hqk", q[s0:s1].float(), kk) * scale
        s = s.masked_fill(~allowed[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[s0:s1] = torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)
    return out


_DEFAULT_TMA = True  # CUDA bf16/fp16 on Hopper+: q/k/v chunk tiles through TMA descriptors


def _tma_ok(q, k, v, D, dev) -> bool:
    """Host-side TMA descriptors: Hopper+, bf16/fp16, heads packed (stride(1) == D), 16-byte aligned."""
    if q.dtype == torch.float32 or D != next_pow2(D, 16) or not tma_available(dev):
        return False
    for t in (q, k, v):
        if t.stride(1) != D or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _config(D: int, dev: torch.device, dtype: torch.dtype, has_prefix: bool):
    """Tiles measured on H100/H200 (kernels/NOTES.md): with TMA loads, 64x64 tiles (4 warps) are as fast
    as 128x128 (8 warps) on long chunks and faster on short ones; the paged-prefix loop prefers 128x128."""
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if has_prefix:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, PTR_FALLBACK=dict(BLOCK_M=128, BLOCK_N=128,
                                                                                    num_warps=8, num_stages=3))


def tuning_key(D: int, dtype: torch.dtype, has_prefix: bool, window: bool) -> dict:
    """Fields a tuning-table entry must match exactly (kernels/tune.py writes them); G and the chunk
    length L are matched by nearness."""
    return dict(D=D, dtype=str(dtype).replace("torch.", ""), prefix=bool(has_prefix), window=bool(window))


def _tuned(D, G, has_prefix, window, max_len, dev, dtype) -> Optional[dict]:
    if dev.type != "cuda" or dtype == torch.float32:
        return None
    found = _tuning.lookup("flash_attention", _tuning.device_name(dev), tuning_key(D, dtype, has_prefix, window),
                           dict(L=max(max_len, 1), G=G))
    return None if found is None else found[0]


def flash_attention(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, prefix_lens, scale: float,
                    sliding_window=None, *, max_seqlen_q: Optional[int] = None, backend: Optional[str] = None,
                    config: Optional[dict] = None):
    """Causal varlen attention with a paged prefix; returns out `[T, Hq, D]` in q.dtype.

    q `[T, Hq, D]`, k/v `[T, Hkv, D]` (may be strided views, last dim contiguous),
    cu_seqlens_q int32 `[B+1]` are absolute row offsets into q/k/v and out: they need not start at 0
    nor end at T, and rows outside [cu[0], cu[B]) are left unwritten (the engine runs the decode rows
    of a mixed step, rows [0, cu[0]), through the paged decode kernel into the same output);
    prefix_lens int32 `[B]`; k_cache/v_cache
    `[num_blocks, page, Hkv, D]` and block_tables int32 `[B, max_blocks]` may be None when every
    prefix_len is 0 (checked for CPU tensors; on CUDA prefix_lens are then ignored, to avoid a sync).
    max_seqlen_q: host-side bound on chunk lengths (default: computed from cu_seqlens_q, one host
    sync; required under CUDA-graph capture). config: override the tuning table and heuristics
    (benchmarks, tuning; keys BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, WARP_SPEC, POLY_EXP,
    HEADS_FIRST, Q_REG; none of them changes results beyond fp32 rounding).
    """
    fn = "flash_attention"
    check_tensor(fn, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, HQ, D = q.shape
    dev = q.device
    check_tensor(fn, "k", k, ndim=3, shape=(T, None, D), dtypes=(q.dtype,), device=dev, last_dim_contiguous=True)
    HK = k.shape[1]
    check(HK >= 1 and HQ % HK == 0, f"{fn}: q heads {HQ} must be a multiple of k heads {HK}")
    check_tensor(fn, "v", v, ndim=3, shape=(T, HK, D), dtypes=(q.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor(fn, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INT_DTYPES, device=dev, contiguous=True)
    B = cu_seqlens_q.shape[0] - 1
    check(B >= 0, f"{fn}: cu_seqlens_q must have B+1 >= 1 entries")
    check_tensor(fn, "prefix_lens", prefix_lens, ndim=1, shape=(B,), dtypes=INT_DTYPES, device=dev,
                 contiguous=True)
    has_cache = k_cache is not None
    check(has_cache == (v_cache is not None) and has_cache == (block_tables is not None),
          f"{fn}: k_cache, v_cache and block_tables must be all given or all None")
    if has_cache:
        check_tensor(fn, "k_cache", k_cache, ndim=4, shape=(None, None, HK, D), dtypes=(q.dtype,), device=dev,
                     last_dim_contiguous=True)
        check_tensor(fn, "v_cache", v_cache, ndim=4, shape=tuple(k_cache.shape), dtypes=(q.dtype,), device=dev,
                     last_dim_contiguous=True)
        check_tensor(fn, "block_tables", block_tables, ndim=2, shape=(B, None), dtypes=INT_DTYPES, device=dev,
                     last_dim_contiguous=True)
    check(sliding_window is None or (isinstance(sliding_window, int) and sliding_window >= 1),
          f"{fn}: sliding_window must be None or an int >= 1, got {sliding_window!r}")
    check(float(scale) > 0, f"{fn}: scale must be > 0, got {scale!r}")
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not has_cache and B > 0 and dev.type != "cuda":
        # checked on CPU only: on CUDA it would cost a host sync per call (prefix_lens are then taken as 0)
        check(not bool((prefix_lens != 0).any()), f"{fn}: prefix_lens > 0 need k_cache/v_cache/block_tables")
    if be == "ref":
        return flash_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, prefix_lens, scale,
                                   sliding_window)
    out = torch.empty((T, HQ, D), dtype=q.dtype, device=dev)
    if T == 0 or B == 0:
        return out
    if max_seqlen_q is None:
        check(not capturing, f"{fn}: pass max_seqlen_q when capturing a CUDA graph (it needs a host sync)")
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    cfg = dict(_config(D, dev, q.dtype, has_cache))
    fallback = cfg.pop("PTR_FALLBACK", None)
    tuned = _tuned(D, HQ // HK, has_cache, sliding_window is not None, max_seqlen_q, dev, q.dtype)
    if tuned is not None:
        fallback = fallback or dict(cfg, USE_TMA=False)
        cfg = tuned
    if config:
        cfg.update(config)
    want_tma = bool(cfg.pop("USE_TMA", _DEFAULT_TMA))
    use_tma = want_tma and _tma_ok(q, k, v, D, dev)
    use_tma = use_tma and T >= max(cfg["BLOCK_M"], cfg["BLOCK_N"])  # TMA boxes no taller than the tensor
    if want_tma and not use_tma and fallback and not config:
        cfg.update(fallback)  # pointer loads: 128x128 tiles measured faster
        cfg.pop("USE_TMA", None)
        cfg["WARP_SPEC"] = False  # tuned with TMA loads only
    warp_spec = bool(cfg.pop("WARP_SPEC", False))
    poly_exp = bool(cfg.pop("POLY_EXP", False))
    heads_first = bool(cfg.pop("HEADS_FIRST", False))
    q_reg = bool(cfg.pop("Q_REG", False)) and dev.type == "cuda" and q.dtype != torch.float32  # inline PTX
    BLOCK_M, BLOCK_N = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    check(BLOCK_M % BLOCK_N == 0, f"{fn}: config BLOCK_M {BLOCK_M} must be a multiple of BLOCK_N {BLOCK_N}")
    n_mblocks = cdiv(max(max_seqlen_q, 1), BLOCK_M)
    if has_cache:
        kc, vc, bt = k_cache, v_cache, block_tables
        cstr = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
        PAGE = k_cache.shape[1]
    else:
        kc, vc, bt = k, v, cu_seqlens_q  # never read
        cstr = (0, 0, 0, 0, 0, 0, 0)
        PAGE = 1
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        q_desc = TensorDescriptor(q, [T, HQ * D], [q.stride(0), 1], [BLOCK_M, D])
        k_desc = TensorDescriptor(k, [T, HK * D], [k.stride(0), 1], [BLOCK_N, D])
        v_desc = TensorDescriptor(v, [T, HK * D], [v.stride(0), 1], [BLOCK_N, D])
    else:
        q_desc, k_desc, v_desc = q, k, v  # unused
    grid = (HQ, n_mblocks, B) if heads_first else (n_mblocks, HQ, B)
    _flash_fwd_kernel[grid](
        q, k, v, out, cu_seqlens_q,
        kc, vc, bt, prefix_lens,
        q_desc, k_desc, v_desc,
        float(scale) * _LOG2E, int(sliding_window or 0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *cstr, HQ // HK,
        D=D, BLOCK_D=next_pow2(D, 16), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAGE=PAGE,
        HAS_PREFIX=has_cache, HAS_WINDOW=sliding_window is not None, DOT_PREC=dot_precision(q.dtype),
        USE_TMA=use_tma, WARP_SPEC=warp_spec, POLY_EXP=poly_exp, HEADS_FIRST=heads_first, Q_REG=q_reg,
        **cfg,
    )
    return out
