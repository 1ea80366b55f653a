"""Kernel benchmark: ceilings, then paged decode, prefill and fused MoE against ceilings and baselines.

    PYTHONUNBUFFERED=1 python3 kernels/bench.py --out $OUT/kernels.json [--md $OUT/kernels.md] [--quick]
        [--only decode,prefill,moe]

Ceilings, measured first in the same run (so no kernel can be compared with a stale number):
  * read: the best of torch sum (fp32 accumulation) / amax and a Triton streaming sum (several tile
    configs, one float out per program) over a 4 GiB bf16 tensor (bytes read / time);
  * copy: the best of torch copy_ and a Triton copy kernel over 2 GiB, counted as read + write;
  * matmul: an 8192^3 bf16 matmul on random data.
Memory-bound rows (decode, MoE at <= 512 tokens) are reported as a fraction of the read ceiling,
compute-bound rows (prefill, MoE) as a fraction of the matmul ceiling, each beside its torch
baseline: SDPA on contiguous K/V (decode), cuDNN SDPA (prefill), torch._grouped_mm (MoE). A ratio
above 1.0 means that ceiling is wrong (too low); the row then says so.

Kernels use their wrapper's own choice of configs: the tuning table when one is active
(AFSPLIT_KERNEL_TUNING=path, as launch/kernels_h200.sh does after kernels/tune.py), else the
shipped tables / heuristics.

Timing: each measured function is captured N times in a CUDA graph (N chosen so that one replay
takes >= ~4 ms); the median over 7 replays / N is the per-call time (launch gaps and Python
overhead excluded, as under CUDA graphs in the engine). Inputs that would fit in L2 (50 MB) are
rotated over several copies inside the graph. "Eager" times are back-to-back calls from Python
(no graph, no L2 flush): what an un-captured engine step pays, host overhead included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # never let kernels/ shadow the package
sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

L2_BYTES = 50e6
ROT_TARGET = 200e6
DEVICE = "cuda"  # where the input builders put tensors (tests run the flow on "cpu" with stub timers)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()

# goal shapes of issue 15 (bf16, head_dim 128, page 16)
DECODE_SHAPES = [(B, ctx, hq, hk) for (B, ctx) in ((16, 32768), (64, 8192), (128, 2048), (256, 4096))
                 for (hq, hk) in ((32, 4), (32, 8), (64, 4))]
PREFILL_SHAPES = [  # (n seqs, chunk len, prefix len, HQ, HK)
    (1, 4096, 0, 32, 4), (1, 8192, 0, 32, 4), (1, 16384, 0, 32, 4),
    (1, 4096, 0, 32, 8), (1, 8192, 0, 32, 8), (1, 16384, 0, 32, 8),
    (4, 2048, 0, 32, 4),
    (1, 4096, 4096, 32, 4), (1, 4096, 4096, 32, 8), (2, 8192, 8192, 32, 4),
]
MOE_MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}  # E, K, H, I
MOE_SHAPES = [("qwen3-30b-a3b", T) for T in (16, 64, 128, 512, 8192)] + [("mixtral-8x7b", T) for T in (128, 8192)]


def n_sets_for(nbytes: float, cap: int = 16) -> int:
    return 1 if nbytes >= L2_BYTES else min(cap, math.ceil(ROT_TARGET / max(nbytes, 1)))


def time_graph(fn, n_sets: int = 1, target_ms: float = 4.0, replays: int = 7) -> float:
    """Median seconds per call of fn(i) (i = input set), captured in a CUDA graph; functions that
    sync the host cannot be captured and are timed eagerly instead (do_bench median)."""
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(0)
    except RuntimeError:
        torch.cuda.set_sync_debug_mode(0)
        return time_eager(lambda: fn(0))
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for j in range(3):
        fn(j % n_sets)
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) / 3, 1e-3)
    n_inner = int(min(max(target_ms / est, 1), 200))
    n_inner = max(n_sets, n_inner // n_sets * n_sets)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(n_inner):
            fn(j % n_sets)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / n_inner)
    del g
    return statistics.median(ts) / 1e3


def time_eager(fn) -> float:
    """do_bench median (L2 flushed per call): for host-syncing baselines."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def time_eager_loop(fn, n_sets: int = 1, target_ms: float = 20.0, reps: int = 5) -> float:
    """Seconds per call of back-to-back eager calls fn(i) (Python launch overhead included, no graph,
    no L2 flush): the median over `reps` timed loops of n calls."""
    for i in range(n_sets):
        fn(i)
    sync()
    t0 = time.perf_counter()
    for j in range(3):
        fn(j % n_sets)
    sync()
    est = max((time.perf_counter() - t0) / 3, 1e-6)
    n = int(min(max(target_ms / 1e3 / est, 3), 500))
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for j in range(n):
            fn(j % n_sets)
        sync()
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts)


