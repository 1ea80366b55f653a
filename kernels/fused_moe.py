"""Fused MoE expert FFN over the experts of one rank.

out[t] = sum_k w[t,k] * w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t])),  e = topk_ids[t,k]
with ids outside [0, E) (e.g. -1: "not on this rank") skipped.

Steps (no host sync, so the whole thing can be captured in a CUDA graph):
  1. align: (token, slot) pairs sorted by expert into BLOCK_M-aligned segments (torch ops);
     each BLOCK_M block of the sorted list belongs to one expert (block_expert, -1 = unused).
  2. grouped GEMM gate+up (two accumulators) with silu(gate)*up in the epilogue -> [pairs, I].
  3. grouped GEMM down, times the routing weight (fp32) in the epilogue -> per-pair rows [T*K, H].
  4. weighted reduction back to token order: sum over k in fp32, cast to x.dtype.
Shapes carry suffixes: x_TH, w13_E2IH (= [E, 2I, H]), w2_EHI.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton
from ._util import FLOAT_DTYPES, INT_DTYPES, check, check_tensor, dot_precision, interpret_mode, next_pow2, \
    pick_backend

__all__ = ["fused_moe", "fused_moe_ref", "grouped_mm_moe", "moe_align"]

if HAS_TRITON:

    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ptr, bexp_ptr,
        num_pairs, H, I, s_xt, s_we, s_wn,
        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.num_programs(0) // tl.cdiv(I, BLOCK_N)
        num_n = tl.cdiv(I, BLOCK_N)
        # grouped ordering: GROUP_M m-blocks share a sweep over n (weights of one expert stay in L2)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % gsize
        pid_n = (pid % (GROUP_M * num_n)) // gsize
        e = tl.load(bexp_ptr + pid_m)
        if e < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        valid = pair < num_pairs
        tok = (pair // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * s_xt + offs_k[None, :]
        w_base = w_ptr + e.to(tl.int64) * s_we
        g_ptrs = w_base + offs_n[None, :] * s_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        u_ptrs = g_ptrs + I * s_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + offs_k) < H
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        hval = acc_g * tl.sigmoid(acc_g) * acc_u
        rows = offs_m.to(tl.int64)
        tl.store(out_ptr + rows[:, None] * I + offs_n[None, :], hval.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])

    @triton.jit
    def _moe_down_kernel(
        a_ptr, w_ptr, out_ptr, sorted_ptr, bexp_ptr, tw_ptr,
        num_pairs, H, I, s_we, s_wn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_n = tl.cdiv(H, BLOCK_N)
        num_m = tl.num_programs(0) // num_n
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % gsize
        pid_n = (pid % (GROUP_M * num_n)) // gsize
        e = tl.load(bexp_ptr + pid_m)
        if e < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        valid = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * I + offs_k[None, :]
        b_ptrs = w_ptr + e.to(tl.int64) * s_we + offs_n[None, :] * s_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kmask = (k0 + offs_k) < I
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            bw = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, bw, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        tw = tl.load(tw_ptr + pair, mask=valid, other=0.0)
        acc = acc * tw[:, None]
        prow = pair.to(tl.int64)
        tl.store(out_ptr + prow[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])

    @triton.jit
    def _moe_reduce_kernel(
        part_ptr, ids_ptr, out_ptr, H, E, s_it,
        TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(TOPK):
            e = tl.load(ids_ptr + t * s_it + k)
            lim = tl.where((e >= 0) & (e < E), H, 0)  # skipped slot: load nothing
            acc += tl.load(part_ptr + (t * TOPK + k) * H + offs, mask=offs < lim, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert into block_m-aligned segments, without a host sync.

    Returns (sorted_ids int32 [max_padded] = flat pair index t*K+k, or T*K for padding;
             block_expert int32 [max_padded // block_m], -1 for blocks past the used ones;
             seg_end int64 [E] = end of each expert's padded segment).
    """
    T, K = topk_ids.shape
    E = num_experts
    dev = topk_ids.device
    N = T * K
    flat = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))  # E = skipped bucket
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = seg_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)  # [N] pair ids grouped by expert, token order inside
    skey = key[order]
    skc = skey.clamp(max=E - 1)
    max_padded = (N + E * (block_m - 1) + block_m - 1) // block_m * block_m
    dest = seg_start[skc] + torch.arange(N, device=dev) - cnt_start[skc]
    dest = torch.where(skey < E, dest, torch.full_like(dest, max_padded))  # skipped pairs -> spill slot
    sorted_ids = torch.full((max_padded + 1,), N, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:max_padded]
    starts = torch.arange(0, max_padded, block_m, device=dev)
    bexp = torch.searchsorted(seg_end, starts, right=True)
    block_expert = torch.where(bexp < E, bexp, torch.full_like(bexp, -1)).to(torch.int32)
    return sorted_ids, block_expert, seg_end


def fused_moe_ref(x, w13, w2, topk_ids, topk_weights):
    """Plain-torch reference (any device): loop over experts, computed in x.dtype like HF."""
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for e in range(E):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = F.silu(xe @ w13[e, :I].t()) * (xe @ w13[e, I:].t())
        y = h @ w2[e].t()
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None])
    return out.to(x.dtype)


