"""Tuning sweep: time candidate configs per shape on this GPU and write its tuning table.

    PYTHONUNBUFFERED=1 python3 kernels/tune.py --out kernels/tuning/nvidia-h200.json \
        [--only decode,prefill,moe] [--budget-s 240] [--quick]

For every shape (the goal shapes of kernels/bench.py plus a few neighbours) the candidates below
are run on the same random inputs; a candidate counts only if its output matches the heuristic
config's output (finite, relative Frobenius error < 1e-2, the bf16 tolerance), then it is timed
as kernels/bench.py times (CUDA graph, median of replays). The fastest becomes the table entry
(kernels/_tuning.py format); every candidate's time or error is kept in the entry ("candidates")
so the choice can be read back. The file is rewritten after every shape, so a run cut short
still leaves a usable table; kernels the run did not tune keep the entries already in the file.

Search per kernel (coordinate descent, to keep compiles few):
  decode:  tile configs (BLOCK_N, warps, stages, block-table prefetch) at the heuristic split
           count, then split counts for the two best tiles;
  prefill: tile configs (BLOCK_M/N, warps, stages, TMA, warp specialisation), and TMA tiles with
           the knobs head-major order (HEADS_FIRST), q in registers (Q_REG), polynomial exp2 (POLY_EXP);
  moe:     per candidate BLOCK_M, the gate+up GEMM tiles (weights and pre-gathered activations
           through TMA among them) with the down GEMM at its default, then the down GEMM tiles
           with the best gate+up.
--prefill-prefix and --moe-models restrict the shapes by exact-key group (a kernel that is tuned
gets a fresh table, so shapes outside the groups fall back to the heuristics, not to a neighbour).
The budget is shared 25 / 35 / 40 % between the three; shapes left when a part's time is up are
skipped (logged), candidates left when it runs out mid-shape are skipped (the best so far counts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # never let kernels/ shadow the package
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from kernels import _tuning, bench  # noqa: E402
from kernels._util import sm_count  # noqa: E402

TOL = 1e-2

DECODE_TILES = [  # BLOCK_N, num_warps, num_stages, PREFETCH (stages count differently with prefetch: see NOTES)
    (64, 4, 3, False), (64, 4, 5, False), (32, 4, 5, False), (128, 4, 5, False),
    (64, 4, 3, True), (64, 4, 4, True), (32, 4, 4, True), (32, 4, 6, True), (128, 4, 3, True), (64, 8, 4, True),
]
DECODE_EXTRA = [(1, 8192, 32, 8), (64, 1024, 32, 4), (8, 8192, 32, 4)]

PREFILL_TILES = [  # BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, WARP_SPEC (+ POLY_EXP, HEADS_FIRST below)
    (64, 64, 4, 3, True, False), (128, 128, 8, 3, True, False), (128, 64, 4, 3, True, False),
    (128, 128, 8, 2, True, False), (128, 128, 8, 4, True, False), (64, 64, 4, 4, True, False),
    (128, 64, 8, 3, True, False), (128, 128, 8, 3, True, True), (128, 64, 4, 3, True, True),
    (128, 128, 8, 3, False, False),
]
# issue 15 knobs on TMA tiles (kernels/NOTES.md, history 7): (tile, HEADS_FIRST, Q_REG, POLY_EXP)
PREFILL_KNOBS = [((64, 64, 4, 3, True, False), True, False, False), ((128, 128, 8, 3, True, False), True, False, False),
                 ((128, 64, 8, 3, True, False), True, False, False)]
PREFILL_KNOBS += [((bm, bn, w, st, True, False), hf, True, False) for (bm, bn, w, st) in
                  ((64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3)) for hf in (False, True)]
PREFILL_KNOBS += [((64, 64, 4, 3, True, False), True, True, True), ((128, 128, 8, 3, True, False), True, False, True)]
# 64x64 tiles, 2 stages, q in registers: 66 KB of shared memory, so a register cap of 168 (ptxas: 20 bytes
# of spills) lets 3 programs share an SM instead of 2
PREFILL_MORE = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=True, WARP_SPEC=False,
                     HEADS_FIRST=True, Q_REG=True, maxnreg=168)]
PREFILL_EXTRA = [(4, 1024, 0, 32, 4), (1, 2048, 0, 32, 4), (1, 1024, 3072, 32, 4)]

MOE_GATE_UP = {  # BLOCK_M -> [(BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, W_TMA)]
    16: [(64, 128, 1, 4, 4, False), (64, 128, 1, 4, 5, False), (128, 128, 1, 4, 3, False), (32, 256, 1, 4, 4, False),
         (64, 256, 1, 4, 3, False), (128, 64, 1, 4, 5, False), (64, 128, 1, 4, 4, True), (128, 128, 1, 4, 3, True),
         (64, 256, 1, 4, 3, True)],
    64: [(64, 128, 1, 4, 3, False), (128, 64, 8, 4, 4, False), (64, 128, 1, 4, 4, True), (128, 64, 8, 4, 4, True),
         (128, 128, 8, 8, 3, False), (128, 64, 8, 4, 4, True, True)],
    # a 7th field: A_TMA (x rows pre-gathered into sorted order, loaded through TMA; needs W_TMA)
    128: [(128, 64, 8, 8, 4, False), (128, 64, 8, 8, 3, False), (128, 64, 16, 8, 4, False), (128, 64, 8, 8, 4, True),
          (128, 64, 8, 8, 3, True), (64, 64, 8, 4, 4, True), (128, 64, 8, 8, 4, True, True),
          (128, 64, 8, 8, 3, True, True), (128, 64, 16, 8, 4, True, True), (128, 64, 4, 8, 4, True, True),
          (128, 128, 8, 8, 2, True, True), (64, 64, 8, 4, 4, True, True)],
}
MOE_GATE_UP[32] = MOE_GATE_UP[16]
MOE_DOWN = {
    16: [(64, 128, 1, 4, 4, False), (32, 128, 1, 4, 4, False), (128, 64, 1, 4, 4, False), (64, 256, 1, 4, 3, False),
         (32, 256, 1, 4, 3, False), (64, 128, 1, 4, 4, True), (128, 128, 1, 4, 3, True)],
    64: [(128, 64, 8, 4, 4, False), (64, 128, 1, 4, 3, False), (128, 64, 8, 4, 4, True), (256, 64, 8, 8, 3, False)],
    128: [(256, 64, 8, 8, 4, False), (256, 64, 8, 8, 3, False), (128, 64, 8, 8, 4, False), (256, 64, 8, 8, 3, True),
          (256, 64, 8, 8, 4, True), (128, 128, 8, 8, 3, True), (256, 64, 16, 8, 4, True), (256, 64, 4, 8, 4, True),
          (256, 128, 8, 8, 2, True), (128, 64, 8, 8, 4, True)],
}
MOE_DOWN[32] = MOE_DOWN[16]
MOE_EXTRA = [("qwen3-30b-a3b", T) for T in (32, 256, 1024, 2048)] + [("mixtral-8x7b", T) for T in (16, 1024)]


def moe_block_ms(T: int, K: int, E: int) -> list[int]:
    avg = T * K / E
    if avg <= 4:
        return [16]
    if avg <= 16:
        return [16, 32]
    if avg <= 48:
        return [32, 64]
    if avg <= 256:
        return [64, 128]
    return [128, 64]


def _tile(names, values) -> dict:
    return dict(zip(names, values))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.float(), ref.float()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


class Deadline:
    def __init__(self, t_end: float):
        self.t_end = t_end

    def over(self) -> bool:
        return time.time() > self.t_end


class Mode:
    """compile_only: run each candidate once, no timing and no table (fills Triton's on-disk cache).
    With shards, a config goes to shard crc32(config) % shards whatever the shape (a split count only
    matters as one vs several), so each kernel variant is compiled by one process while the others
    compile other variants; shard 0 also runs the heuristic configs (the reference outputs)."""

    compile_only = False
    shard = 0
    shards = 1


class Select:
    """Which shapes to tune (a partial table would hand its nearest entry to every shape with the same
    exact key, so a subset is chosen by exact-key groups only): prefill 'all' / 'none' (no prefix) /
    'only' (with prefix); MoE models by name (empty: all)."""

    prefill_prefix = "all"
    moe_models: tuple = ()


def mine(cfg: dict) -> bool:
    if not Mode.compile_only:
        return True
    if "num_splits" in cfg:
        cfg = dict(cfg, num_splits=min(cfg["num_splits"], 2))
    return zlib.crc32(json.dumps(cfg, sort_keys=True).encode()) % Mode.shards == Mode.shard


def reference(fn):
    """The heuristic config's output (what candidates are checked against); None in compile-only shards
    other than 0."""
    if Mode.compile_only and Mode.shard != 0:
        return None
    return fn()


def try_candidates(run, cands, ref, deadline, log, label):
    """Run + check + time each candidate config (run(cfg) -> output). Returns [results], best index."""
    results, best = [], None
    for cfg in cands:
        if not mine(cfg):
            continue
        if deadline.over():
            results.append(dict(config=cfg, skipped="budget"))
            continue
        r = dict(config=cfg)
        try:
            out = run(cfg)
            bench.sync()
            err = 0.0 if ref is None else rel_err(out, ref)
            if err >= TOL:
                r["error"] = f"wrong result: rel err {err:.3g} vs the heuristic config"
            elif Mode.compile_only:
                r["rel_err"] = err
            else:
                r["rel_err"] = err
                r["time_us"] = bench.time_graph(lambda i: run(cfg)) * 1e6
        except Exception as e:  # noqa: BLE001
            r["error"] = repr(e)[:240]
        results.append(r)
        if "time_us" in r and (best is None or r["time_us"] < results[best]["time_us"]):
            best = len(results) - 1
        done = f"{r['time_us']:.1f} us" if "time_us" in r else r.get("error", f"ok (rel err {r.get('rel_err', 0):.2g})")
        log(f"   {label} {cfg}: {done}")
    return results, best


def time_default(fn) -> float:
    return math.nan if Mode.compile_only else bench.time_graph(lambda i: fn()) * 1e6


# ----------------------------------------------------------------------------- decode

def tune_decode(deadline, quick, log):
    from kernels.paged_decode_attention import decode_num_splits, paged_decode_attention, tuning_key

    shapes = bench.DECODE_SHAPES + ([] if quick else DECODE_EXTRA)
    if quick:
        shapes = [(64, 8192, 32, 4), (16, 32768, 32, 4)]
    names = ("BLOCK_N", "num_warps", "num_stages", "PREFETCH")
    sms = sm_count(torch.device(bench.DEVICE))
    D, PAGE = 128, 16
    for (B, ctx, HQ, HK) in shapes:
        if deadline.over():
            log(f"decode: budget spent, skipping B={B} ctx={ctx} {HQ}/{HK} and later shapes")
            return
        kc, vc, bts, qs, sl = bench.decode_inputs(B, ctx, HQ, HK, D, PAGE)
        q, bt, scale = qs[0], bts[0], D ** -0.5
        default_splits = decode_num_splits(B, HK, ctx, sms, 64)

        def run(c):
            c = dict(c)
            ns = c.pop("num_splits")
            return paged_decode_attention(q, kc, vc, bt, sl, scale, config=c, num_splits=ns)

        ref = reference(lambda: paged_decode_attention(q, kc, vc, bt, sl, scale))
        t_def = time_default(lambda: paged_decode_attention(q, kc, vc, bt, sl, scale))
        label = f"decode B={B} ctx={ctx} {HQ}/{HK}"
        cands = [dict(_tile(names, t), num_splits=default_splits) for t in DECODE_TILES]
        res, _ = try_candidates(run, cands, ref, deadline, log, label)
        timed = sorted((r for r in res if "time_us" in r), key=lambda r: r["time_us"])[:2]
        splits = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, default_splits) if ctx // s >= 128})
        cands2 = [dict(r["config"], num_splits=s) for r in timed for s in splits if s != default_splits]
        if Mode.compile_only:  # one split and several: both kernel variants of every tile
            cands2 = [dict(c, num_splits=s) for c in cands for s in (1, 2) if s != default_splits]
        res2, _ = try_candidates(run, cands2, ref, deadline, log, label)
        allr = [r for r in res + res2 if "time_us" in r]
        if not allr:
            log(f"{label}: no candidate ran")
            continue
        best = min(allr, key=lambda r: r["time_us"])
        key = dict(tuning_key(HQ // HK, HK, D, PAGE, torch.bfloat16, False), B=B, L=ctx)
        yield dict(key=key, config=best["config"], time_us=best["time_us"], default_us=t_def,
                   GBps=2 * B * ctx * HK * D * 2 / best["time_us"] / 1e3, candidates=res + res2)
        log(f"{label}: best {best['config']} {best['time_us']:.1f} us (heuristic {t_def:.1f} us)")
        del kc, vc
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- prefill

def tune_prefill(deadline, quick, log):
    from kernels.flash_attention import flash_attention, tuning_key

    shapes = bench.PREFILL_SHAPES + ([] if quick else PREFILL_EXTRA)
    if quick:
        shapes = [(1, 8192, 0, 32, 4), (1, 4096, 4096, 32, 4)]
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "WARP_SPEC")
    D = 128
    cands = [_tile(names, t) for t in PREFILL_TILES]
    cands += [dict(_tile(names, t), HEADS_FIRST=hf, Q_REG=qr, POLY_EXP=pe) for t, hf, qr, pe in PREFILL_KNOBS]
    cands += [dict(c) for c in PREFILL_MORE]
    if Select.prefill_prefix != "all":
        shapes = [s_ for s_ in shapes if (s_[2] > 0) == (Select.prefill_prefix == "only")]
    for (n, L, P, HQ, HK) in shapes:
        if deadline.over():
            log(f"prefill: budget spent, skipping {n}x{L} prefix {P} {HQ}/{HK} and later shapes")
            return
        q, k, v, cu, pl, kc, vc, bt = bench.prefill_inputs(n, L, P, HQ, HK, D)
        scale = D ** -0.5

        def run(c):
            return flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, max_seqlen_q=L, config=dict(c))

        ref = reference(lambda: flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, max_seqlen_q=L))
        t_def = time_default(lambda: flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, max_seqlen_q=L))
        label = f"prefill {n}x{L} prefix {P} {HQ}/{HK}"
        res, best = try_candidates(run, cands, ref, deadline, log, label)
        if best is None:
            log(f"{label}: no candidate ran")
            continue
        b = res[best]
        flops = bench.prefill_flops(n, L, P, HQ, D)
        key = dict(tuning_key(D, torch.bfloat16, P > 0, False), L=L, G=HQ // HK)
        yield dict(key=key, config=b["config"], time_us=b["time_us"], default_us=t_def,
                   TFLOPs=flops / b["time_us"] / 1e6, candidates=res)
        log(f"{label}: best {b['config']} {b['time_us']:.1f} us (heuristic {t_def:.1f} us)")
        del q, k, v, kc, vc
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- fused MoE

def tune_moe(deadline, quick, log):
    from kernels.fused_moe import fused_moe, tuning_key

    shapes = bench.MOE_SHAPES + ([] if quick else MOE_EXTRA)
    if quick:
        shapes = [("qwen3-30b-a3b", 128), ("mixtral-8x7b", 8192)]
    if Select.moe_models:
        shapes = [s_ for s_ in shapes if s_[0] in Select.moe_models]
    shapes = sorted(shapes, key=lambda s: s[0])  # weights made once per model
    gnames = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "W_TMA", "A_TMA")
    weights = {}
    for name, T in shapes:
        if deadline.over():
            log(f"moe: budget spent, skipping {name} T={T} and later shapes")
            return
        E, K, H, I = bench.MOE_MODELS[name]
        if name not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[name] = bench.moe_weights(E, H, I)
        w13, w2 = weights[name]
        x, ids, wts = bench.moe_tokens(E, K, H, T, seed=T)

        def run(c):
            return fused_moe(x, w13, w2, ids, wts, config=dict(c, down=dict(c["down"])))

        ref = reference(lambda: fused_moe(x, w13, w2, ids, wts))
        t_def = time_default(lambda: fused_moe(x, w13, w2, ids, wts))
        label = f"moe {name} T={T}"
        allres = []
        for bm in moe_block_ms(T, K, E):
            d0 = _tile(gnames, MOE_DOWN[bm][0])
            cands = [dict(_tile(gnames, g), BLOCK_M=bm, down=d0) for g in MOE_GATE_UP[bm]]
            res, best = try_candidates(run, cands, ref, deadline, log, label)
            allres += res
            if Mode.compile_only:
                best = 0  # every down tile with the first gate+up tile: all down variants compiled
            elif best is None:
                continue
            gu = {k_: v_ for k_, v_ in cands[best].items() if k_ != "down"}
            cands = [dict(gu, down=_tile(gnames, d)) for d in MOE_DOWN[bm][1:]]
            res2, _ = try_candidates(run, cands, ref, deadline, log, label)
            allres += res2
        timed = [r for r in allres if "time_us" in r]
        if not timed:
            log(f"{label}: no candidate ran")
            continue
        b = min(timed, key=lambda r: r["time_us"])
        key = dict(tuning_key(E, K, H, I, torch.bfloat16), T=T)
        yield dict(key=key, config=b["config"], time_us=b["time_us"], default_us=t_def, candidates=allres)
        log(f"{label}: best {b['config']} {b['time_us']:.1f} us (heuristic {t_def:.1f} us)")
        del x
    weights.clear()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main

KERNELS = {"decode": ("paged_decode_attention", tune_decode), "prefill": ("flash_attention", tune_prefill),
           "moe": ("fused_moe", tune_moe)}
SHARES = {"decode": 0.25, "prefill": 0.35, "moe": 0.40}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="tuning table JSON (kernels/tuning/<device slug>.json to ship it)")
    ap.add_argument("--only", default="decode,prefill,moe")
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for all parts together")
    ap.add_argument("--quick", action="store_true", help="two shapes per kernel")
    ap.add_argument("--quick-parts", default="", help="comma list of parts that use the --quick shapes")
    ap.add_argument("--md", help="also write a markdown summary of the table here")
    ap.add_argument("--compile-only", action="store_true",
                    help="run + check every candidate once (compiles them into Triton's cache), no timing, no table")
    ap.add_argument("--shard", default="0/1", help="with --compile-only: this process's share K/N of the candidates")
    ap.add_argument("--prefill-prefix", default="all", choices=("all", "none", "only"),
                    help="prefill shapes to tune: all, without a prefix only, with a prefix only")
    ap.add_argument("--moe-models", default="", help="comma list of kernels/bench.py MOE_MODELS names (default all)")
    args = ap.parse_args()
    Select.prefill_prefix = args.prefill_prefix
    Select.moe_models = tuple(m for m in args.moe_models.split(",") if m)
    Mode.compile_only = args.compile_only
    Mode.shard, Mode.shards = (int(v) for v in args.shard.split("/"))
    os.environ[_tuning.ENV] = "off"  # candidates and the heuristic baseline must not come from an old table
    _tuning.reset()

    def log(s):
        print(s, flush=True)

    info = bench.run_info()
    table = {"device": info["device"], "meta": {}, "tables": {}}
    if os.path.exists(args.out):
        try:
            with open(args.out) as f:
                old = json.load(f)
            if old.get("device") == info["device"]:
                table = old  # keep the kernels this run does not tune
        except (OSError, ValueError):
            pass
    table["meta"] = dict(info, budget_s=args.budget_s, only=args.only,
                         note="written by kernels/tune.py; entries: key (exact + near fields), config, time_us")

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)

    parts = [p for p in ("decode", "prefill", "moe") if p in args.only.split(",")]

    def quick(part):
        return args.quick or part in args.quick_parts.split(",")
    total = sum(SHARES[p] for p in parts)
    t0, acc = time.time(), 0.0
    for p in parts:
        acc += SHARES[p] / total
        deadline = Deadline(t0 + acc * args.budget_s)
        kernel, fn = KERNELS[p]
        log(f"== {'compiling' if Mode.compile_only else 'tuning'} {p} (until +{deadline.t_end - t0:.0f} s)")
        if Mode.compile_only:
            try:
                for _ in fn(deadline, quick(p), log):
                    pass
            except Exception:  # noqa: BLE001
                import traceback

                log(f"{p} FAILED: {traceback.format_exc()[-1500:]}")
            continue
        entries = table["tables"][kernel] = []
        try:
            for e in fn(deadline, quick(p), log):
                entries.append(e)
                save()
        except Exception as ex:  # noqa: BLE001
            import traceback

            log(f"{p} FAILED: {traceback.format_exc()[-1500:]}")
            table["meta"].setdefault("errors", {})[p] = repr(ex)[:500]
        save()
    if Mode.compile_only:
        log(f"compile pass (shard {args.shard}) done in {time.time() - t0:.0f} s")
        return
    log(f"tuning done in {time.time() - t0:.0f} s -> {args.out}")
    md = markdown(table)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)


def markdown(table: dict) -> str:
    """One line per entry: shape, chosen config, its time and the heuristic config's time."""
    m = table.get("meta", {})
    out = [f"Tuning table for {table.get('device')} ({m.get('date')}, commit {m.get('commit')}, Triton {m.get('triton')}):",
           "", "| kernel | shape | chosen config | time (us) | heuristic (us) | speed-up | candidates ok / run |",
           "|---|---|---|---|---|---|---|"]
    for kernel, entries in table.get("tables", {}).items():
        for e in entries:
            shape = ", ".join(f"{k}={v}" for k, v in e["key"].items() if k not in ("dtype", "window"))
            cands = e.get("candidates", [])
            ok = sum(1 for c in cands if "time_us" in c)
            ran = sum(1 for c in cands if "skipped" not in c)
            out.append(f"| {kernel} | {shape} | `{json.dumps(e['config'], separators=(',', ':'))}` | "
                       f"{e['time_us']:.1f} | {e.get('default_us', float('nan')):.1f} | "
                       f"{e.get('default_us', float('nan')) / e['time_us']:.2f}x | {ok} / {ran} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
