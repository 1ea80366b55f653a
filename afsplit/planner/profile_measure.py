"""``afsplit profile``: time the planner's building blocks with afsplit's own model code and kernels.

One layer of the configured model (random weights, real shapes) is built with
:class:`afsplit.models.moe_model.AttentionModel` and timed the way decode runs it (CUDA graphs on a
GPU, see kernels/bench.py's ``time_graph``; plain wall time on the CPU):

* attention side of a MoE layer (norms, QKV, RoPE, KV store, paged attention, O, router, shared
  expert) for B decode rows of context C;
* eager prefill chunks of whole prompts (the flash-attention path);
* fused MoE (``afsplit.ops.fused_moe``) for N (token, expert) pairs over S local experts;
* the final norm + lm_head, and dense GEMMs for the roofline that transfers tables to other shapes;
* links (links.py) and whole runs of shallow copies of the model (system_runs.py).

The JSON it writes is described in profile_data.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch

from afsplit.planner import synthetic as grids

log = logging.getLogger("afsplit.planner")
REPO = Path(__file__).resolve().parents[2]


def make_timer(device: torch.device):
    """fn -> seconds per call: CUDA-graph replays on a GPU (as decode runs), median wall time on the CPU."""
    if device.type == "cuda":
        from kernels.bench import time_graph

        return lambda fn: time_graph(lambda i: fn())

    def cpu(fn):
        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return cpu


def time_eager(device: torch.device, fn) -> float:
    """Seconds of one eager call, device work included (prefill chunks run outside graphs)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class LayerBench:
    """One MoE layer of the model on `device`: its attention part, a KV cache and stacked experts."""

    def __init__(self, spec, dtype: torch.dtype, device: torch.device, max_tokens: int, max_position: int,
                 block_size: int = 16):
        from afsplit.model_runner import KVCache
        from afsplit.models.checkpoint import RandomWeights
        from afsplit.models.moe_model import AttentionModel
        from afsplit.models.weights import load_attention_weights

        layer = spec.moe_layer_ids[0]
        one = dataclasses.replace(spec, num_layers=1, moe_layers=(True,), sliding_windows=(spec.sliding_windows[layer],))
        self.spec, self.dtype, self.device, self.bs = one, dtype, device, block_size
        self.weights = load_attention_weights(RandomWeights(seed=0), one, dtype, device)
        self.model = AttentionModel(one, self.weights, max_positions=max_position + 1)
        self.num_blocks = max_tokens // block_size + 1
        self.kv = KVCache(1, self.num_blocks, block_size, one.num_kv_heads, one.head_dim, dtype, device).layers[0]

    def _meta(self, seq_lens: list[int], new: list[int]):
        """Metadata for sequences with `seq_lens` tokens of which the last `new` are computed now."""
        from afsplit import ops

        dev, bs = self.device, self.bs
        nb = max(math.ceil(n / bs) for n in seq_lens)
        tables = torch.zeros(len(seq_lens), nb, dtype=torch.int32)
        positions, slots, cu, prefix = [], [], [0], []
        next_block = 0
        for b, (n, k) in enumerate(zip(seq_lens, new)):
            blocks = list(range(next_block, next_block + math.ceil(n / bs)))
            next_block += len(blocks)
            tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            for p in range(n - k, n):
                positions.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
            cu.append(cu[-1] + k)
            prefix.append(n - k)
        if next_block > self.num_blocks:
            raise ValueError(f"profile: {sum(seq_lens)} tokens do not fit the {self.num_blocks} KV blocks")
        i32 = dict(dtype=torch.int32, device=dev)
        return ops.AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, **i32), prefix_lens=torch.tensor(prefix, **i32),
            seq_lens=torch.tensor(seq_lens, **i32), block_tables=tables.to(dev),
            decode_only=all(k == 1 for k in new), cu_seqlens_list=cu, prefix_lens_list=prefix)

    def attention_fn(self, meta, tokens: int):
        h = torch.randn(tokens, self.spec.hidden_size, device=self.device).to(self.dtype)
        res = torch.randn_like(h)
        model = self.model

        def fn():
            x, _ = model.attention_block(0, h, res, meta, self.kv)
            model.route(0, x)
            return model.shared_expert(0, x)

        return fn

    def head_fn(self, rows: int):
        h = torch.randn(rows, self.spec.hidden_size, device=self.device).to(self.dtype)
        return lambda: self.model.final_logits(h, h)