READ_PROBE = "max of: torch sum (fp32 acc) / amax, Triton streaming sum (tiny output), over 4 GiB bf16"
COPY_PROBE = "max of: torch copy_, Triton copy kernel, 2 GiB bf16, read + write"

_PROBE_KERNELS = None


def _probe_kernels():
    """Triton streaming kernels for the ceilings: a read-only sum (one fp32 per program) and a copy.
    Each program walks blocks pid, pid + grid, ... so any grid size covers the tensor."""
    global _PROBE_KERNELS
    if _PROBE_KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _read_kernel(x_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for b in range(pid, n_blocks, tl.num_programs(0)):
                acc += tl.load(x_ptr + b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            tl.store(out_ptr + pid, tl.sum(acc, axis=0))

        @triton.jit
        def _copy_kernel(x_ptr, y_ptr, n_blocks, BLOCK: tl.constexpr):
            for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
                offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                tl.store(y_ptr + offs, tl.load(x_ptr + offs))

        _PROBE_KERNELS = (_read_kernel, _copy_kernel)
    return _PROBE_KERNELS


# (BLOCK elements, programs per SM, warps): best of these is the Triton probe's number
PROBE_CONFIGS = [(4096, 8, 4), (8192, 8, 8), (8192, 4, 8), (16384, 2, 8)]


def _best_probe(name, fns, nbytes, log) -> tuple[float, dict]:
    """(best GB/s, {probe: GB/s or error}) over fns {probe name: callable}; nbytes moved per call."""
    got = {}
    for probe, fn in fns.items():
        try:
            got[probe] = nbytes / time_graph(lambda i: fn()) / 1e9
        except Exception as e:  # noqa: BLE001
            got[probe] = _err(e)
    timed = {k: v for k, v in got.items() if isinstance(v, float)}
    if not timed:
        raise RuntimeError(f"no {name} probe ran: {got}")
    log(f"{name} probes (GB/s): " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in got.items()))
    return max(timed.values()), got


def read_probes(log=print) -> tuple[float, dict]:
    """Read bandwidth of this GPU: the best of torch's sum / amax and a Triton streaming sum (several
    tile configs, an output of one float per program) over a 4 GiB bf16 tensor (bytes read / time);
    returns (best GB/s, every probe's GB/s)."""
    from kernels._util import sm_count

    read_k, _ = _probe_kernels()
    a = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16)
    sms = sm_count(a.device)
    out = torch.empty(sms * 16, device="cuda", dtype=torch.float32)
    fns = {"torch sum": lambda: a.sum(dtype=torch.float32), "torch amax": lambda: a.amax()}
    for blk, per_sm, warps in PROBE_CONFIGS:
        fns[f"triton {blk}x{per_sm}/SM w{warps}"] = (
            lambda blk=blk, per_sm=per_sm, warps=warps:
            read_k[(sms * per_sm,)](a, out, a.numel() // blk, BLOCK=blk, num_warps=warps))
    best = _best_probe("read", fns, a.numel() * 2, log)
    del a
    torch.cuda.empty_cache()
    return best


def read_ceiling_GBps() -> float:
    """The read ceiling in GB/s (best probe of `read_probes`), for callers that need the number only."""
    return read_probes(lambda s: None)[0]


def copy_probes(log=print) -> tuple[float, dict]:
    """Copy bandwidth counted as read + write: the best of torch's copy_ and a Triton copy kernel over 2 GiB."""
    from kernels._util import sm_count

    _, copy_k = _probe_kernels()
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    sms = sm_count(a.device)
    fns = {"torch copy_": lambda: b.copy_(a)}
    for blk, per_sm, warps in PROBE_CONFIGS:
        fns[f"triton {blk}x{per_sm}/SM w{warps}"] = (
            lambda blk=blk, per_sm=per_sm, warps=warps:
            copy_k[(sms * per_sm,)](a, b, a.numel() // blk, BLOCK=blk, num_warps=warps))
    best = _best_probe("copy", fns, 2 * a.numel() * 2, log)
    if not torch.equal(a[-1000:], b[-1000:]):
        log("WARNING copy probe: the last copy did not reproduce its input")
    del a, b
    torch.cuda.empty_cache()
    return best


def ceilings(log=print):
    """Read, copy (read + write) and bf16 matmul ceilings of this GPU, measured now; each bandwidth is
    the best over several probes, so that no kernel of the run can honestly exceed it."""
    read_bw, read_all = read_probes(log)
    copy_bw, copy_all = copy_probes(log)
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = time_graph(lambda i: x @ y)
    mm = 2 * m ** 3 / t
    del x, y
    torch.cuda.empty_cache()
    return {"read_GBps": read_bw, "copy_GBps": copy_bw, "matmul_bf16_TFLOPs": mm / 1e12,
            "read_probe": READ_PROBE, "copy_probe": COPY_PROBE, "matmul_probe": "8192^3 bf16",
            "read_probes_GBps": read_all, "copy_probes_GBps": copy_all}


def check_ceiling(row: dict, field: str, log) -> None:
    """Mark a row whose rate exceeds its ceiling: that ceiling is then wrong, not the kernel fast."""
    v = row.get(field)
    if v is not None and v > 1.0:
        row["ceiling_exceeded"] = (f"{field} = {v:.3f} > 1: the measured ceiling is too low (wrong probe), "
                                   "do not read this row as a fraction of peak")
        log(f"WARNING {row['kernel']}: {row['ceiling_exceeded']}")


def _err(e: Exception) -> str:
    return repr(e)[:240]


# ----------------------------------------------------------------------------- decode

def decode_inputs(B, ctx, HQ, HK, D=128, page=16, dtype=torch.bfloat16, n_sets=1):
    """Random paged K/V (shuffled pages), block tables and queries for the decode benchmarks."""
    nblk = B * ctx // page
    kc = torch.randn(n_sets * nblk, page, HK, D, device=DEVICE, dtype=dtype)
    vc = torch.randn_like(kc)
    perm = torch.randperm(nblk, device=DEVICE).to(torch.int32).view(B, ctx // page)
    bts = [perm + i * nblk for i in range(n_sets)]
    qs = [torch.randn(B, HQ, D, device=DEVICE, dtype=dtype) for _ in range(n_sets)]
    sl = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
    return kc, vc, bts, qs, sl


def bench_decode(ceil, quick, log):
    from kernels._util import sm_count
    from kernels.paged_decode_attention import _pick as _decode_pick
    from kernels.paged_decode_attention import paged_decode_attention

    rows = []
    D, PAGE = 128, 16
    shapes = DECODE_SHAPES if not quick else [(64, 8192, 32, 4), (16, 32768, 32, 4)]
    for (B, ctx, HQ, HK) in shapes:
        kv_bytes = 2 * B * ctx * HK * D * 2
        row = dict(kernel="decode", B=B, ctx=ctx, HQ=HQ, HK=HK, D=D, page=PAGE, dtype="bf16", kv_bytes=kv_bytes)
        try:
            nsets = n_sets_for(kv_bytes)
            kc, vc, bts, qs, sl = decode_inputs(B, ctx, HQ, HK, D, PAGE, n_sets=nsets)
            scale = D ** -0.5
            t = time_graph(lambda i: paged_decode_attention(qs[i], kc, vc, bts[i], sl, scale), nsets)
            cfg, splits = _decode_pick(B, HK, HQ // HK, D, PAGE, ctx, kc.device, kc.dtype, False, sm_count(kc.device))
            row.update(time_us=t * 1e6, GBps=kv_bytes / t / 1e9, config=dict(cfg, num_splits=splits))
            row["frac_read"] = row["GBps"] / ceil["read_GBps"]
            row["frac_copy"] = row["GBps"] / ceil["copy_GBps"]  # copy counted as read + write
            check_ceiling(row, "frac_read", log)
            # baseline: SDPA over K/V gathered contiguous [B, HK, ctx, D] (the gather is not timed)
            kb, vb = [], []
            for i in range(nsets):
                idx = bts[i].long()
                kb.append(kc[idx].reshape(B, ctx, HK, D).transpose(1, 2).contiguous())
                vb.append(vc[idx].reshape(B, ctx, HK, D).transpose(1, 2).contiguous())
            q4 = [x.unsqueeze(2) for x in qs]  # [B, HQ, 1, D]
            try:
                tb = time_graph(lambda i: F.scaled_dot_product_attention(q4[i], kb[i], vb[i], scale=scale,
                                                                         enable_gqa=True), nsets)
                row.update(sdpa_us=tb * 1e6, vs_sdpa=tb / t, sdpa_frac_read=kv_bytes / tb / 1e9 / ceil["read_GBps"])
            except Exception as e:  # noqa: BLE001
                row["sdpa_error"] = _err(e)
            del kb, vb, kc, vc
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        row["goal_met"] = bool(row.get("frac_read", 0) >= 0.90 and row.get("vs_sdpa", 0) >= 1.0)
        rows.append(row)
        log(fmt_row(row))
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- prefill

def prefill_inputs(n, L, P, HQ, HK, D=128, page=16, dtype=torch.bfloat16):
    T = n * L
    q = torch.randn(T, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(T, HK, D, device=DEVICE, dtype=dtype)
    v = torch.randn(T, HK, D, device=DEVICE, dtype=dtype)
    cu = torch.arange(0, T + 1, L, device=DEVICE, dtype=torch.int32)
    pl = torch.full((n,), P, device=DEVICE, dtype=torch.int32)
    if P:
        nblk = n * P // page
        kc = torch.randn(nblk, page, HK, D, device=DEVICE, dtype=dtype)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nblk, device=DEVICE).to(torch.int32).view(n, P // page)
    else:
        kc = vc = bt = None
    return q, k, v, cu, pl, kc, vc, bt


def prefill_flops(n, L, P, HQ, D=128) -> float:
    return 4 * D * HQ * n * (L * P + L * (L + 1) / 2)


def _sdpa_times(qb, kb, vb, mask, scale, log):
    """{backend: seconds or error} for cuDNN / flash / efficient SDPA on the same inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                if mask is None:
                    t = time_graph(lambda i: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale))
                else:
                    t = time_graph(lambda i: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale))
            res[name] = t
        except Exception as e:  # noqa: BLE001
            res[name + "_error"] = _err(e)
    return res


def bench_prefill(ceil, quick, log):
    from torch.nn.attention.bias import causal_lower_right

    from kernels.flash_attention import _tuned as _flash_tuned
    from kernels.flash_attention import flash_attention

    rows = []
    D, PAGE = 128, 16
    shapes = PREFILL_SHAPES if not quick else [(1, 8192, 0, 32, 4), (1, 4096, 4096, 32, 4)]
    for (n, L, P, HQ, HK) in shapes:
        row = dict(kernel="prefill", n_seqs=n, chunk=L, prefix=P, HQ=HQ, HK=HK, D=D, dtype="bf16")
        try:
            q, k, v, cu, pl, kc, vc, bt = prefill_inputs(n, L, P, HQ, HK, D, PAGE)
            scale = D ** -0.5
            flops = prefill_flops(n, L, P, HQ, D)
            t = time_graph(lambda i: flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, max_seqlen_q=L))
            row.update(time_us=t * 1e6, TFLOPs=flops / t / 1e12,
                       config=_flash_tuned(D, HQ // HK, P > 0, False, L, q.device, q.dtype) or "heuristic")
            row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_bf16_TFLOPs"]
            check_ceiling(row, "frac_matmul", log)
            # baselines: batched SDPA over [n, HQ, L(+P), D] (equal lengths), K/V expanded to HQ heads
            G = HQ // HK
            qb = q.view(n, L, HQ, D).transpose(1, 2).contiguous()
            kk, vv = k.view(n, L, HK, D), v.view(n, L, HK, D)
            if P:
                kk = torch.cat([kc[bt.long()].reshape(n, P, HK, D), kk], 1)
                vv = torch.cat([vc[bt.long()].reshape(n, P, HK, D), vv], 1)
            kb = kk.repeat_interleave(G, dim=2).transpose(1, 2).contiguous()
            vb = vv.repeat_interleave(G, dim=2).transpose(1, 2).contiguous()
            del kk, vv
            res = _sdpa_times(qb, kb, vb, causal_lower_right(L, L + P) if P else None, scale, log)
            row["sdpa_us"] = {k_: (v_ * 1e6 if isinstance(v_, float) else v_) for k_, v_ in res.items()}
            if isinstance(res.get("cudnn"), float):
                row["vs_cudnn"] = res["cudnn"] / t
                row["cudnn_TFLOPs"] = flops / res["cudnn"] / 1e12
            timed = {k_: v_ for k_, v_ in res.items() if isinstance(v_, float)}
            if timed:
                best = min(timed, key=timed.get)
                row.update(sdpa_best=best, vs_sdpa_best=timed[best] / t)
            del q, k, v, kc, vc, qb, kb, vb
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        # the goal's baseline is cuDNN SDPA; where cuDNN cannot run the shape (e.g. a lower-right causal
        # mask for a prefix), the fastest SDPA backend that can, named in the row
        row["goal_baseline"] = "cudnn" if "vs_cudnn" in row else row.get("sdpa_best")
        row["goal_met"] = bool(row.get("vs_cudnn", row.get("vs_sdpa_best", 0)) >= 1.0)
        rows.append(row)
        log(fmt_row(row))
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- fused MoE

def moe_weights(E, H, I, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, device=DEVICE, dtype=dtype, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, device=DEVICE, dtype=dtype, generator=g) * I ** -0.5
    return w13, w2


def moe_tokens(E, K, H, T, dtype=torch.bfloat16, seed=0):
    """x [T, H], top-K ids int32 and renormalised weights from random softmax routing."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(T, H, device=DEVICE, dtype=dtype, generator=g)
    wts, ids = torch.softmax(torch.randn(T, E, device=DEVICE, generator=g), -1).topk(K, dim=-1)
    wts = (wts / wts.sum(-1, keepdim=True)).contiguous()
    return x, ids.to(torch.int32).contiguous(), wts


def moe_bytes(E, K, H, I, T, used) -> float:
    """Bytes a fused MoE call must move at least: the used experts' weights, x read, out written."""
    return used * 3 * H * I * 2 + 2 * T * H * 2


def bench_moe(ceil, quick, log):
    from kernels.fused_moe import _launch_plan as _moe_plan
    from kernels.fused_moe import fused_moe, grouped_mm_moe, moe_align, moe_align_ref

    rows = []
    shapes = MOE_SHAPES if not quick else [("qwen3-30b-a3b", 128), ("mixtral-8x7b", 8192)]
    weights = {}
    for name, T in shapes:
        E, K, H, I = MOE_MODELS[name]
        row = dict(kernel="fused_moe", model=name, T=T, E=E, K=K, H=H, I=I, dtype="bf16")
        try:
            if name not in weights:
                weights.clear()
                torch.cuda.empty_cache()
                weights[name] = moe_weights(E, H, I)
            w13, w2 = weights[name]
            x, ids, wts = moe_tokens(E, K, H, T, seed=T)
            used = int(torch.unique(ids).numel())
            flops = 6 * T * K * H * I
            nbytes = moe_bytes(E, K, H, I, T, used)
            t = time_graph(lambda i: fused_moe(x, w13, w2, ids, wts))
            row["config"] = list(_moe_plan(T, K, E, H, I, x.device, x.dtype))
            row.update(experts_used=used, time_us=t * 1e6, TFLOPs=flops / t / 1e12, GBps=nbytes / t / 1e9)
            row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_bf16_TFLOPs"]
            row["frac_read"] = row["GBps"] / ceil["read_GBps"]
            check_ceiling(row, "frac_read", log)
            check_ceiling(row, "frac_matmul", log)
            te = time_eager_loop(lambda i: fused_moe(x, w13, w2, ids, wts))
            row.update(eager_us=te * 1e6, eager_over_graph=te / t)
            try:
                tg = time_graph(lambda i: grouped_mm_moe(x, w13, w2, ids, wts))
                row.update(grouped_mm_us=tg * 1e6, vs_grouped_mm=tg / t)
            except Exception as e:  # noqa: BLE001
                row["grouped_mm_error"] = _err(e)
            if T <= 8192:
                bm = 16 if T * K / E <= 16 else 64
                ta = time_graph(lambda i: moe_align(ids, E, bm))
                tr = time_graph(lambda i: moe_align_ref(ids, E, bm))
                row["align"] = dict(block_m=bm, triton_graph_us=ta * 1e6, ref_graph_us=tr * 1e6,
                                    triton_eager_us=time_eager_loop(lambda i: moe_align(ids, E, bm)) * 1e6,
                                    ref_eager_us=time_eager_loop(lambda i: moe_align_ref(ids, E, bm)) * 1e6)
            if name == "qwen3-30b-a3b" and T <= 128:
                row["goal"] = "frac_read >= 0.85 and eager <= 1.15x graph"
                row["goal_met"] = bool(row["frac_read"] >= 0.85 and row["eager_over_graph"] <= 1.15)
            elif name == "qwen3-30b-a3b" and T <= 512:
                row["goal"] = "eager <= 1.15x graph"
                row["goal_met"] = bool(row["eager_over_graph"] <= 1.15)
            elif name == "mixtral-8x7b" and T >= 8192:
                row["goal"] = ">= 1.2x torch._grouped_mm"
                row["goal_met"] = bool(row.get("vs_grouped_mm", 0) >= 1.2)
            del x
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        rows.append(row)
        log(fmt_row(row))
        torch.cuda.empty_cache()
    weights.clear()
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report

def fmt_row(r) -> str:
    if "error" in r:
        return f"{r['kernel']} {r}: ERROR {r['error']}"
    if r["kernel"] == "decode":
        base = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else "-"
        return (f"decode  {r['HQ']}/{r['HK']} B={r['B']:>3} ctx={r['ctx']:>5} {r['time_us']:9.1f} us "
                f"{r['GBps']:7.0f} GB/s {r['frac_read']:.3f} of read  vs SDPA {base}")
    if r["kernel"] == "prefill":
        base = f"{r['vs_cudnn']:.2f}x" if "vs_cudnn" in r else "-"
        return (f"prefill {r['HQ']}/{r['HK']} {r['n_seqs']}x{r['chunk']:>5} prefix={r['prefix']:>5} "
                f"{r['time_us']:9.1f} us {r['TFLOPs']:6.1f} TF/s {r['frac_matmul']:.3f} of mm  vs cuDNN {base}")
    gm = f"{r['vs_grouped_mm']:.2f}x" if "vs_grouped_mm" in r else "-"
    return (f"moe {r['model']:<14} T={r['T']:>5} {r['time_us']:9.1f} us (eager {r['eager_us']:8.1f} = "
            f"{r['eager_over_graph']:.2f}x) {r['TFLOPs']:6.1f} TF/s {r['frac_matmul']:.3f} of mm  "
            f"{r['GBps']:6.0f} GB/s {r['frac_read']:.3f} of read  vs grouped_mm {gm}")


def _f(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def save_results(res: dict, out: str, md: str | None, markdown) -> None:
    """Rewrite the JSON results (and the markdown tables) after every part, so a cut run keeps what it measured."""
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    if md:
        with open(md, "w") as f:
            f.write(markdown(res))


def markdown(res: dict) -> str:
    """Markdown tables of a result dict (what docs/benchmarks/kernels-h200.md records)."""
    c = res.get("ceilings", {})
    out = [f"Device {res.get('device')}, {res.get('date')}, commit {res.get('commit')}, torch {res.get('torch')}, "
           f"Triton {res.get('triton')}; tuning table: {res.get('tuning_table') or 'shipped / heuristics'}.", "",
           f"Ceilings (same run): read {_f(c.get('read_GBps'), '{:.0f}')} GB/s ({c.get('read_probe')}), "
           f"copy {_f(c.get('copy_GBps'), '{:.0f}')} GB/s ({c.get('copy_probe')}), "
           f"bf16 matmul {_f(c.get('matmul_bf16_TFLOPs'), '{:.0f}')} TFLOP/s ({c.get('matmul_probe')}).", ""]
    for kind in ("read", "copy"):
        probes = c.get(f"{kind}_probes_GBps")
        if probes:
            out += [f"{kind.capitalize()} probes (GB/s): " + ", ".join(
                f"{k} {_f(v, '{:.0f}')}" if isinstance(v, (int, float)) else f"{k} failed" for k, v in probes.items()),
                ""]
    rows = res.get("rows", [])
    dec = [r for r in rows if r["kernel"] == "decode"]
    if dec:
        out += ["| decode (bf16, d128, page 16) | time (us) | GB/s | of read | of copy | SDPA (us) | vs SDPA | goal (>= 0.90, >= 1.0x) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            out.append(f"| B={r['B']} ctx={r['ctx']} {r['HQ']}/{r['HK']} | {_f(r.get('time_us'), '{:.1f}')} | "
                       f"{_f(r.get('GBps'), '{:.0f}')} | {_f(r.get('frac_read'), '{:.3f}')} | "
                       f"{_f(r.get('frac_copy'), '{:.3f}')} | "
                       f"{_f(r.get('sdpa_us'), '{:.1f}')} | {_f(r.get('vs_sdpa'))}x | "
                       f"{'met' if r.get('goal_met') else '**missed**'}{' (ERROR)' if 'error' in r else ''} |")
        out.append("")
    pre = [r for r in rows if r["kernel"] == "prefill"]
    if pre:
        out += ["| prefill (causal, bf16, d128) | time (us) | TFLOP/s | of matmul | cuDNN (us) | vs cuDNN | best SDPA | goal (>= 1.0x cuDNN) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in pre:
            cud = (r.get("sdpa_us") or {}).get("cudnn")
            out.append(f"| {r['n_seqs']}x{r['chunk']} prefix {r['prefix']} {r['HQ']}/{r['HK']} | "
                       f"{_f(r.get('time_us'), '{:.1f}')} | {_f(r.get('TFLOPs'), '{:.0f}')} | "
                       f"{_f(r.get('frac_matmul'), '{:.3f}')} | {_f(cud, '{:.1f}')} | {_f(r.get('vs_cudnn'))}x | "
                       f"{r.get('sdpa_best', '-')} {_f(r.get('vs_sdpa_best'))}x | "
                       f"{'met' if r.get('goal_met') else '**missed**'}{' (ERROR)' if 'error' in r else ''}"
                       f"{'' if r.get('goal_baseline') in ('cudnn', None) else ' (vs ' + r['goal_baseline'] + ': no cuDNN)'} |")
        out.append("")
    moe = [r for r in rows if r["kernel"] == "fused_moe"]
    if moe:
        out += ["| fused MoE (bf16) | experts hit | graph (us) | eager (us) | eager/graph | of read | TFLOP/s | of matmul | vs grouped_mm | align Triton / torch, eager (us) | goal |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in moe:
            al = r.get("align") or {}
            goal = r.get("goal")
            gtxt = "-" if goal is None else (f"{goal}: " + ("met" if r.get("goal_met") else "**missed**"))
            out.append(f"| {r['model']} T={r['T']} | {r.get('experts_used', '-')} | {_f(r.get('time_us'), '{:.1f}')} | "
                       f"{_f(r.get('eager_us'), '{:.1f}')} | {_f(r.get('eager_over_graph'))} | "
                       f"{_f(r.get('frac_read'), '{:.3f}')} | {_f(r.get('TFLOPs'), '{:.0f}')} | "
                       f"{_f(r.get('frac_matmul'), '{:.3f}')} | {_f(r.get('vs_grouped_mm'))}x | "
                       f"{_f(al.get('triton_eager_us'), '{:.0f}')} / {_f(al.get('ref_eager_us'), '{:.0f}')} | {gtxt} |")
        out.append("")
    bad = [r for r in rows if "ceiling_exceeded" in r]
    if bad:
        out.append("**Ceiling exceeded** (the ceiling probe is wrong for these rows): " +
                   "; ".join(f"{r['kernel']} {r.get('B', r.get('T', ''))}: {r['ceiling_exceeded']}" for r in bad))
    errs = res.get("errors")
    if errs:
        out.append(f"Parts that failed: {', '.join(list(e)[0] for e in errs)} (tracebacks in the JSON).")
    return "\n".join(out) + "\n"


def run_info() -> dict:
    """Date, device, versions and commit of this run (COMMIT from the environment where there is no .git)."""
    import triton

    try:
        commit = subprocess.run(["git", "-C", _ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=DEVICE,
                sms=0, torch=torch.__version__, triton=triton.__version__, commit=commit or os.environ.get("COMMIT"))
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results (rewritten after every part)")
    ap.add_argument("--md", help="also write the markdown tables here")
    ap.add_argument("--quick", action="store_true", help="two shapes per kernel")
    ap.add_argument("--only", default="decode,prefill,moe", help="parts, run in this order")
    args = ap.parse_args()

    def log(s):
        print(s, flush=True)

    res = run_info()
    res["tuning_table"] = os.environ.get("AFSPLIT_KERNEL_TUNING") or None
    res["ceilings"] = ceil = ceilings(log)
    log(f"device {res['device']}  read {ceil['read_GBps']:.0f} GB/s  copy {ceil['copy_GBps']:.0f} GB/s (read+write)  "
        f"bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TF/s")
    res["rows"] = []

    def save():
        save_results(res, args.out, args.md, markdown)

    save()
    parts = {"decode": bench_decode, "prefill": bench_prefill, "moe": bench_moe}
    for part in [p for p in args.only.split(",") if p in parts]:  # in the order given (a cut run keeps the first)
        fn = parts[part]
        try:
            res["rows"] += fn(ceil, args.quick, log)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log(f"{part} FAILED: {tb[-1500:]}")
            res.setdefault("errors", []).append({part: tb})
        save()
    print("\n==== summary ====")
    print(markdown(res))


if __name__ == "__main__":
    main()
