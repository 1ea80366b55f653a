"""Profiles built from formulas instead of measurements.

* Tests: :func:`synthetic_profile` with simple functions (constants, straight lines) gives a
  profile whose every prediction has a known answer.
* Estimates: :func:`h200_estimate` fills the same tables from rooflines whose rates come from
  numbers recorded in this repository (DESIGN.md, docs/benchmarks/*), for planning before a
  measured profile exists. Its ``kind`` is ``synthetic`` and every rate names its source.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Callable

from afsplit.planner.fitting import touched_experts
from afsplit.planner.profile_data import DEFAULT_ASSUMED, FORMAT
from afsplit.planner.shapes import ModelShape

DECODE_BATCH = [1, 8, 32, 64, 128, 256, 512]
DECODE_CONTEXT = [128, 512, 2048, 8192]
MOE_PAIRS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
HEAD_BATCH = [1, 8, 64, 256, 512]
PREFILL_CHUNKS = [(128, 1), (512, 1), (512, 8), (2048, 1), (2048, 4), (8192, 1)]  # (prompt length, prompts)
GEMM_TOKENS = [1, 16, 128, 1024, 8192]


def moe_slot_grid(num_experts: int) -> list[int]:
    """Experts per rank to profile: E, E/2, ... down to 1 (at most 8 values)."""
    out, s = [], num_experts
    while s >= 1 and len(out) < 8:
        out.append(s)
        s //= 2
    return sorted(set(out + [1]))


def prefill_point(prompt_len: int, prompts: int) -> dict:
    """A prefill chunk of `prompts` whole prompts: tokens, attention pairs (s2) and KV tokens read."""
    n = prompt_len
    return {"tokens": n * prompts, "prompt_len": n, "s2": prompts * n * (n + 1) / 2, "kv_tokens": n * prompts}


def synthetic_profile(shape: ModelShape, *, attention_ms: Callable, moe_ms: Callable, head_ms: Callable,
                      prefill_ms: Callable, gemm_ms: Callable, links: dict, system: dict | None = None,
                      balancer: dict | None = None, gpu_memory_gb: float = 150.0, assumed: dict | None = None,
                      device: str = "synthetic", note: str = "") -> dict:
    """A profile whose tables are the given functions on the standard grids (times in ms).

    attention_ms(b, ctx), moe_ms(slots, pairs), head_ms(b), prefill_ms(point dict), gemm_ms(weight_bytes, flops)."""
    slots = moe_slot_grid(shape.num_experts)
    gemm_pts = []
    for t in GEMM_TOKENS:
        for w in (shape.attention_layer_weight_bytes, shape.head_bytes):
            gemm_pts.append({"tokens": t, "weight_bytes": w, "flops": 2.0 * t * w / shape.itemsize})
    for p in gemm_pts:
        p["ms"] = gemm_ms(p["weight_bytes"], p["flops"])
    pre = [prefill_point(n, k) for n, k in PREFILL_CHUNKS]
    for p in pre:
        p["ms"] = prefill_ms(p)
    return {
        "format": FORMAT, "kind": "synthetic", "device": device, "gpu_memory_gb": gpu_memory_gb,
        "date": dt.date.today().isoformat(), "commit": "", "note": note,
        "model": {**asdict(shape), "signature": shape.signature()},
        "attention_decode": {"batch": DECODE_BATCH, "context": DECODE_CONTEXT,
                             "ms": [[attention_ms(b, c) for c in DECODE_CONTEXT] for b in DECODE_BATCH]},
        "attention_prefill": {"points": pre},
        "head": {"batch": HEAD_BATCH, "ms": [head_ms(b) for b in HEAD_BATCH]},
        "moe": {"experts_per_rank": slots, "pairs": MOE_PAIRS, "ms": [[moe_ms(s, n) for n in MOE_PAIRS] for s in slots]},
        "gemm": {"points": gemm_pts},
        "links": links,
        "system": system or {},
        "balancer": balancer or {"expert_ranks": [1], "max_over_mean": [1.0], "source": "none"},
        "assumed": {**DEFAULT_ASSUMED, **(assumed or {})},
    }


# ----------------------------------------------------------------------------------------------
# An H200 estimate from recorded numbers

H200 = {
    # DESIGN.md, measured on 1 H200 2026-12-02 (kernels/bench.py ceilings)
    "read_GBps": 4152.0, "matmul_TFLOPs": 776.0,
    # DESIGN.md targets table, same date: paged decode 0.64-0.92 of read BW; fused MoE <= 128 tokens 0.73-0.75
    "decode_attention_frac": 0.78, "moe_small_frac": 0.74,
    # docs/benchmarks/kernels-h200.md: Qwen3 experts at 8192 tokens, down GEMM BN256: 401 TFLOP/s
    "moe_TFLOPs": 400.0,
    # DESIGN.md: prefill 0.63-0.79x cuDNN SDPA; kernels-h200.md: SDPA cuDNN 618 TFLOP/s at 8k
    "prefill_TFLOPs": 0.71 * 618.0,
    # assumed: dense GEMMs reach 85% of read BW at small batch and 75% of the matmul rate at large
    "gemm_frac_bw": 0.85, "gemm_frac_flops": 0.75, "gemm_c_us": 5.0,
    # derived: per-layer fixed cost that makes the 64-sequence Qwen3 decode layer (~0.45-0.49 ms per layer,
    # runtime-h200x2-graphs.md) come out of the rates above
    "attention_c_us": 50.0, "moe_c_us": 20.0, "prefill_c_us": 60.0,
    # nvidia-smi on the H200 machines: 143771 MiB
    "gpu_memory_gb": 143771 * 2**20 / 1e9,
    # DESIGN.md: NVLink all_to_all 361 GB/s (4x H200, 64 MiB); latency assumed 3 us
    "nvlink_GBps": 361.0, "nvlink_alpha_us": 3.0,
    # assumed host costs per step (engine) and per exchange call; 0.18 ms = one graphed NCCL collective
    # measured in e2e-h200x2-graphs.md (old exchange); the redesign targets tens of microseconds
    "engine_overhead_ms": 1.5, "engine_overhead_per_seq_us": 8.0, "runtime_extra_ms": 0.5,
    "exchange_call_ms": 0.05, "eager_layer_ms": 0.9,
}

# balancer-h100.json, Zipf 1.0, 4096 tokens x top-8 over 128 experts: max/mean expert-rank load with
# least-loaded selection over replicas (32 spare slots in all: a quarter of the experts again), and
# round robin without replicas
BALANCER_MEASURED = {"expert_ranks": [1, 4, 8, 16], "max_over_mean": [1.0, 1.0001, 1.0007, 1.0029],
                     "round_robin": [1.0, 1.0543, 1.4197, 2.1333], "spare_fraction": 0.25,
                     "source": "docs/benchmarks/balancer-h100.json (Zipf 1.0; least_loaded with replicas, round_robin)"}


def h200_estimate(shape: ModelShape, inter_gbps: float = 400.0, inter_latency_us: float = 5.0,
                  overrides: dict | None = None) -> dict:
    """An H200 profile for `shape` from the rates in :data:`H200` (see each entry's source)."""
    hw = {**H200, **(overrides or {})}
    bw, mm = hw["read_GBps"] * 1e9, hw["matmul_TFLOPs"] * 1e12
    g_bw, g_fl, g_c = bw * hw["gemm_frac_bw"], mm * hw["gemm_frac_flops"], hw["gemm_c_us"] * 1e-6

    def gemm_s(nbytes, flops):
        return g_c + max(nbytes / g_bw, flops / g_fl)

    kv_bw = bw * hw["decode_attention_frac"]
    pf_rate = hw["prefill_TFLOPs"] * 1e12

    def attention_ms(b, ctx):
        gemm = gemm_s(shape.attention_layer_weight_bytes, shape.attention_gemm_flops(b))
        attn = max(b * ctx * shape.kv_bytes_per_token_layer / kv_bw, b * ctx * shape.attn_flops_per_pair_decode / pf_rate)
        return 1e3 * (hw["attention_c_us"] * 1e-6 + gemm + attn)

    def prefill_ms(p):
        gemm = gemm_s(shape.attention_layer_weight_bytes, shape.attention_gemm_flops(p["tokens"]))
        return 1e3 * (hw["prefill_c_us"] * 1e-6 + gemm + p["s2"] * shape.attn_flops_per_pair_prefill / pf_rate)

    moe_bw, moe_fl = bw * hw["moe_small_frac"], hw["moe_TFLOPs"] * 1e12

    def moe_ms(slots, pairs):
        t = max(touched_experts(slots, pairs) * shape.expert_bytes / moe_bw, shape.expert_flops(pairs) / moe_fl)
        return 1e3 * (hw["moe_c_us"] * 1e-6 + t)

    def head_ms(b):
        return 1e3 * gemm_s(shape.head_bytes, 2.0 * b * shape.head_bytes / shape.itemsize)

    batches = [1, 8, 64, 256, 512]
    eng = [hw["engine_overhead_ms"] + hw["engine_overhead_per_seq_us"] * 1e-3 * b for b in batches]
    system = {
        "engine": {"batch": batches, "step_overhead_ms": eng, "layer_scale": [1.0] * len(batches),
                   "eager_layer_ms": hw["eager_layer_ms"]},
        "runtime": {"batch": batches, "step_overhead_ms": [e + hw["runtime_extra_ms"] for e in eng],
                    "exchange_call_ms": [hw["exchange_call_ms"]] * len(batches)},
        "source": "assumed (see afsplit/planner/synthetic.py H200)",
    }
    links = {"intra": {"alpha_us": hw["nvlink_alpha_us"], "GBps": hw["nvlink_GBps"], "source": "DESIGN.md all_to_all"},
             "inter": {"alpha_us": inter_latency_us, "GBps": inter_gbps / 8, "source": "assumed (plan flags)"}}
    return synthetic_profile(shape, attention_ms=attention_ms, moe_ms=moe_ms, head_ms=head_ms, prefill_ms=prefill_ms,
                             gemm_ms=lambda w, f: 1e3 * gemm_s(w, f), links=links, system=system,
                             balancer=BALANCER_MEASURED, gpu_memory_gb=hw["gpu_memory_gb"],
                             device="NVIDIA H200 (estimate from recorded rates)",
                             note="synthetic: rooflines with rates recorded in DESIGN.md and docs/benchmarks; "
                                  "replace with `afsplit profile` output")


def main(argv=None) -> int:
    """python -m afsplit.planner.synthetic --model MODEL --out P.json: write the H200 estimate for MODEL."""
    import argparse
    import json

    from afsplit.planner.shapes import resolve_shape

    ap = argparse.ArgumentParser(description="Write an H200 profile estimated from recorded rates (kind: synthetic).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.out, "w") as f:
        json.dump(h200_estimate(resolve_shape(args.model)), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