def moe_fn(x_TD, w13, w2, slots: int, pairs: int, top_k: int):
    """fused_moe over the first `slots` experts with `pairs` assignments spread uniformly over them."""
    from afsplit import ops

    dev = x_TD.device
    kk = min(top_k, slots)
    rows = math.ceil(pairs / kk)
    ids = torch.full((rows, top_k), -1, dtype=torch.int32, device=dev)
    ids[:, :kk] = torch.rand(rows, slots, device=dev).argsort(dim=1)[:, :kk].to(torch.int32)
    extra = rows * kk - pairs
    if extra:
        ids[-1, kk - extra:kk] = -1
    weights = torch.rand(rows, top_k, device=dev)
    x = x_TD[:rows]
    a, b = w13[:slots], w2[:slots]
    return lambda: ops.fused_moe(x, a, b, ids, weights)


MIXED_DECODES = 64  # decode rows added to a prompt chunk in the mixed points
MIXED_GRID = ((512, 2048), (512, 2048))  # (prompt pieces, decode contexts)


def measure_mixed(bench: "LayerBench", timer, quick: bool) -> dict:
    """The attention side of a mixed step (decode rows of context c, then a prompt piece of L tokens: the
    scheduler's order, so the rows go through the paged decode kernel and the piece through the prefill
    kernel, as ops.attention splits them) and of the piece alone, GPU time (CUDA graphs): what a decode row
    adds to a chunked-prefill step. An error is recorded, not raised (the rest of the profile stands)."""
    k, (pieces, contexts) = (2, ((16, 32), (16, 32))) if quick else (MIXED_DECODES, MIXED_GRID)
    out: dict = {"decodes": k, "points": []}
    try:
        for n in pieces:
            alone = 1e3 * timer(bench.attention_fn(bench._meta([n], [n]), n))
            for c in contexts:
                meta = bench._meta([c + 1] * k + [n], [1] * k + [n])  # decodes first, as scheduled
                ms = 1e3 * timer(bench.attention_fn(meta, n + k))
                out["points"].append({"prompt_len": n, "decode_ctx": c, "ms": ms, "alone_ms": alone})
                log.info("attention mixed: %d-token piece + %d decodes at context %d: %.3f ms (alone %.3f)", n, k, c,
                         ms, alone)
    except Exception as e:  # noqa: BLE001 -- a new measurement must not cost the profile
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("attention mixed points failed: %s", out["error"])
    return out


def measure_kernels(spec, shape, dtype: torch.dtype, device: torch.device, quick: bool) -> dict:
    timer = make_timer(device)
    batches = [1, 4] if quick else grids.DECODE_BATCH
    contexts = [32, 64] if quick else [c for c in grids.DECODE_CONTEXT if c <= spec.max_position_embeddings]
    prefill = [(16, 1), (32, 2)] if quick else grids.PREFILL_CHUNKS
    max_tokens = max(max(batches) * max(contexts), max(n * k for n, k in prefill))
    bench = LayerBench(spec, dtype, device, max_tokens, max(max(contexts), max(n for n, _ in prefill)))
    out: dict = {}
    ms = []
    for b in batches:
        row = []
        for c in contexts:
            meta = bench._meta([c] * b, [1] * b)
            row.append(1e3 * timer(bench.attention_fn(meta, b)))
        ms.append(row)
        log.info("attention decode B=%d: %s ms", b, " ".join(f"{v:.3f}" for v in row))
    out["attention_decode"] = {"batch": batches, "context": contexts, "ms": ms}
    pts = []
    for n, k in prefill:
        p = grids.prefill_point(n, k)
        meta = bench._meta([n] * k, [n] * k)
        p["ms"] = 1e3 * time_eager(device, bench.attention_fn(meta, n * k))
        pts.append(p)
        log.info("attention prefill %d x %d tokens: %.3f ms", k, n, p["ms"])
    out["attention_prefill"] = {"points": pts}
    out["attention_mixed"] = measure_mixed(bench, timer, quick)
    heads = [1, 4] if quick else grids.HEAD_BATCH
    out["head"] = {"batch": heads, "ms": [1e3 * timer(bench.head_fn(b)) for b in heads]}
    gemm = []
    for t in ([1, 8] if quick else grids.GEMM_TOKENS):
        for w in (bench.weights.layers[0].qkv_w, bench.weights.lm_head):
            x = torch.randn(t, w.shape[1], device=device).to(dtype)
            sec = timer(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            gemm.append({"tokens": t, "weight_bytes": w.numel() * w.element_size(), "flops": 2.0 * t * w.numel(),
                         "ms": 1e3 * sec})
    out["gemm"] = {"points": gemm}
    del bench
    E, H, I = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    w13 = (torch.randn(E, 2 * I, H, device=device) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) * I ** -0.5).to(dtype)
    pairs = [1, 16, 256] if quick else grids.MOE_PAIRS
    x = torch.randn(max(pairs), H, device=device).to(dtype)
    slots = grids.moe_slot_grid(E)
    ms = []
    for s in slots:
        ms.append([1e3 * timer(moe_fn(x, w13, w2, s, n, spec.top_k)) for n in pairs])
        log.info("fused MoE S=%d: %s ms", s, " ".join(f"{v:.3f}" for v in ms[-1]))
    out["moe"] = {"experts_per_rank": slots, "pairs": pairs, "ms": ms}
    return out


