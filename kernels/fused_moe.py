"""Fused MoE expert FFN over the experts of one rank.

out[t] = sum_k w[t,k] * w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t])),  e = topk_ids[t,k]
with ids outside [0, E) (e.g. -1: "not on this rank") skipped.

Steps (no host sync, so the whole thing can be captured in a CUDA graph):
  1. align (`moe_align`): (token, slot) pairs sorted by expert, stable, into BLOCK_M-aligned
     segments; each BLOCK_M block of the sorted list belongs to one expert (block_expert, -1 =
     unused). Up to ALIGN_ONE_MAX_N pairs (decode) one Triton launch: every program histograms all
     the pairs itself, takes the segment offsets from a cumsum and places its own chunk of pairs.
     Above, two launches: launch 1 counts pairs per expert in each chunk of the pairs; launch 2
     turns the counts into segment offsets and places every pair. Both fill the padding and the
     block -> expert map in the placing launch. `moe_align_ref` is the same in torch ops.
  2. grouped GEMM gate+up (two accumulators) with silu(gate)*up in the epilogue -> [pairs, I].
  3. grouped GEMM down, times the routing weight (fp32) in the epilogue -> per-pair rows [T*K, H].
  4. weighted reduction back to token order: sum over k in fp32, cast to x.dtype.
On Hopper+ the weight tiles (and the down GEMM's activation tiles) can be loaded through TMA
descriptors (config W_TMA); tiles come from the device's tuning table (kernels/_tuning.py) or
the heuristics in `_config`.

x, topk_ids and topk_weights may be row-strided views (rows of a packed byte buffer, as the
communicator hands them over): only their last dim must be contiguous; nothing is copied.
Shapes carry suffixes: x_TH, w13_E2IH (= [E, 2I, H]), w2_EHI.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import _tuning
from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, cdiv, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend, tma_available)

__all__ = ["fused_moe", "fused_moe_ref", "grouped_mm_moe", "moe_align", "moe_align_ref"]

if HAS_TRITON:

    @triton.jit
    def _load_ids(ids_ptr, offs, lim, E, s_it, K: tl.constexpr):
        """Expert ids of flat pairs offs (pair = t*K + k) as int32, -1 where skipped or past lim."""
        m = offs < lim
        e = tl.load(ids_ptr + (offs // K).to(tl.int64) * s_it + offs % K, mask=m, other=-1)
        ok = m & (e >= 0) & (e < E)
        return tl.where(ok, e, -1).to(tl.int32), ok

    @triton.jit
    def _segments(total, BLOCK_M: tl.constexpr):
        """(seg_start, seg_end) of the BLOCK_M-padded expert segments from the per-expert pair counts."""
        padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        seg_end = tl.cumsum(padded, axis=0)
        return seg_end - padded, seg_end

    @triton.jit
    def _place_chunk(ids_ptr, sorted_ptr, running, i0, lim, E, s_it, K: tl.constexpr, BLOCK_E: tl.constexpr,
                     SUB: tl.constexpr):
        """Place pairs [i0, min(i0 + SUB, lim)) at running[e] + their rank among the chunk's pairs of
        expert e (a [SUB, SUB] compare: keep SUB small); returns running advanced past the chunk."""
        ii = tl.arange(0, SUB)
        e, ok = _load_ids(ids_ptr, i0 + ii, lim, E, s_it, K)
        key = tl.where(ok, e, 0)
        rank = tl.sum(((e[:, None] == e[None, :]) & (ii[None, :] < ii[:, None])).to(tl.int32), axis=1)
        tl.store(sorted_ptr + tl.gather(running, key, 0) + rank, i0 + ii, mask=ok)
        return running + tl.histogram(key, BLOCK_E, mask=ok)

    @triton.jit
    def _fill_blocks(sorted_ptr, bexp_ptr, seg_start, seg_end, total, b_lo, b_hi, N, E,
                     BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
        """Blocks [b_lo, b_hi): block_expert (owner = experts whose segment ends at or before the block:
        a histogram of the segment ends in blocks, then a cumsum; -1 past the last segment) and N in
        the padding slots (past the owner's pairs, or every slot of a block past the last segment)."""
        offs_e = tl.arange(0, BLOCK_E)
        ends = tl.where(offs_e < E, seg_end // BLOCK_M, 1 << 30)  # the padding experts (>= E) never end
        fill_from = seg_start + total
        jj = tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_M)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            rel = ends - b0
            owner = tl.sum((rel < 0).to(tl.int32), axis=0) + tl.cumsum(
                tl.histogram(tl.where(rel >= 0, rel, 0), BLOCK_B, mask=(rel >= 0) & (rel < BLOCK_B)), axis=0)
            bb = b0 + jj
            inb = bb < b_hi
            tl.store(bexp_ptr + bb, tl.where(owner < E, owner, -1), mask=inb)
            ff = tl.gather(fill_from, tl.minimum(owner, E - 1), 0)
            x = bb[:, None] * BLOCK_M + cols[None, :]
            pad = inb[:, None] & ((owner >= E)[:, None] | (x >= ff[:, None]))
            tl.store(sorted_ptr + x, tl.full([BLOCK_B, BLOCK_M], 0, tl.int32) + N, mask=pad)

    @triton.jit
    def _store_segments(seg_ptr, stats_ptr, seg_end, total, E, BLOCK_E: tl.constexpr, HAS_STATS: tl.constexpr):
        offs_e = tl.arange(0, BLOCK_E)
        tl.store(seg_ptr + offs_e, seg_end.to(tl.int64), mask=offs_e < E)
        if HAS_STATS:
            tl.atomic_add(stats_ptr + offs_e, total.to(stats_ptr.dtype.element_ty), mask=offs_e < E)

    @triton.jit(do_not_specialize=["N", "max_padded", "blocks_per_prog"])
    def _moe_align_one_kernel(
        ids_ptr, sorted_ptr, bexp_ptr, seg_ptr, stats_ptr,
        N, E, s_it, max_padded, blocks_per_prog,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, SUB: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, HAS_STATS: tl.constexpr,
    ):
        """The whole alignment in one launch (N <= BLOCK_N): every program histograms all N pairs
        itself (segment offsets without a counts round trip), places the pairs [p*SUB, (p+1)*SUB) and
        fills its blocks_per_prog blocks."""
        p = tl.program_id(0)
        offs_n = tl.arange(0, BLOCK_N)
        e, ok = _load_ids(ids_ptr, offs_n, N, E, s_it, K)
        key = tl.where(ok, e, 0)
        total = tl.histogram(key, BLOCK_E, mask=ok)
        before = tl.histogram(key, BLOCK_E, mask=ok & (offs_n < p * SUB))  # pairs before the chunk
        seg_start, seg_end = _segments(total, BLOCK_M)
        _place_chunk(ids_ptr, sorted_ptr, seg_start + before, p * SUB, N, E, s_it, K, BLOCK_E, SUB)
        b_lo = p * blocks_per_prog
        _fill_blocks(sorted_ptr, bexp_ptr, seg_start, seg_end, total, b_lo,
                     tl.minimum(b_lo + blocks_per_prog, max_padded // BLOCK_M), N, E, BLOCK_E, BLOCK_B, BLOCK_M)
        if p == 0:
            _store_segments(seg_ptr, stats_ptr, seg_end, total, E, BLOCK_E, HAS_STATS)

    @triton.jit(do_not_specialize=["N", "per_prog"])
    def _moe_count_kernel(
        ids_ptr, counts_ptr, N, E, s_it, per_prog,
        K: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """counts[p, e] = pairs routed to expert e among pairs [p*per_prog, (p+1)*per_prog)."""
        p = tl.program_id(0)
        cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
        lo = p * per_prog
        hi = tl.minimum(lo + per_prog, N)
        for i0 in range(lo, hi, CHUNK):
            e, ok = _load_ids(ids_ptr, i0 + tl.arange(0, CHUNK), hi, E, s_it, K)
            cnt += tl.histogram(tl.where(ok, e, 0), BLOCK_E, mask=ok)
        tl.store(counts_ptr + p * BLOCK_E + tl.arange(0, BLOCK_E), cnt)

    @triton.jit(do_not_specialize=["N", "per_prog", "P", "max_padded", "blocks_per_prog"])
    def _moe_place_kernel(
        ids_ptr, counts_ptr, sorted_ptr, bexp_ptr, seg_ptr, stats_ptr,
        N, E, s_it, per_prog, P, max_padded, blocks_per_prog,
        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, SUB: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, HAS_STATS: tl.constexpr,
    ):
        """Segment offsets from the chunk counts, then (programs < P) place their chunk's pairs in
        pair order, SUB at a time, and (every program) fill its blocks_per_prog blocks."""
        p = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        offs_e = tl.arange(0, BLOCK_E)
        c = tl.load(counts_ptr + offs_p[:, None] * BLOCK_E + offs_e[None, :], mask=(offs_p < P)[:, None], other=0)
        total = tl.sum(c, axis=0)
        before = tl.sum(tl.where((offs_p < p)[:, None], c, 0), axis=0)
        seg_start, seg_end = _segments(total, BLOCK_M)
        running = seg_start + before
        lo = p * per_prog
        hi = tl.minimum(lo + per_prog, N)
        for i0 in range(lo, hi, SUB):
            running = _place_chunk(ids_ptr, sorted_ptr, running, i0, hi, E, s_it, K, BLOCK_E, SUB)
        b_lo = p * blocks_per_prog
        _fill_blocks(sorted_ptr, bexp_ptr, seg_start, seg_end, total, b_lo,
                     tl.minimum(b_lo + blocks_per_prog, max_padded // BLOCK_M), N, E, BLOCK_E, BLOCK_B, BLOCK_M)
        if p == 0:
            _store_segments(seg_ptr, stats_ptr, seg_end, total, E, BLOCK_E, HAS_STATS)

    @triton.jit
    def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """GROUP_M m-blocks share a sweep over n (weights of one expert stay in L2)."""
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % gsize
        pid_n = (pid % (GROUP_M * num_n)) // gsize
        return pid_m, pid_n

    @triton.jit
    def _load_a(a_ptrs, a_desc, row0, k0, mask, A_TMA: tl.constexpr):
        """[BLOCK_M, BLOCK_K] activation tile: TMA from the pre-gathered (sorted) rows, or a row gather."""
        if A_TMA:
            return a_desc.load([row0, k0])
        else:
            return tl.load(a_ptrs, mask=mask, other=0.0)

    @triton.jit(do_not_specialize=["num_pairs"])
    def _moe_gate_up_kernel(
        x_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, bexp_ptr,
        num_pairs, H, I, s_xt, s_we, s_wn,
        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr, W_TMA: tl.constexpr, A_TMA: tl.constexpr,
    ):
        num_n = tl.cdiv(I, BLOCK_N)
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
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
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if W_TMA:
            # w13 seen as [E*2I, H]: gate rows e*2I + n, up rows e*2I + I + n. Columns past I read the
            # next rows (or zeros past the end); they are never stored.
            g_row = e * 2 * I + pid_n * BLOCK_N
            for k0 in range(0, H, BLOCK_K):
                a = _load_a(a_ptrs, a_desc, pid_m * BLOCK_M, k0, valid[:, None] & ((k0 + offs_k) < H)[None, :], A_TMA)
                g = w_desc.load([g_row, k0])
                u = w_desc.load([g_row + I, k0])
                acc_g = tl.dot(a, g.T, acc_g, input_precision=DOT_PREC)
                acc_u = tl.dot(a, u.T, acc_u, input_precision=DOT_PREC)
                a_ptrs += BLOCK_K
        else:
            g_ptrs = w_ptr + e.to(tl.int64) * s_we + offs_n[None, :] * s_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
            u_ptrs = g_ptrs + I * s_wn
            for k0 in range(0, H, BLOCK_K):
                kmask = (k0 + offs_k) < H
                a = _load_a(a_ptrs, a_desc, pid_m * BLOCK_M, k0, valid[:, None] & kmask[None, :], A_TMA)
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

    @triton.jit(do_not_specialize=["num_pairs"])
    def _moe_down_kernel(
        a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, bexp_ptr, tw_ptr,
        num_pairs, H, I, s_we, s_wn, s_tw,
        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr, W_TMA: tl.constexpr,
    ):
        num_n = tl.cdiv(H, BLOCK_N)
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
        e = tl.load(bexp_ptr + pid_m)
        if e < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        valid = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if W_TMA:
            # activations [padded pairs, I] by sorted position, w2 seen as [E*H, I]; padding rows of the
            # activations are never written, so their (garbage) output rows are masked at the store
            w_row = e * H + pid_n * BLOCK_N
            for k0 in range(0, I, BLOCK_K):
                a = a_desc.load([pid_m * BLOCK_M, k0])
                bw = w_desc.load([w_row, k0])
                acc = tl.dot(a, bw.T, acc, input_precision=DOT_PREC)
        else:
            rows = offs_m.to(tl.int64)
            a_ptrs = a_ptr + rows[:, None] * I + offs_k[None, :]
            b_ptrs = w_ptr + e.to(tl.int64) * s_we + offs_n[None, :] * s_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
            for k0 in range(0, I, BLOCK_K):
                kmask = (k0 + offs_k) < I
                a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
                bw = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(a, bw, acc, input_precision=DOT_PREC)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
        tw = tl.load(tw_ptr + (pair // TOPK).to(tl.int64) * s_tw + pair % TOPK, mask=valid, other=0.0)
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


def _max_padded(N: int, E: int, block_m: int) -> int:
    return (N + E * (block_m - 1) + block_m - 1) // block_m * block_m


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_counts=None):
    """Torch-ops version of `moe_align` (any device, no host sync; ~20 small launches)."""
    T, K = topk_ids.shape
    E = num_experts
    dev = topk_ids.device
    N = T * K
    flat = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))  # E = skipped bucket
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    if expert_counts is not None:
        expert_counts += counts.to(expert_counts.dtype)
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = seg_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)  # [N] pair ids grouped by expert, token order inside
    skey = key[order]
    skc = skey.clamp(max=E - 1)
    max_padded = _max_padded(N, E, block_m)
    dest = seg_start[skc] + torch.arange(N, device=dev) - cnt_start[skc]
    dest = torch.where(skey < E, dest, torch.full_like(dest, max_padded))  # skipped pairs -> spill slot
    sorted_ids = torch.full((max_padded + 1,), N, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:max_padded]
    starts = torch.arange(0, max_padded, block_m, device=dev)
    bexp = torch.searchsorted(seg_end, starts, right=True)
    block_expert = torch.where(bexp < E, bexp, torch.full_like(bexp, -1)).to(torch.int32)
    return sorted_ids, block_expert, seg_end


# Pairs up to which `moe_align` is one launch (`_moe_align_one_kernel`, every program histograms all
# the pairs); above it two (chunk counts, then placement), where the redundant counting would cost more.
ALIGN_ONE_MAX_N = 4096
ALIGN_ONE_LIMIT = 16384  # the most pairs the one-launch kernel takes (_impl="one"; ids held in registers)


@functools.lru_cache(maxsize=1024)
def _align_grid(N: int, E: int, max_padded: int, block_m: int, impl: str):
    """Launch parameters of the alignment. Both paths fill the padding and the block map in
    [BLOCK_B, BLOCK_M] tiles of at most 2048 slots, blocks_per_prog blocks a program, with enough
    programs that each fills at most ~4096 slots; pairs are placed SUB at a time ([SUB, SUB] rank
    compare).

    impl "one": (BLOCK_N, BLOCK_E, SUB, BLOCK_B, blocks_per_prog, grid, warps): a program per SUB pairs.
    impl "two": (BLOCK_E, CHUNK, per_prog, P, SUB, BLOCK_B, blocks_per_prog, grid, warps): P chunks of
    per_prog pairs (the counts tile [P, BLOCK_E] is kept under 16384 entries), counted CHUNK at a time.
    """
    BLOCK_E = next_pow2(E, 16)
    nb = max_padded // block_m

    def fill(programs):
        grid = max(programs, cdiv(max_padded, 4096))
        blocks_per_prog = cdiv(nb, grid)
        return max(1, min(next_pow2(blocks_per_prog), 2048 // block_m)), blocks_per_prog, grid

    if impl == "one":
        BLOCK_N = next_pow2(N, 16)
        SUB = 32 if N <= 4096 else 64
        return (BLOCK_N, BLOCK_E, SUB, *fill(cdiv(max(N, 1), SUB)), 4 if BLOCK_N <= 1024 else 8)
    SUB = 32
    p_max = max(1, min(256, 16384 // BLOCK_E))
    per_prog = cdiv(cdiv(max(N, 1), p_max), SUB) * SUB
    P = cdiv(max(N, 1), per_prog)
    CHUNK = min(next_pow2(per_prog), 2048)
    return (BLOCK_E, CHUNK, per_prog, P, SUB, *fill(P), 4)


def _align_launches(topk_ids, E, block_m, sorted_ids, block_expert, seg_end, expert_counts, impl=None):
    """[(kernel, grid, args, kwargs)] of the launches `moe_align` makes into the given outputs
    (launch/moe_align_bench.py compiles the same ones ahead of time). impl: "one", "two" or None
    (by ALIGN_ONE_MAX_N)."""
    T, K = topk_ids.shape
    N = T * K
    impl = impl or ("one" if N <= ALIGN_ONE_MAX_N else "two")
    max_padded = sorted_ids.shape[0]
    s_it = topk_ids.stride(0) if T > 1 else K
    has_stats = expert_counts is not None
    stats = expert_counts if has_stats else seg_end  # (never touched without HAS_STATS)
    if impl == "one":
        check(N <= ALIGN_ONE_LIMIT, f"moe_align: the one-launch path takes at most {ALIGN_ONE_LIMIT} pairs, got {N}")
        BLOCK_N, BLOCK_E, SUB, BLOCK_B, blocks_per_prog, grid, warps = _align_grid(N, E, max_padded, block_m, impl)
        return [(_moe_align_one_kernel, (grid,),
                 (topk_ids, sorted_ids, block_expert, seg_end, stats, N, E, s_it, max_padded, blocks_per_prog),
                 dict(K=max(K, 1), BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E, SUB=SUB, BLOCK_B=BLOCK_B, BLOCK_M=block_m,
                      HAS_STATS=has_stats, num_warps=warps))]
    check(impl == "two", f"moe_align: unknown impl {impl!r}")
    BLOCK_E, CHUNK, per_prog, P, SUB, BLOCK_B, blocks_per_prog, grid, warps = _align_grid(N, E, max_padded, block_m,
                                                                                           impl)
    counts = torch.empty((P, BLOCK_E), dtype=torch.int32, device=topk_ids.device)
    return [
        (_moe_count_kernel, (P,), (topk_ids, counts, N, E, s_it, per_prog),
         dict(K=max(K, 1), BLOCK_E=BLOCK_E, CHUNK=CHUNK, num_warps=warps)),
        (_moe_place_kernel, (grid,),
         (topk_ids, counts, sorted_ids, block_expert, seg_end, stats, N, E, s_it, per_prog, P, max_padded,
          blocks_per_prog),
         dict(K=max(K, 1), BLOCK_P=next_pow2(P), BLOCK_E=BLOCK_E, SUB=SUB, BLOCK_B=BLOCK_B, BLOCK_M=block_m,
              HAS_STATS=has_stats, num_warps=warps)),
    ]


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, backend: Optional[str] = None,
              expert_counts: Optional[torch.Tensor] = None, _impl: Optional[str] = None):
    """Sort (token, slot) pairs by expert into block_m-aligned segments, without a host sync.

    topk_ids int32/int64 `[T, K]` (rows may be strided; ids outside [0, E) are skipped).
    Returns (sorted_ids int32 [max_padded] = flat pair index t*K+k, or T*K for padding;
             block_expert int32 [max_padded // block_m], -1 for blocks past the used ones;
             seg_end int64 [E] = end of each expert's padded segment).
    expert_counts: optional int32/int64 `[E]` tensor on the same device; the pairs routed to each
    expert are added to it (graph-safe activation statistics).
    On CUDA (`backend` as in every wrapper) one Triton launch for up to ALIGN_ONE_MAX_N pairs, two
    above (_impl "one" / "two" forces either: benchmarks, tests); `moe_align_ref` elsewhere.
    """
    fn = "moe_align"
    check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=INT_DTYPES, last_dim_contiguous=True)
    check(isinstance(block_m, int) and block_m >= 1 and block_m & (block_m - 1) == 0,
          f"{fn}: block_m must be a power of two, got {block_m!r}")
    check(isinstance(num_experts, int) and num_experts >= 1, f"{fn}: num_experts must be an int >= 1")
    dev = topk_ids.device
    if expert_counts is not None:
        check_tensor(fn, "expert_counts", expert_counts, ndim=1, shape=(num_experts,), dtypes=INT_DTYPES,
                     device=dev, contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return moe_align_ref(topk_ids, num_experts, block_m, expert_counts)
    T, K = topk_ids.shape
    E, N = num_experts, T * K
    max_padded = _max_padded(N, E, block_m)
    sorted_ids = torch.empty((max_padded,), dtype=torch.int32, device=dev)
    block_expert = torch.empty((max_padded // block_m,), dtype=torch.int32, device=dev)
    seg_end = torch.empty((E,), dtype=torch.int64, device=dev)
    for kernel, grid, args, kwargs in _align_launches(topk_ids, E, block_m, sorted_ids, block_expert, seg_end,
                                                      expert_counts, _impl):
        kernel[grid](*args, **kwargs)
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
    """Tile config; the optional "down" entry overrides BLOCK_N/BLOCK_K/GROUP_M/num_warps/num_stages/W_TMA
    for the down GEMM (BLOCK_M is shared: it is the alignment of the sorted pairs). A_TMA (gate+up only,
    with W_TMA): the x rows are gathered into sorted order first and loaded through TMA."""
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


def tuning_key(E: int, K: int, H: int, I: int, dtype: torch.dtype) -> dict:
    """Fields a tuning-table entry must match exactly (kernels/tune.py writes them); T by nearness."""
    return dict(E=E, K=K, H=H, I=I, dtype=str(dtype).replace("torch.", ""))


def _pick_config(T, K, E, H, I, dev, dtype) -> dict:
    if dev.type == "cuda" and dtype != torch.float32:
        found = _tuning.lookup("fused_moe", _tuning.device_name(dev), tuning_key(E, K, H, I, dtype), dict(T=T))
        if found is not None:
            return found[0]
    return _config(T, K, E, H, I, dev, dtype)


_PLANS: dict = {}


def _launch_plan(T, K, E, H, I, dev, dtype):
    """(gate_up kwargs, down kwargs, BLOCK_M) for a shape, cached: the eager path pays the table lookup
    and config merging once per shape, not per call (callers must not edit what they get)."""
    key = (T, K, E, H, I, dev, dtype, _tuning.generation)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _split_config(_pick_config(T, K, E, H, I, dev, dtype))
    return plan


def _split_config(cfg: dict):
    """(gate_up kwargs, down kwargs) with the launch options; BLOCK_M is in both."""
    cfg = dict(cfg)
    down = dict(cfg.pop("down", None) or {})
    gate_up = {"W_TMA": False, "A_TMA": False, **cfg}
    down = {**gate_up, **down}
    down["BLOCK_M"] = gate_up["BLOCK_M"]
    return gate_up, down


def _w_tma_ok(x, w13, w2) -> bool:
    """TMA for the weight tiles: Hopper+, 2-byte dtypes, rows 16-byte aligned."""
    if not tma_available(x.device) or x.dtype == torch.float32:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0 for t in (w13, w2))


def fused_moe(x, w13, w2, topk_ids, topk_weights, *, backend: Optional[str] = None, config: Optional[dict] = None,
              expert_counts: Optional[torch.Tensor] = None):
    """x `[T, H]`, w13 `[E, 2I, H]` (gate rows then up rows), w2 `[E, H, I]`, topk_ids int `[T, K]`
    (local expert slot; -1 = skip), topk_weights float32 `[T, K]` -> out `[T, H]` in x.dtype.

    x, topk_ids and topk_weights need only a contiguous last dim (row-strided views are read in
    place). Tokens whose every id is skipped get zeros. ids >= E are skipped as well (no device
    check). config: override the tuning table and heuristics (benchmarks, tuning). expert_counts:
    optional int `[E]` tensor that the pairs routed to each expert are added to (see moe_align).
    """
    fn = "fused_moe"
    check_tensor(fn, "x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, H = x.shape
    dev = x.device
    check_tensor(fn, "w13", w13, ndim=3, shape=(None, None, H), dtypes=(x.dtype,), device=dev, contiguous=True)
    E, I2, _ = w13.shape
    check(I2 % 2 == 0 and I2 > 0, f"{fn}: w13 dim 1 must be 2*I > 0, got {I2}")
    I = I2 // 2
    check_tensor(fn, "w2", w2, ndim=3, shape=(E, H, I), dtypes=(x.dtype,), device=dev, contiguous=True)
    check_tensor(fn, "topk_ids", topk_ids, ndim=2, shape=(T, None), dtypes=INT_DTYPES, device=dev,
                 last_dim_contiguous=True)
    K = topk_ids.shape[1]
    check_tensor(fn, "topk_weights", topk_weights, ndim=2, shape=(T, K), dtypes=(torch.float32,), device=dev,
                 last_dim_contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        if expert_counts is not None:
            moe_align(topk_ids, E, 1, backend="ref", expert_counts=expert_counts)
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights)
    out = torch.empty((T, H), dtype=x.dtype, device=dev)
    if T == 0 or K == 0:
        return out.zero_()
    if config:
        cfg = _pick_config(T, K, E, H, I, dev, x.dtype)
        cfg.update(config)
        gu, dn = _split_config(cfg)
    else:
        gu, dn = (dict(c) for c in _launch_plan(T, K, E, H, I, dev, x.dtype))
    if (gu["W_TMA"] or dn["W_TMA"] or gu["A_TMA"]) and not _w_tma_ok(x, w13, w2):
        gu["W_TMA"] = dn["W_TMA"] = gu["A_TMA"] = False
    gu["A_TMA"] = gu["A_TMA"] and gu["W_TMA"]  # the pre-gathered activations only with TMA weights
    dn.pop("A_TMA")  # the down GEMM's activations are in sorted order already (TMA with W_TMA)
    BM = gu.pop("BLOCK_M")
    dn.pop("BLOCK_M")
    sorted_ids, block_expert, _ = moe_align(topk_ids, E, BM, backend=be, expert_counts=expert_counts)
    num_m = block_expert.shape[0]
    N = T * K
    inter = torch.empty((sorted_ids.shape[0], I), dtype=x.dtype, device=dev)  # rows by sorted position
    part = torch.empty((N, H), dtype=x.dtype, device=dev)  # rows by pair (t*K + k)
    prec = dot_precision(x.dtype)
    s_xt = x.stride(0) if T > 1 else H
    s_it = topk_ids.stride(0) if T > 1 else K
    s_tw = topk_weights.stride(0) if T > 1 else K

    BN, BK = gu["BLOCK_N"], gu["BLOCK_K"]
    w13_desc = xs_desc = w13
    if gu["W_TMA"]:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w13_desc = TensorDescriptor(w13, [E * I2, H], [H, 1], [BN, BK])
    if gu["A_TMA"]:
        # x rows gathered into sorted order once (padding slots copy row T-1; their outputs are never
        # stored), so the activation tiles stream through TMA like the weights: one extra pass over
        # T*K rows, worth it only when the GEMMs are long (large T)
        src = torch.clamp_max(sorted_ids // K, T - 1)
        xs = x.index_select(0, src)
        xs_desc = TensorDescriptor(xs, [xs.shape[0], H], [H, 1], [BM, BK])
    _moe_gate_up_kernel[(num_m * cdiv(I, BN),)](
        x, xs_desc, w13, w13_desc, inter, sorted_ids, block_expert,
        N, H, I, s_xt, w13.stride(0), w13.stride(1),
        TOPK=K, BLOCK_M=BM, DOT_PREC=prec, **gu,
    )
    BN2, BK2 = dn["BLOCK_N"], dn["BLOCK_K"]
    a_desc = w2_desc = w2
    if dn["W_TMA"]:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(inter, [inter.shape[0], I], [I, 1], [BM, BK2])
        w2_desc = TensorDescriptor(w2, [E * H, I], [I, 1], [BN2, BK2])
    _moe_down_kernel[(num_m * cdiv(H, BN2),)](
        inter, a_desc, w2, w2_desc, part, sorted_ids, block_expert, topk_weights,
        N, H, I, w2.stride(0), w2.stride(1), s_tw,
        TOPK=K, BLOCK_M=BM, DOT_PREC=prec, **dn,
    )
    BLOCK_H = min(next_pow2(H, 16), 1024)
    _moe_reduce_kernel[(T, cdiv(H, BLOCK_H))](
        part, topk_ids, out, H, E, s_it, TOPK=K, BLOCK_H=BLOCK_H, num_warps=4,
    )
    return out
