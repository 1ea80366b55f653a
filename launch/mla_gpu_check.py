"""DeepSeek-V2/V3 on one GPU in one go: bf16 kernel tests, MLA kernel benchmarks against ceilings measured in
the same run, bf16 tiny-model parity, and the single-GPU engine on DeepSeek-V2-Lite / V3-4-layer shapes.

    PYTHONUNBUFFERED=1 python3 launch/mla_gpu_check.py --out $OUT [--only tests,ceilings,decode,sweep,prefill,topk,parity,engine]

Sections (each writes its results into $OUT/mla_gpu_check.json as soon as it finishes; a failing section is
recorded and the others still run), about 6-8 minutes in all on one H200:

* tests    -- tests/test_mla_kernels_gpu.py (bf16 / fp16 / fp32 against float64 references) in a subprocess
* ceilings -- read bandwidth (kernels/bench.py's probe: best of sum / amax / a Triton streaming sum over 4 GiB) and the bf16 matmul rate
* decode   -- paged MLA decode (R 512 + rope 64, page 16, bf16) for Hq 16 (V2-Lite; V3 at TP 8) and 128 (V3),
              batch 1..256, context 1k..16k: GB/s, fraction of the read ceiling and of the roofline
              max(bytes / read, flops / matmul), and the ratio to a plain-torch absorbed baseline (bmm + softmax
              over contiguous latents). Goal: >= 0.85 of read bandwidth at batch 64, context 4k.
* sweep    -- decode tiles (BLOCK_H, BLOCK_N, warps, stages, block-table prefetch) at batch 64, context 4k, Hq 16 and
              128, each checked against the float64 reference first; then split counts for the fastest Hq-16 tile
* prefill  -- MLA prefill (expanded; nope 128 + rope 64, v 128): TFLOP/s vs the matmul ceiling and SDPA
* topk     -- grouped top-k (V2 160/8/3, V3 256/8/4) per call inside a CUDA graph
* parity   -- tiny DeepSeek-V2/V3 checkpoints: bf16 single-GPU engine (eager and CUDA graphs) against the fp32 CPU
              engine, judged by transformers' own bf16 error (launch/gpu_parity.py's method)
* engine   -- the single-process engine with random weights (CUDA graphs, bf16): 64 prompts of 1024 tokens,
              64 new tokens; decode step time against the floor (weights read once per step, routed experts
              counted by the expected number touched, + the latent KV cache) at the read ceiling

Writes $OUT/mla_gpu_check.json and $OUT/mla_gpu_check.md (tables ready for docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.bench import n_sets_for, time_graph  # noqa: E402

R, DR, PAGE = 512, 64, 16
L = R + DR
ENGINE_QUICK = False  # --engine-quick: only deepseek-v2-lite with CUDA graphs
SECTIONS = ("tests", "ceilings", "decode", "sweep", "prefill", "topk", "parity", "engine")


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- ceilings

def ceilings() -> dict:
    # the project's read probe (kernels/bench.py: torch sum / amax and a Triton streaming sum over 4 GiB), the
    # same ceiling every kernel report uses; this script's former 2 GiB sum / amax read 4194 GB/s where that
    # probe read 4453 on the same day (2026-12-04), which flattered every "of read" here by ~6%
    from kernels.bench import read_probes

    best, reads = read_probes(lambda s: None)
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm = 2 * m ** 3 / time_graph(lambda i: x @ y) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"read_GBps": best, "read_GBps_by_probe": reads, "matmul_bf16_TFLOPs": mm}


# ----------------------------------------------------------------------------- decode

def _decode_inputs(B, HQ, ctx, n_sets, gen):
    blocks = B * (-(-ctx // PAGE))
    sets = []
    for _ in range(n_sets):
        cache = torch.randn(blocks + 1, PAGE, 1, L, device="cuda", dtype=torch.bfloat16, generator=gen)
        bt = torch.randperm(blocks, device="cuda", generator=gen).view(B, -1).to(torch.int32)
        q = torch.randn(B, HQ, L, device="cuda", dtype=torch.bfloat16, generator=gen)
        sets.append((q, cache, bt))
    return sets, torch.full((B,), ctx, dtype=torch.int32, device="cuda")


def _decode_row(B, HQ, ctx, ceil, config=None, baseline=True, splits=None):
    from kernels.mla_decode import mla_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_bytes = B * ctx * L * 2
    nbytes = kv_bytes + B * HQ * (L + R) * 2
    n_sets = n_sets_for(nbytes)
    sets, sl = _decode_inputs(B, HQ, ctx, n_sets, gen)
    scale = 0.1352
    t = time_graph(lambda i: mla_decode(sets[i][0], sets[i][1], sets[i][2], sl, scale, R, config=config,
                                         num_splits=splits), n_sets)
    flops = 2 * B * HQ * ctx * (L + R)
    roof = max(nbytes / (ceil["read_GBps"] * 1e9), flops / (ceil["matmul_bf16_TFLOPs"] * 1e12))
    row = {"B": B, "Hq": HQ, "ctx": ctx, "us": t * 1e6, "GBps": nbytes / t / 1e9,
           "of_read": nbytes / t / 1e9 / ceil["read_GBps"], "of_roofline": roof / t, "TFLOPs": flops / t / 1e12,
           "config": config, "splits": splits or _default_splits(B, HQ, ctx, config)}
    if baseline and B * ctx * HQ * 4 <= 4e9:  # fp32 scores of the baseline must fit
        lats = [s[1][:-1].view(B, -1, L)[:, :ctx] for s in sets]  # contiguous latents (pages in order)

        def torch_absorbed(i):
            s = torch.bmm(sets[i][0], lats[i].transpose(1, 2)).float() * scale
            return torch.bmm(torch.softmax(s, -1).to(torch.bfloat16), lats[i][..., :R])

        row["torch_us"] = time_graph(torch_absorbed, n_sets) * 1e6
        row["vs_torch"] = row["torch_us"] / row["us"]
    del sets
    torch.cuda.empty_cache()
    return row


def bench_decode(ceil, quick):
    rows = []
    for HQ in (16, 128):
        for B in ((1, 64) if quick else (1, 16, 64, 128, 256)):
            for ctx in ((4096,) if quick else (1024, 4096, 16384)):
                if B * ctx > 256 * 8192:
                    continue
                rows.append(_decode_row(B, HQ, ctx, ceil))
                log("decode", json.dumps(rows[-1]))
    return rows


def _default_splits(B, HQ, ctx, config):
    """The split count mla_decode picks for this shape (what a row without `splits` ran)."""
    from kernels.mla_decode import plan

    return plan(B, HQ, R, L, ctx, torch.device("cuda"), torch.bfloat16, config)[1]


def _decode_err(HQ, cfg, splits):
    """bf16 relative error of one tile config against the float64 reference (a sweep only times configs that
    compute the right thing); raises if it is over 1e-2."""
    from kernels._testing import make_paged_cache, rel_err
    from kernels.mla_decode import mla_decode, mla_decode_ref

    g = torch.Generator().manual_seed(1)
    lens = [1, 300, 4096, 17]
    cache, _, bt = make_paged_cache(lens, PAGE, 1, L, torch.bfloat16, "cuda", g)
    q = torch.randn(len(lens), HQ, L, generator=g).to("cuda", torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = mla_decode(q, cache, bt, sl, 0.1352, R, config=cfg, num_splits=splits)
    err = rel_err(out, mla_decode_ref(q.double(), cache.double(), bt, sl, 0.1352, R))
    if not err < 1e-2:
        raise RuntimeError(f"wrong result: rel err {err:.3g}")
    return err


# (BLOCK_H, BLOCK_N, warps, stages, PREFETCH, programs per SM from the sm_90 AOT compile[, splits]); the first of
# each Hq is the kernel before issue 19's rework (tiles of 2026-12-03, its 2-wave split rule: 5 / 3 splits; only
# the grid order differs: head blocks now vary fastest)
SWEEP_TILES = {
    16: [(16, 32, 4, 2, False, 2, 5), (16, 32, 4, 3, True, 2), (16, 16, 4, 3, True, 3), (16, 32, 8, 3, True, 2),
         (16, 64, 8, 3, True, 1)],
    128: [(64, 16, 8, 2, False, 1, 3), (64, 64, 8, 2, False, 1), (64, 32, 8, 2, False, 1), (64, 32, 8, 3, False, 1),
          (64, 32, 8, 3, True, 1), (64, 16, 8, 3, True, 1)],
}
SWEEP_SPLITS = (2, 3, 6, 8)


def sweep_decode(ceil, quick):
    """Tiles at batch 64, context 4k (each with the default split rule, the pre-rework tiles with their old
    split count), then split counts for the fastest tile of each Hq."""
    rows = []

    def one(HQ, cfg, splits=None):
        try:
            err = _decode_err(HQ, cfg, splits)
            rows.append(_decode_row(64, HQ, 4096, ceil, cfg, baseline=False, splits=splits))
            rows[-1]["rel_err"] = err
        except Exception as e:  # noqa: BLE001 -- out of registers / shared memory
            rows.append({"B": 64, "Hq": HQ, "ctx": 4096, "config": cfg, "splits": splits,
                         "error": str(e).splitlines()[0][:200]})
        log("sweep", json.dumps(rows[-1]))
        return rows[-1]

    for HQ, tiles in SWEEP_TILES.items():
        done = []
        for t in tiles[:3] if quick else tiles:
            bh, bn, w, st, pf, ctas = t[:6]
            cfg = dict(BLOCK_H=bh, BLOCK_N=bn, num_warps=w, num_stages=st, PREFETCH=pf, ctas=ctas)
            r = one(HQ, cfg, t[6] if len(t) > 6 else None)
            if "us" in r and len(t) == 6:
                done.append(r)
        for r in sorted(done, key=lambda r: r["us"])[:1 if HQ < 64 else 0]:  # Hq 128 at batch 64: 1 split fills
            for sp in SWEEP_SPLITS:
                if sp != r["splits"]:
                    one(HQ, r["config"], sp)
    return rows


# ----------------------------------------------------------------------------- prefill

def bench_prefill(ceil, quick):
    from kernels.mla_prefill import mla_prefill

    DN, DV = 128, 128
    rows = []
    shapes = {"1x4096": [(4096, 4096)], "4x1024 after 3072 cached": [(1024, 4096)] * 4, "8x512": [(512, 512)] * 8}
    for HQ in (16, 128):
        for name, seqs in shapes.items():
            if quick and name != "1x4096":
                continue
            gen = torch.Generator(device="cuda").manual_seed(0)
            cu_q = torch.tensor([0] + [a for a, _ in seqs]).cumsum(0).to(torch.int32).cuda()
            cu_k = torch.tensor([0] + [b for _, b in seqs]).cumsum(0).to(torch.int32).cuda()
            T, Nk = int(cu_q[-1]), int(cu_k[-1])
            q = torch.randn(T, HQ, DN + DR, device="cuda", dtype=torch.bfloat16, generator=gen)
            kv = torch.randn(Nk, HQ, DN + DV, device="cuda", dtype=torch.bfloat16, generator=gen)
            lat = torch.randn(Nk, L, device="cuda", dtype=torch.bfloat16, generator=gen)
            scale = 1 / math.sqrt(DN + DR)
            args = (q, kv[..., :DN], lat[:, R:], kv[..., DN:], cu_q, cu_k, scale)
            mq = max(a for a, _ in seqs)
            t = time_graph(lambda i: mla_prefill(*args, max_seqlen_q=mq))
            pairs = sum(lq * (lk - lq) + lq * (lq + 1) // 2 for lq, lk in seqs)
            flops = 2 * HQ * pairs * (DN + DR + DV)
            row = {"shape": name, "Hq": HQ, "us": t * 1e6, "TFLOPs": flops / t / 1e12,
                   "of_matmul": flops / t / 1e12 / ceil["matmul_bf16_TFLOPs"]}
            if len(seqs) == 1 and seqs[0][0] == seqs[0][1]:  # SDPA on the expanded heads, causal
                import torch.nn.functional as F
                from torch.nn.attention import SDPBackend, sdpa_kernel

                k = torch.cat([kv[..., :DN], lat[:, None, R:].expand(Nk, HQ, DR)], -1)
                qs, ks, vs = (x.transpose(0, 1)[None].contiguous() for x in (q, k, kv[..., DN:]))
                for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                    try:
                        with sdpa_kernel([be]):
                            ts = time_graph(lambda i: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                                    scale=scale))
                        row[f"sdpa_{be.name.lower()}_us"] = ts * 1e6
                    except Exception as e:  # noqa: BLE001 -- backend does not take dqk 192 != dv 128
                        row[f"sdpa_{be.name.lower()}_us"] = f"unavailable: {str(e).splitlines()[0][:80]}"
                best = [v for k_, v in row.items() if k_.startswith("sdpa_") and isinstance(v, float)]
                if best:
                    row["vs_best_sdpa"] = min(best) / row["us"]
            rows.append(row)
            log("prefill", json.dumps(row))
            del q, kv, lat
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- grouped top-k

def bench_topk(ceil, quick):
    from kernels.grouped_topk import grouped_topk

    rows = []
    for name, (E, K, sc, ng, tg, rank, bias, renorm, scaling) in {
            "v2 160/8/3 top-6": (160, 6, "softmax", 8, 3, "max", False, False, 16.0),
            "v3 256/8/4 top-8": (256, 8, "sigmoid", 8, 4, "top2_sum", True, True, 2.5)}.items():
        for T in (64, 4096):
            logits = torch.randn(T, E, device="cuda")
            b = torch.randn(E, device="cuda") * 0.1 if bias else None
            t = time_graph(lambda i: grouped_topk(logits, K, sc, ng, tg, rank, b, renorm, scaling))
            rows.append({"router": name, "T": T, "us": t * 1e6})
            log("topk", json.dumps(rows[-1]))
    return rows


# ----------------------------------------------------------------------------- parity

def tiny_parity(ceil, quick):
    import tempfile

    from afsplit.models.tiny import make_tiny
    from launch.gpu_parity import PROMPT_LENS, compare, prefill_err, run_single, transformers_bf16_error

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("deepseek_v2", "deepseek_v3"):
            model_dir = str(make_tiny(family, Path(tmp) / family, seed=11))
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
            ref = run_single(model_dir, prompts, "float32", "cpu")
            yardstick = transformers_bf16_error(model_dir, prompts)
            eager = run_single(model_dir, prompts, "bfloat16", "cuda", False)
            graphs = run_single(model_dir, prompts, "bfloat16", "cuda", True)
            rows.append({"family": family, "layout": "single-gpu eager", **compare(ref, eager, yardstick)})
            rows.append({"family": family, "layout": "single-gpu graphs", **compare(ref, graphs, yardstick),
                         "vs_single_gpu_err": prefill_err(eager, graphs)})
            log("parity", json.dumps(rows[-2]), json.dumps(rows[-1]))
    return rows


# ----------------------------------------------------------------------------- engine

def step_floor_bytes(spec, batch: int, ctx_mean: float, dtype_bytes: int = 2) -> dict:
    """Bytes one decode step must read: every attention-side weight (router gates in fp32, only `batch` embedding
    rows), the routed experts a uniform router is expected to touch, and the latent KV cache."""
    from afsplit.models.weights import all_tensor_names_and_shapes

    shapes = all_tensor_names_and_shapes(spec)
    expert = attention = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if ".experts." in name:
            expert += n * dtype_bytes
        elif name == "model.embed_tokens.weight" and not spec.tie_word_embeddings:
            attention += batch * shape[1] * dtype_bytes
        else:
            attention += n * (4 if name.endswith(("gate.weight", "e_score_correction_bias")) else dtype_bytes)
    touched = 1 - (1 - spec.top_k / spec.num_experts) ** batch  # expected fraction of experts hit per layer
    kv = spec.num_layers * batch * ctx_mean * spec.head_dim * dtype_bytes
    return {"attention_side": attention, "routed_experts_touched": expert * touched, "expert_fraction_touched": touched,
            "kv_cache": kv, "total": attention + expert * touched + kv}


def engine_run(preset, ceil, batch=64, prompt_len=1024, new_tokens=64, cuda_graphs=True, device="cuda") -> dict:
    """`preset`: a preset name, or a model directory (the CPU smoke test of this script)."""
    from afsplit import LLM, SamplingParams
    from afsplit.config import config_from_dict

    model = {"path": preset} if Path(preset).is_dir() else {"weights": "random", "preset": preset}
    data = {"model": {**model, "dtype": "bfloat16", "max_model_len": 2048},
            "topology": {"device": device},
            "runtime": {"block_size": 16, "kv_cache_memory_gb": 12, "max_num_seqs": batch,
                        "max_num_batched_tokens": 8192, "cuda_graphs": cuda_graphs}}
    t0 = time.time()
    llm = LLM(config=config_from_dict(data, "mla_gpu_check"))
    engine = llm.engine
    load_s = time.time() - t0
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, engine.spec.vocab_size, (prompt_len,), generator=g).tolist()}
               for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps, t_start = [], time.time()
    while engine.scheduler.has_work():
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        if engine.last_step == (batch, batch):
            steps.append(time.perf_counter() - t)
    wall = time.time() - t_start
    steps.sort()
    med = steps[len(steps) // 2]
    floor = step_floor_bytes(engine.spec, batch, prompt_len + new_tokens / 2)
    floor_s = floor["total"] / (ceil["read_GBps"] * 1e9)
    static = engine.runner.static
    out = {"preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "cuda_graphs": cuda_graphs, "graph_replays": static.graphs.replays if static else 0,
           "load_s": load_s, "run_wall_s": wall, "decode_steps": len(steps), "decode_step_ms_median": med * 1e3,
           "decode_step_ms_min": steps[0] * 1e3, "floor_bytes": floor, "floor_ms": floor_s * 1e3,
           "floor_over_step": floor_s / med, "output_tok_per_s": batch / med}
    del llm, engine
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_engine(ceil, quick):
    rows = [engine_run("deepseek-v2-lite", ceil)]
    log("engine", json.dumps(rows[-1]))
    if not (quick or ENGINE_QUICK):
        rows.append(engine_run("deepseek-v2-lite", ceil, new_tokens=16, cuda_graphs=False))
        log("engine", json.dumps(rows[-1]))
        rows.append(engine_run("deepseek-v3-4l", ceil))
        log("engine", json.dumps(rows[-1]))
    return rows


# ----------------------------------------------------------------------------- tests

def run_tests(ceil, quick):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_mla_kernels_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    tail = (proc.stdout + proc.stderr)[-3000:]
    log(tail)
    return {"rc": proc.returncode, "summary": tail.strip().splitlines()[-1] if tail.strip() else "", "tail": tail}


# ----------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    c = res.get("ceilings", {})
    out = [f"# MLA on {res['device']} ({res['date']}, torch {res['torch']}, triton {res['triton']})", ""]
    if c:
        out += [f"Ceilings measured in this run: read {c['read_GBps']:.0f} GB/s (kernels/bench.py probe: best of torch sum / amax and a Triton streaming sum over 4 GiB), "
                f"bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s.", ""]
    if "tests" in res:
        out += [f"GPU tests (tests/test_mla_kernels_gpu.py): rc {res['tests'].get('rc')}, "
                f"{res['tests'].get('summary', '')}", ""]
    if res.get("decode"):
        out += ["## Paged MLA decode (bf16, latent 512 + rope 64, page 16)", "",
                "| Hq | batch | ctx | splits | us | GB/s | of read | of roofline | TFLOP/s | torch us | vs torch |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["decode"]:
            out.append(f"| {r['Hq']} | {r['B']} | {r['ctx']} | {r.get('splits')} | {r['us']:.1f} | {r['GBps']:.0f} | {r['of_read']:.2f} | "
                       f"{r['of_roofline']:.2f} | {r['TFLOPs']:.1f} | {r.get('torch_us', float('nan')):.1f} | "
                       f"{r.get('vs_torch', float('nan')):.2f} |")
        out.append("")
    if res.get("sweep"):
        out += ["## Decode tiles at batch 64, ctx 4096", "", "| Hq | BLOCK_H | BLOCK_N | warps | stages | prefetch | progs/SM | splits | us | of read | of roofline |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            cfg = r["config"]
            val = (f"{r['us']:.1f} | {r['of_read']:.2f} | {r['of_roofline']:.2f}" if "us" in r
                   else f"failed: {r['error'][:60]} | |")
            out.append(f"| {r['Hq']} | {cfg['BLOCK_H']} | {cfg['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} "
                       f"| {cfg.get('PREFETCH', False)} | {cfg.get('ctas', '')} | {r.get('splits')} | {val} |")
        out.append("")
    if res.get("prefill"):
        out += ["## MLA prefill (bf16, nope 128 + rope 64, v 128, causal)", "",
                "| Hq | shape | us | TFLOP/s | of matmul | vs best SDPA |", "|---|---|---|---|---|---|"]
        for r in res["prefill"]:
            out.append(f"| {r['Hq']} | {r['shape']} | {r['us']:.0f} | {r['TFLOPs']:.0f} | {r['of_matmul']:.2f} | "
                       f"{r.get('vs_best_sdpa', float('nan')):.2f} |")
        out.append("")
    if res.get("topk"):
        out += ["## Grouped top-k (one CUDA-graph call)", "", "| router | tokens | us |", "|---|---|---|"]
        out += [f"| {r['router']} | {r['T']} | {r['us']:.1f} |" for r in res["topk"]] + [""]
    if res.get("parity"):
        out += ["## bf16 parity (tiny checkpoints, vs the fp32 CPU engine; yardstick: transformers bf16)", "",
                "| family | layout | pass | prefill logit err | HF bf16 err | first token | greedy tokens |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['family']} | {r['layout']} | {r['pass']} | {r['prefill_logits_rel_err_max']:.2e} | "
                f"{r['hf_bf16_err']:.2e} | {r['first_token_match']:.2f} | {r['greedy_token_match']:.2f} |"
                for r in res["parity"]] + [""]
    if res.get("engine"):
        out += ["## Single-GPU engine, random weights, 64 x (1024 prompt + 64 new) tokens", "",
                "| preset | graphs | decode step ms (median) | floor ms | floor / step | tok/s | floor GB (attn + experts + KV) |",
                "|---|---|---|---|---|---|---|"]
        for r in res["engine"]:
            f = r["floor_bytes"]
            out.append(f"| {r['preset']} | {r['cuda_graphs']} | {r['decode_step_ms_median']:.2f} | {r['floor_ms']:.2f} | "
                       f"{r['floor_over_step']:.2f} | {r['output_tok_per_s']:.0f} | {f['attention_side'] / 1e9:.2f} + "
                       f"{f['routed_experts_touched'] / 1e9:.2f} + {f['kv_cache'] / 1e9:.2f} |")
        out.append("")
    if res.get("errors"):
        out += ["## Sections that failed", ""] + [f"- {k}: `{v.splitlines()[-1][:200]}`" for k, v in res["errors"].items()]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mla-out"))
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--engine-quick", action="store_true", help="engine: only deepseek-v2-lite with CUDA graphs")
    args = ap.parse_args()
    global ENGINE_QUICK
    ENGINE_QUICK = args.engine_quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    res = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__, "errors": {}}
    wanted = args.only.split(",")
    ceil = {"read_GBps": 4152.0, "matmul_bf16_TFLOPs": 776.0}  # DESIGN.md's H200 numbers until measured
    fns = {"tests": run_tests, "ceilings": lambda c, q: ceilings(), "decode": bench_decode, "sweep": sweep_decode,
           "prefill": bench_prefill, "topk": bench_topk, "parity": tiny_parity, "engine": bench_engine}
    if "ceilings" not in wanted:
        res["ceilings_assumed"] = ceil
    t_all = time.time()
    for name in SECTIONS:
        if name not in wanted:
            continue
        t0 = time.time()
        log(f"== {name}")
        try:
            res[name] = fns[name](ceil, args.quick)
            if name == "ceilings":
                ceil = res[name]
        except Exception:  # noqa: BLE001 -- record it; the other sections still run
            res["errors"][name] = traceback.format_exc()[-3000:]
            log(res["errors"][name])
        res.setdefault("section_s", {})[name] = time.time() - t0
        (out / "mla_gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "mla_gpu_check.md").write_text(markdown(res))
    log(f"done in {time.time() - t_all:.0f} s")
    log(markdown(res))
    return 1 if res["errors"] or res.get("tests", {}).get("rc", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