def _git_commit() -> str:
    """$COMMIT when the driver sets it (launch/gpu_all_1gpu.sh: the device copy's own HEAD may differ), else git's."""
    import os

    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_facts(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return p.name, p.total_memory / 1e9
    import os

    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def run_profile(config_path: str, overrides, out_path: str, quick: bool = False, system: str = "full",
                time_budget_s: float = 240.0, command: str = "") -> dict:
    """Measure everything for the config's model and write the profile JSON; returns it."""
    from afsplit.config import load_config
    from afsplit.engine import DTYPES, resolve_model
    from afsplit.planner.links import measure_links
    from afsplit.planner.profile_data import BlockTimes, FORMAT, check_profile
    from afsplit.planner.shapes import shape_from_config
    from afsplit.planner.step_model import bucket
    from afsplit.planner.synthetic import BALANCER_MEASURED

    start = time.monotonic()
    cfg = load_config(config_path, overrides)
    spec, _ = resolve_model(cfg)
    shape = shape_from_config(cfg)
    device = torch.device("cuda" if cfg.topology.device == "cuda" else "cpu")
    name, mem = _device_facts(device)
    prof = {"format": FORMAT, "kind": "measured", "device": name, "gpu_memory_gb": mem,
            "gpus_visible": torch.cuda.device_count() if device.type == "cuda" else 0,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit(),
            "torch": torch.__version__, "command": command, "config": config_path, "overrides": list(overrides),
            "model": {**dataclasses.asdict(shape), "signature": shape.signature()}}
    try:
        import triton

        prof["triton"] = triton.__version__
    except ImportError:
        pass
    with torch.inference_mode():
        prof.update(measure_kernels(spec, shape, DTYPES[cfg.model.dtype], device, quick))
    prof["links"] = measure_links(device)
    prof["balancer"] = dict(BALANCER_MEASURED)
    check_profile(prof, out_path)
    if system != "none":
        from afsplit.planner.system_runs import FULL, QUICK, deep_plan, measure_system

        # the model's own depth where it fits on this GPU (the mean in-model layer of all its layers)
        plan = QUICK if quick else (deep_plan(cfg, FULL, mem * 1e9) if device.type == "cuda" else FULL)
        blocks = BlockTimes(prof, shape)
        ctx = plan.mean_context

        def layer_table(b):
            rows = bucket(b)
            return blocks.attention_decode(rows, ctx) + blocks.moe(b * shape.top_k, shape.num_experts)

        prof["system"] = measure_system(cfg, layer_table, blocks.head, system, plan, deadline=start + time_budget_s,
                                        attention=blocks.attention_decode)
    prof["profile_s"] = time.monotonic() - start
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(prof, indent=1))
    print(f"wrote {out_path} ({prof['profile_s']:.0f} s): {name}, {shape.describe()}")
    return prof
