"""Kernel benchmark: ceilings, then paged decode, prefill and fused MoE against baselines.

    PYTHONUNBUFFERED=1 python3 kernels/bench.py --out $OUT/kernels.json [--quick] [--sweep]

Timing: each measured function is captured N times in a CUDA graph (N chosen so that one replay
takes >= ~4 ms); the median over 7 replays / N is the per-call time (launch gaps and Python
overhead excluded, as under CUDA graphs in the engine). Inputs that would fit in L2 (50 MB) are
rotated over several copies inside the graph. Baselines that sync the host (per-expert loop) are
timed eagerly with triton.testing.do_bench (median, L2 flushed per call).
Ceilings are measured in the same run: a 1 GiB device-to-device copy (bytes read + written) and
an 8192^3 bf16 matmul on random data.
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
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # never let kernels/ shadow the package
sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

L2_BYTES = 50e6
ROT_TARGET = 200e6


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
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def ceilings():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time_graph(lambda i: b.copy_(a))
    copy_bw = 2 * a.numel() * 2 / t
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = time_graph(lambda i: x @ y)
    mm = 2 * m ** 3 / t
    del x, y
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "matmul_bf16_TFLOPs": mm / 1e12}


# ----------------------------------------------------------------------------- decode

def bench_decode(ceil, quick, sweep, log):
    from kernels.paged_decode_attention import decode_num_splits, paged_decode_attention

    rows = []
    D, PAGE, HQ = 128, 16, 32
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batches = [1, 16, 64, 256] if not quick else [1, 64]
    ctxs = [1024, 8192, 32768] if not quick else [8192]
    for HK in (4, 8):
        for B in batches:
            for ctx in ctxs:
                kv_bytes = 2 * B * ctx * HK * D * 2
                if kv_bytes > 36e9:
                    log(f"decode skip B={B} ctx={ctx} HK={HK}: KV {kv_bytes / 1e9:.1f} GB")
                    continue
                nsets = n_sets_for(kv_bytes)
                nblk = B * ctx // PAGE
                kc = torch.randn(nsets * nblk, PAGE, HK, D, device="cuda", dtype=dt)
                vc = torch.randn_like(kc)
                perm = torch.randperm(nblk, device="cuda").to(torch.int32).view(B, ctx // PAGE)
                bts = [perm + i * nblk for i in range(nsets)]
                q = [torch.randn(B, HQ, D, device="cuda", dtype=dt) for _ in range(nsets)]
                sl = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
                scale = D ** -0.5
                splits = decode_num_splits(B, HK, ctx, sms, 64)
                t = time_graph(lambda i: paged_decode_attention(q[i], kc, vc, bts[i], sl, scale), nsets)
                row = dict(kernel="decode", B=B, ctx=ctx, HQ=HQ, HK=HK, D=D, page=PAGE, dtype="bf16", n_sets=nsets,
                           splits=splits, time_us=t * 1e6, GBps=kv_bytes / t / 1e9)
                row["frac_copy"] = row["GBps"] / ceil["copy_GBps"]
                # baseline: SDPA over K/V gathered contiguous [B, HK, ctx, D] (gather not timed)
                if 2 * kv_bytes * nsets <= 60e9:
                    try:
                        kb, vb = [], []
                        for i in range(nsets):
                            idx = bts[i].long()
                            kb.append(kc[idx].reshape(B, ctx, HK, D).transpose(1, 2).contiguous())
                            vb.append(vc[idx].reshape(B, ctx, HK, D).transpose(1, 2).contiguous())
                        q4 = [x.unsqueeze(2) for x in q]  # [B, HQ, 1, D]
                        tb = time_graph(lambda i: F.scaled_dot_product_attention(q4[i], kb[i], vb[i], scale=scale,
                                                                                 enable_gqa=True), nsets)
                        row["sdpa_us"] = tb * 1e6
                        row["vs_sdpa"] = tb / t
                        del kb, vb
                    except Exception as e:  # noqa: BLE001
                        row["sdpa_error"] = repr(e)[:200]
                if sweep and B == 64 and ctx == 8192:
                    row["sweep"] = []
                    for cfg in (dict(BLOCK_N=32, num_warps=4, num_stages=3),
                                dict(BLOCK_N=64, num_warps=4, num_stages=4),
                                dict(BLOCK_N=64, num_warps=8, num_stages=3),
                                dict(BLOCK_N=128, num_warps=8, num_stages=3),
                                dict(BLOCK_N=128, num_warps=4, num_stages=2)):
                        for ns in (None, 2 * splits):
                            try:
                                ts = time_graph(lambda i: paged_decode_attention(q[i], kc, vc, bts[i], sl, scale,
                                                                                 config=cfg, num_splits=ns), nsets)
                                row["sweep"].append(dict(cfg=cfg, num_splits=ns, time_us=ts * 1e6,
                                                         GBps=kv_bytes / ts / 1e9))
                            except Exception as e:  # noqa: BLE001
                                row["sweep"].append(dict(cfg=cfg, num_splits=ns, error=repr(e)[:200]))
                rows.append(row)
                log(fmt_row(row))
                del kc, vc
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- prefill

def _sdpa_best(fn_by_backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best, res = None, {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                t = fn_by_backend()
            res[name] = t
            if best is None or t < res[best]:
                best = name
        except Exception as e:  # noqa: BLE001
            res[name] = None
            res[name + "_error"] = repr(e)[:160]
    return best, res


def bench_prefill(ceil, quick, sweep, log):
    from torch.nn.attention.bias import causal_lower_right

    from kernels.flash_attention import flash_attention

    rows = []
    D, PAGE, HQ = 128, 16, 32
    dt = torch.bfloat16
    cases = [  # (n seqs, chunk len, prefix len, HK)
        (1, 8192, 0, 4), (4, 2048, 0, 4), (2, 8192, 0, 4), (1, 32768, 0, 4), (8, 4096, 0, 8), (1, 16384, 0, 8),
        (1, 4096, 4096, 4), (4, 2048, 6144, 8), (2, 8192, 8192, 4),
    ]
    if quick:
        cases = [(1, 8192, 0, 4), (1, 4096, 4096, 4), (4, 2048, 0, 4)]
    for (n, L, P, HK) in cases:
        T = n * L
        q = torch.randn(T, HQ, D, device="cuda", dtype=dt)
        k = torch.randn(T, HK, D, device="cuda", dtype=dt)
        v = torch.randn(T, HK, D, device="cuda", dtype=dt)
        cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
        pl = torch.full((n,), P, device="cuda", dtype=torch.int32)
        scale = D ** -0.5
        if P:
            nblk = n * P // PAGE
            kc = torch.randn(nblk, PAGE, HK, D, device="cuda", dtype=dt)
            vc = torch.randn_like(kc)
            bt = torch.randperm(nblk, device="cuda").to(torch.int32).view(n, P // PAGE)
        else:
            kc = vc = bt = None
        flops = 4 * D * HQ * n * (L * P + L * (L + 1) / 2)

        def run(i, cfg=None):
            return flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, max_seqlen_q=L, config=cfg)

        t = time_graph(run)
        row = dict(kernel="prefill", n_seqs=n, chunk=L, prefix=P, HQ=HQ, HK=HK, D=D, dtype="bf16", time_us=t * 1e6,
                   TFLOPs=flops / t / 1e12)
        row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_bf16_TFLOPs"]
        # baseline: batched SDPA over [n, HQ, L(+P), D] (equal lengths), K/V expanded to HQ heads
        G = HQ // HK
        qb = q.view(n, L, HQ, D).transpose(1, 2).contiguous()
        kk, vv = k.view(n, L, HK, D), v.view(n, L, HK, D)
        if P:
            kpre = kc[bt.long()].reshape(n, P, HK, D)
            vpre = vc[bt.long()].reshape(n, P, HK, D)
            kk, vv = torch.cat([kpre, kk], 1), torch.cat([vpre, vv], 1)
        kb = kk.repeat_interleave(G, dim=2).transpose(1, 2).contiguous()
        vb = vv.repeat_interleave(G, dim=2).transpose(1, 2).contiguous()
        del kk, vv
        if P:
            mask = causal_lower_right(L, L + P)
            best, res = _sdpa_best(lambda: time_graph(lambda i: F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, scale=scale)))
        else:
            best, res = _sdpa_best(lambda: time_graph(lambda i: F.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, scale=scale)))
        row["sdpa_us"] = {kk_: (vv_ * 1e6 if isinstance(vv_, float) else vv_) for kk_, vv_ in res.items()}
        if best is not None:
            row["sdpa_best"] = best
            row["vs_sdpa"] = res[best] / t
        if sweep and (n, L, P) in ((1, 8192, 0), (1, 4096, 4096), (4, 2048, 0)):
            row["sweep"] = []
            for cfg in (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=False),
                        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=False),
                        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=True),
                        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=True),
                        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True),
                        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, USE_TMA=True),
                        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, USE_TMA=True)):
                try:
                    ts = time_graph(lambda i: run(i, dict(cfg)))
                    row["sweep"].append(dict(cfg=cfg, time_us=ts * 1e6, TFLOPs=flops / ts / 1e12))
                except Exception as e:  # noqa: BLE001
                    row["sweep"].append(dict(cfg=cfg, error=repr(e)[:200]))
                log(f"   sweep {row['sweep'][-1]}")
        rows.append(row)
        log(fmt_row(row))
        del q, k, v, kc, vc, qb, kb, vb
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- fused MoE

def bench_moe(ceil, quick, sweep, log):
    from kernels.fused_moe import fused_moe, fused_moe_ref, grouped_mm_moe

    rows = []
    dt = torch.bfloat16
    models = [("qwen3-30b-a3b", 128, 8, 2048, 768), ("mixtral-8x7b", 8, 2, 4096, 14336)]
    Ts = [16, 128, 1024, 8192, 32768] if not quick else [128, 8192]
    for name, E, K, H, I in models:
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=dt) * H ** -0.5
        w2 = torch.randn(E, H, I, device="cuda", dtype=dt) * I ** -0.5
        for T in Ts:
            x = torch.randn(T, H, device="cuda", dtype=dt)
            logits = torch.randn(T, E, device="cuda")
            wts, ids = torch.softmax(logits, -1).topk(K, dim=-1)
            wts = (wts / wts.sum(-1, keepdim=True)).contiguous()
            ids = ids.to(torch.int32).contiguous()
            used = int(torch.unique(ids).numel())
            flops = 6 * T * K * H * I
            wbytes = used * 3 * H * I * 2
            t = time_graph(lambda i: fused_moe(x, w13, w2, ids, wts))
            row = dict(kernel="fused_moe", model=name, T=T, E=E, K=K, H=H, I=I, dtype="bf16", experts_used=used,
                       time_us=t * 1e6, TFLOPs=flops / t / 1e12, weight_GBps=wbytes / t / 1e9)
            row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_bf16_TFLOPs"]
            row["frac_copy"] = row["weight_GBps"] / ceil["copy_GBps"]
            if hasattr(torch, "_grouped_mm"):
                try:
                    tg = time_graph(lambda i: grouped_mm_moe(x, w13, w2, ids, wts))
                    row["grouped_mm_us"] = tg * 1e6
                    row["vs_grouped_mm"] = tg / t
                except Exception as e:  # noqa: BLE001
                    row["grouped_mm_error"] = repr(e)[:200]
            if T <= 8192:
                try:
                    tl_ = time_eager(lambda: fused_moe_ref(x, w13, w2, ids, wts))
                    row["loop_us"] = tl_ * 1e6
                    row["vs_loop"] = tl_ / t
                except Exception as e:  # noqa: BLE001
                    row["loop_error"] = repr(e)[:200]
            if sweep and T in (128, 8192):
                row["sweep"] = []
                if T <= 128:
                    base = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
                    cfgs = (base, dict(base, BLOCK_N=128, BLOCK_K=64), dict(base, down=dict(BLOCK_N=32)),
                            dict(base, BLOCK_K=64, num_stages=5), dict(base, BLOCK_N=32),
                            dict(base, BLOCK_M=64, num_stages=3), dict(base, down=dict(BLOCK_N=128, BLOCK_K=64)),
                            dict(base, BLOCK_M=16, BLOCK_N=128, num_stages=3))
                else:
                    base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
                    cfgs = (base, dict(base, down=dict(BLOCK_N=256, num_stages=3)), dict(base, GROUP_M=16),
                            dict(base, BLOCK_K=128, num_stages=2),
                            dict(base, down=dict(BLOCK_K=128, num_stages=3)),
                            dict(base, down=dict(BLOCK_N=256, BLOCK_K=64, num_stages=4)),
                            dict(base, num_stages=3))
                for cfg in cfgs:
                    try:
                        ts = time_graph(lambda i: fused_moe(x, w13, w2, ids, wts, config=dict(cfg)))
                        row["sweep"].append(dict(cfg=cfg, time_us=ts * 1e6, TFLOPs=flops / ts / 1e12,
                                                 weight_GBps=wbytes / ts / 1e9))
                    except Exception as e:  # noqa: BLE001
                        row["sweep"].append(dict(cfg=cfg, error=repr(e)[:200]))
                    log(f"   sweep {row['sweep'][-1]}")
            rows.append(row)
            log(fmt_row(row))
            del x
            torch.cuda.empty_cache()
        del w13, w2
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report

def fmt_row(r) -> str:
    if r["kernel"] == "decode":
        base = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else "-"
        return (f"decode  HK={r['HK']} B={r['B']:>3} ctx={r['ctx']:>5} splits={r['splits']:>3} {r['time_us']:9.1f} us "
                f"{r['GBps']:7.0f} GB/s {100 * r['frac_copy']:5.1f}% copy  vs SDPA {base}")
    if r["kernel"] == "prefill":
        base = f"{r['vs_sdpa']:.2f}x ({r.get('sdpa_best')})" if "vs_sdpa" in r else "-"
        return (f"prefill HK={r['HK']} {r['n_seqs']}x{r['chunk']:>5} prefix={r['prefix']:>5} {r['time_us']:9.1f} us "
                f"{r['TFLOPs']:6.1f} TF/s {100 * r['frac_matmul']:5.1f}% mm  vs SDPA {base}")
    gm = f"{r['vs_grouped_mm']:.2f}x" if "vs_grouped_mm" in r else "-"
    lp = f"{r['vs_loop']:.2f}x" if "vs_loop" in r else "-"
    return (f"moe {r['model']:<14} T={r['T']:>5} {r['time_us']:9.1f} us {r['TFLOPs']:6.1f} TF/s "
            f"{100 * r['frac_matmul']:5.1f}% mm  wt {r['weight_GBps']:6.0f} GB/s {100 * r['frac_copy']:5.1f}% copy  "
            f"vs grouped_mm {gm}  vs loop {lp}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time tile-config variants at a few shapes")
    ap.add_argument("--only", default="decode,prefill,moe")
    args = ap.parse_args()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "-C", _ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=props.name,
               sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__, commit=commit)
    res["ceilings"] = ceil = ceilings()
    log(f"device {props.name}  copy {ceil['copy_GBps']:.0f} GB/s  bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TF/s")
    res["rows"] = []
    for part, fn in (("decode", bench_decode), ("prefill", bench_prefill), ("moe", bench_moe)):
        if part not in args.only.split(","):
            continue
        try:
            res["rows"] += fn(ceil, args.quick, args.sweep, log)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log(f"{part} FAILED: {tb[-1500:]}")
            res.setdefault("errors", []).append({part: tb})
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\n==== summary ====")
    print(f"device {props.name}  copy {ceil['copy_GBps']:.0f} GB/s  bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TF/s")
    for r in res["rows"]:
        print(fmt_row(r))


if __name__ == "__main__":
    main()
