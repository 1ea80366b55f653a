"""Prefill attention of whole prompts as the engine calls it: paged-prefix path (cache given, prefix 0)
against the no-prefix path (cache None, tuned tiles), Qwen3-30B-A3B heads (32 / 4, head_dim 128), bf16.

    python3 launch/prefill_attn_ab.py --out $OUT/prefill_attn_ab.json

For each (sequences x prompt length) of a 8192-token step: both paths' time (triton do_bench, median),
causal TFLOP/s, and whether the outputs agree (max abs difference)."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import kernels  # noqa: E402


def case(nseq: int, length: int, hq=32, hk=4, d=128, page=16) -> dict:
    dev, dt = "cuda", torch.bfloat16
    T = nseq * length
    q = torch.randn(T, hq, d, device=dev, dtype=dt)
    k = torch.randn(T, hk, d, device=dev, dtype=dt)
    v = torch.randn(T, hk, d, device=dev, dtype=dt)
    cu = torch.arange(0, T + 1, length, device=dev, dtype=torch.int32)
    prefix = torch.zeros(nseq, device=dev, dtype=torch.int32)
    pages = -(-length // page)
    kc = torch.zeros(nseq * pages, page, hk, d, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    bt = torch.arange(nseq * pages, device=dev, dtype=torch.int32).view(nseq, pages)
    scale = d ** -0.5
    paged = lambda: kernels.flash_attention(q, k, v, cu, kc, vc, bt, prefix, scale, max_seqlen_q=length)  # noqa: E731
    plain = lambda: kernels.flash_attention(q, k, v, cu, None, None, None, prefix, scale, max_seqlen_q=length)  # noqa: E731
    diff = (paged().float() - plain().float()).abs().max().item()
    flops = nseq * 4 * hq * d * length * length / 2  # causal half of QK^T and PV
    r = dict(sequences=nseq, length=length, max_abs_diff=diff)
    for name, fn in (("paged_prefix_path", paged), ("no_prefix_path", plain)):
        us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        r[name] = dict(us=us, TFLOPs=flops / us / 1e6)
    r["speedup"] = r["paged_prefix_path"]["us"] / r["no_prefix_path"]["us"]
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for nseq, length in ((16, 512), (8, 1024), (4, 2048), (2, 4096), (1, 8192)):
        rows.append(case(nseq, length))
        r = rows[-1]
        print(f"{nseq} x {length}: paged-prefix path {r['paged_prefix_path']['us']:.0f} us "
              f"({r['paged_prefix_path']['TFLOPs']:.0f} TFLOP/s), no-prefix path {r['no_prefix_path']['us']:.0f} us "
              f"({r['no_prefix_path']['TFLOPs']:.0f} TFLOP/s), {r['speedup']:.2f}x, max |diff| {r['max_abs_diff']:.2e}",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