def grouped_mm_moe(x, w13, w2, topk_ids, topk_weights):
    """Baseline with torch._grouped_mm (bench only): align to 16 rows per expert, gather, two
    grouped GEMMs, weighted index_add. Raises RuntimeError where torch has no _grouped_mm."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("grouped_mm_moe: this torch has no torch._grouped_mm")
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    K = topk_ids.shape[1]
    if T == 0:
        return x.new_zeros((0, H))
    sorted_ids, _, seg_end = moe_align(topk_ids, E, 16)
    sid = sorted_ids.long()
    valid = sid < T * K
    tok = torch.where(valid, sid // K, torch.full_like(sid, T))
    xp = torch.cat([x, x.new_zeros(1, H)], dim=0)
    a = xp[tok]  # [Mp, H]
    offs = seg_end.to(torch.int32)
    gu = torch._grouped_mm(a, w13.transpose(1, 2), offs=offs)  # [Mp, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [Mp, H]
    wts = torch.where(valid, topk_weights.reshape(-1)[sid.clamp(max=T * K - 1)], torch.zeros_like(sid,
                                                                                                  dtype=torch.float32))
    out = torch.zeros((T + 1, H), dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * wts[:, None])
    return out[:T].to(x.dtype)


def _config(T: int, K: int, E: int, H: int, I: int, dev: torch.device, dtype: torch.dtype):
    """Tile config; the optional "down" entry overrides BLOCK_N/BLOCK_K/GROUP_M/num_warps/num_stages for
    the down GEMM (BLOCK_M is shared: it is the alignment of the sorted pairs)."""
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    avg = T * K / max(E, 1)  # rows per expert
    if dtype == torch.float32:
        return dict(BLOCK_M=32 if avg <= 32 else 64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if avg <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if avg <= 48:  # M = 64 tiles use wgmma; 32-row tiles fall back to mma.sync (measured 1.33x slower)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if avg <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4,
                down=dict(BLOCK_N=256, BLOCK_K=64, num_stages=4))


def fused_moe(x, w13, w2, topk_ids, topk_weights, *, backend: Optional[str] = None, config: Optional[dict] = None):
    """x `[T, H]`, w13 `[E, 2I, H]` (gate rows then up rows), w2 `[E, H, I]`, topk_ids int `[T, K]`
    (local expert slot; -1 = skip), topk_weights float32 `[T, K]` -> out `[T, H]` in x.dtype.

    Tokens whose every id is skipped get zeros. ids >= E are skipped as well (no device check).
    config: override the tile heuristics (benchmarks).
    """
    fn = "fused_moe"
    check_tensor(fn, "x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    T, H = x.shape
    dev = x.device
    check_tensor(fn, "w13", w13, ndim=3, shape=(None, None, H), dtypes=(x.dtype,), device=dev, contiguous=True)
    E, I2, _ = w13.shape
    check(I2 % 2 == 0 and I2 > 0, f"{fn}: w13 dim 1 must be 2*I > 0, got {I2}")
    I = I2 // 2
    check_tensor(fn, "w2", w2, ndim=3, shape=(E, H, I), dtypes=(x.dtype,), device=dev, contiguous=True)
    check_tensor(fn, "topk_ids", topk_ids, ndim=2, shape=(T, None), dtypes=INT_DTYPES, device=dev, contiguous=True)
    K = topk_ids.shape[1]
    check_tensor(fn, "topk_weights", topk_weights, ndim=2, shape=(T, K), dtypes=(torch.float32,), device=dev,
                 contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights)
    out = torch.empty((T, H), dtype=x.dtype, device=dev)
    if T == 0 or K == 0:
        return out.zero_()
    cfg = dict(_config(T, K, E, H, I, dev, x.dtype))
    if config:
        cfg.update(config)
    down = dict(cfg)
    down.pop("down", None)
    down.update(cfg.pop("down", None) or {})
    BM, BN, BK, GM = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
    down.pop("BLOCK_M")
    BN2, BK2, GM2 = down.pop("BLOCK_N"), down.pop("BLOCK_K"), down.pop("GROUP_M")
    sorted_ids, block_expert, _ = moe_align(topk_ids, E, BM)
    num_m = block_expert.shape[0]
    N = T * K
    inter = torch.empty((sorted_ids.shape[0], I), dtype=x.dtype, device=dev)  # rows by sorted position
    part = torch.empty((N, H), dtype=x.dtype, device=dev)  # rows by pair (t*K + k)
    prec = dot_precision(x.dtype)
    _moe_gate_up_kernel[(num_m * triton.cdiv(I, BN),)](
        x, w13, inter, sorted_ids, block_expert,
        N, H, I, x.stride(0), w13.stride(0), w13.stride(1),
        TOPK=K, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, DOT_PREC=prec, **cfg,
    )
    _moe_down_kernel[(num_m * triton.cdiv(H, BN2),)](
        inter, w2, part, sorted_ids, block_expert, topk_weights,
        N, H, I, w2.stride(0), w2.stride(1),
        BLOCK_M=BM, BLOCK_N=BN2, BLOCK_K=BK2, GROUP_M=GM2, DOT_PREC=prec, **down,
    )
    BLOCK_H = min(next_pow2(H, 16), 1024)
    _moe_reduce_kernel[(T, triton.cdiv(H, BLOCK_H))](
        part, topk_ids, out, H, E, topk_ids.stride(0), TOPK=K, BLOCK_H=BLOCK_H, num_warps=4,
    )
    return out
