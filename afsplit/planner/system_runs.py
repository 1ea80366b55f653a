"""Whole-run measurements of shallow copies of the model: what the kernel tables cannot see.

The profiled model is rewritten with 2 and 10 layers (SystemPlan) (random weights, same shapes) and run end
to end: the single-GPU engine in this process, the distributed runtime with one colocated rank as
``torchrun --nproc-per-node 1 -m afsplit.cli generate --warmup --stats-json`` (only the CLI, so no
runtime internals are touched). For each batch B the median decode step of the two depths gives a
straight line ``step = overhead(B) + layers x layer(B)``:

* engine ``layer_scale(B)`` = layer(B) / (attention + fused MoE from the kernel tables), the
  in-model correction of isolated kernel times; ``step_overhead(B)`` = the intercept minus the
  lm_head (host work, embedding, sampling); ``eager_layer_ms`` from the same pair with CUDA graphs off;
* runtime ``exchange_call(B)`` = (runtime layer - engine layer) / 2 per dispatch or combine call,
  ``step_overhead(B)`` = its intercept minus the lm_head (adds the control plane).

Both modes measure the same layer kernels, so where both ran a batch their slopes are pooled
(:func:`pooled_slopes`). The profile keeps the raw points; the planner refits them with this
module's :func:`fit_system` when it reads the profile, so a better estimator applies to old profiles.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger("afsplit.planner")

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SystemPlan:
    """What the whole-run measurements run: two depths, batch sizes per mode, one small workload."""

    depths: tuple[int, int] = (2, 10)
    engine_batches: tuple[int, ...] = (1, 8, 64, 256)
    runtime_batches: tuple[int, ...] = (8, 128)
    eager_batch: int = 64
    input_len: int = 128
    output_len: int = 32

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2


FULL = SystemPlan()
QUICK = SystemPlan(depths=(1, 2), engine_batches=(1, 2), runtime_batches=(2,), eager_batch=2, input_len=8,
                   output_len=4)


def shallow_dict(config, layers: int, model_dir: Path, max_seqs: int, plan: SystemPlan, graphs: bool = True) -> dict:
    """A config dict of `config`'s model cut to `layers` MoE layers, random weights, one colocated rank."""
    from afsplit.planner.shapes import preset_config_json

    m = config.model
    hf = preset_config_json(m.preset if m.preset and not m.path else m.path)
    hf.update(num_hidden_layers=layers, mlp_only_layers=[], decoder_sparse_step=1)
    hf.pop("layer_types", None)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf))
    d = config.to_dict()
    d["model"].update(path=str(model_dir), preset="", weights="random", tiny="", max_model_len=plan.input_len + plan.output_len + 16)
    d["topology"]["nodes"] = [{"colocated": 1}]
    kv_bytes = 2 * layers * hf.get("num_key_value_heads", hf["num_attention_heads"]) * (
        hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]) * 4
    need = max_seqs * (plan.input_len + plan.output_len + 16) * kv_bytes * 1.5
    d["runtime"].update(max_num_seqs=max_seqs, num_kv_blocks=0, kv_cache_memory_gb=round(need / 2**30 + 0.05, 3),
                        micro_batches="1", profile=False, cuda_graphs=graphs)
    d["balancer"] = {}
    d["comm"].update(metadata="padded", transport="direct")
    return d


def _load(d: dict, where: str):
    from afsplit.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(d)), where)


def engine_points(config, tmp: Path, plan: SystemPlan) -> dict:
    """{"graphs": {depth: {B: median decode ms}}, "eager": {depth: ms at plan.eager_batch}} of the engine."""
    import torch

    from afsplit.engine import LLMEngine
    from afsplit.planner.engine_runs import measure_engine

    out = {"graphs": {}, "eager": {}}
    batches = plan.engine_batches
    for depth in plan.depths:
        for graphs in (True, False):
            sizes = batches if graphs else [plan.eager_batch]
            cfg = _load(shallow_dict(config, depth, tmp / f"d{depth}", max(batches), plan, graphs), f"shallow {depth}")
            engine = LLMEngine(cfg)
            for b in sizes:
                ms = measure_engine(engine, b, plan.input_len, plan.output_len)["decode_step_ms_median"]
                if graphs:
                    out["graphs"].setdefault(depth, {})[b] = ms
                else:
                    out["eager"][depth] = ms
                log.info("engine depth %d %s B=%d: %.3f ms", depth, "graphs" if graphs else "eager", b, ms)
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def runtime_points(config, tmp: Path, plan: SystemPlan, deadline: float | None = None) -> tuple[dict, list]:
    """({depth: {B: median decode ms}}, errors) of the runtime with one colocated rank, one torchrun each."""
    from afsplit.planner.engine_runs import random_prompts
    from afsplit.planner.shapes import shape_from_config

    vocab = shape_from_config(config).vocab
    out, errors = {}, []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    batches = plan.runtime_batches
    for depth in plan.depths:
        cfg_path = tmp / f"runtime-d{depth}.yaml"
        cfg_path.write_text(yaml.safe_dump(shallow_dict(config, depth, tmp / f"d{depth}", max(batches), plan)))
        for b in batches:
            if deadline is not None and time.monotonic() > deadline:
                errors.append(f"depth {depth} B={b}: skipped (time budget)")
                continue
            prompts, stats = tmp / f"p{b}.jsonl", tmp / f"rt-d{depth}-b{b}.json"
            with open(prompts, "w") as f:
                for p in random_prompts(b, plan.input_len, vocab):
                    f.write(json.dumps({**p, "max_tokens": plan.output_len, "ignore_eos": True, "temperature": 0}) + "\n")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                   "afsplit.cli", "generate", "--config", str(cfg_path), "--prompts-file", str(prompts), "--output",
                   os.devnull, "--no-progress", "--warmup", "--stats-json", str(stats)]
            try:
                run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                errors.append(f"depth {depth} B={b}: timeout")
                continue
            if run.returncode != 0 or not stats.exists():
                tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
                errors.append(f"depth {depth} B={b}: exit {run.returncode}: {' | '.join(tail)}")
                continue
            ms = json.loads(stats.read_text())["decode_step_ms_median"]
            out.setdefault(depth, {})[b] = ms
            log.info("runtime depth %d B=%d: %.3f ms", depth, b, ms)
    return out, errors


def _line(points: dict, b: int, depths) -> tuple[float, float] | None:
    """(intercept, slope per layer) through the two depths' times at batch b (seconds)."""
    d1, d2 = depths
    if b not in points.get(d1, {}) or b not in points.get(d2, {}):
        return None
    t1, t2 = points[d1][b] * 1e-3, points[d2][b] * 1e-3
    slope = (t2 - t1) / (d2 - d1)
    return t1 - d1 * slope, slope


def _intercept(points: dict, b: int, depths, slope: float) -> float:
    """Mean over the depths of t - depth x slope (the intercept once the slope is fixed)."""
    return sum(points[d][b] * 1e-3 - d * slope for d in depths) / len(depths)


def pooled_slopes(eng_graphs: dict, rt: dict, depths) -> tuple[dict, dict]:
    """({B: engine layer slope}, {B: runtime slope}) with the runtime's layers = the engine's + two exchange calls.

    The runtime with one colocated rank runs the same layer kernels as the engine plus a dispatch and a
    combine (>= 0). Where both measured a batch and the runtime's slope came out *below* the engine's, the
    two slopes are two measurements of one layer time (noise): both take their mean and the calls are 0."""
    eng, run = {}, {}
    for b in eng_graphs.get(depths[0], {}):
        line = _line(eng_graphs, b, depths)
        if line is not None:
            eng[b] = line[1]
    for b in rt.get(depths[0], {}):
        line = _line(rt, b, depths)
        if line is not None:
            run[b] = line[1]
    for b in set(eng) & set(run):
        if 0 < run[b] < eng[b]:
            eng[b] = run[b] = (eng[b] + run[b]) / 2
    return eng, run


def fit_system(eng: dict, rt: dict, layer_table, head, plan: SystemPlan = FULL) -> dict:
    """The profile's ``system`` section from the points; layer_table(B) and head(B) in seconds.

    Per batch: the layer slope (pooled_slopes), engine ``layer_scale`` = slope / layer_table,
    ``step_overhead`` = intercept - lm_head; runtime ``exchange_call`` = (runtime slope - engine slope) / 2;
    ``eager_layer_ms`` (host launches of one layer, CUDA graphs off) and ``eager_step_extra_ms`` (the
    eager step's intercept beyond the graphed step's at the same batch: embedding, lm_head and sampler
    launched one by one, and the per-sequence metadata)."""
    from afsplit.planner.fitting import Table1D
    from afsplit.planner.step_model import bucket

    depths = plan.depths
    out: dict = {"depths": list(depths), "workload": {"input_len": plan.input_len, "output_len": plan.output_len},
                 "points": {"engine": eng, "runtime": rt}}
    graphs = eng.get("graphs", {})
    e_slopes, r_slopes = pooled_slopes(graphs, rt, depths)
    e_batch, e_over, e_scale, e_slope = [], [], [], []
    for b in sorted(e_slopes):
        s = e_slopes[b]
        if s <= 0:  # the deeper model was not slower: noise (a busy host); this batch says nothing
            out.setdefault("errors", []).append(f"engine B={b}: depth {depths[1]} not slower than {depths[0]}")
            continue
        e_batch.append(b)
        e_over.append(1e3 * max(0.0, _intercept(graphs, b, depths, s) - head(bucket(b))))
        e_scale.append(s / layer_table(b) if layer_table(b) > 0 else 1.0)
        e_slope.append(s)
    if e_batch:
        out["engine"] = {"batch": e_batch, "step_overhead_ms": e_over, "layer_scale": e_scale,
                         "layer_ms": [1e3 * s for s in e_slope]}
        ea = eng.get("eager", {})
        if all(d in ea for d in depths) and ea[depths[1]] > ea[depths[0]]:
            eager = (ea[depths[1]] - ea[depths[0]]) / (depths[1] - depths[0])
            out["engine"]["eager_layer_ms"] = eager
            over = Table1D(tuple(map(float, e_batch)), tuple(e_over), True)(plan.eager_batch)
            c_eager = ea[depths[0]] - depths[0] * eager  # ms
            out["engine"]["eager_step_extra_ms"] = max(0.0, c_eager - 1e3 * head(plan.eager_batch) - over)
    r_batch, r_over, r_call = [], [], []
    for b in sorted(r_slopes):
        if not e_batch:
            break
        s = r_slopes[b]
        eng_slope = e_slopes[b] if b in e_slopes else Table1D(tuple(map(float, e_batch)), tuple(e_slope))(b)
        r_batch.append(b)
        r_over.append(1e3 * max(0.0, _intercept(rt, b, depths, s) - head(bucket(b))))
        r_call.append(1e3 * max(0.0, s - eng_slope) / 2)
    if r_batch:
        out["runtime"] = {"batch": r_batch, "step_overhead_ms": r_over, "exchange_call_ms": r_call}
    return out


def points_from_json(points: dict) -> tuple[dict, dict]:
    """(engine, runtime) points of a profile's system.points with the int keys fit_system takes."""
    def ints(d: dict) -> dict:
        return {int(k): (ints(v) if isinstance(v, dict) else v) for k, v in d.items()}

    eng = points.get("engine", {})
    return ({"graphs": ints(eng.get("graphs", {})), "eager": ints(eng.get("eager", {}))},
            ints(points.get("runtime", {})))


def measure_system(config, layer_table, head, mode: str = "full", plan: SystemPlan = FULL,
                   deadline: float | None = None) -> dict:
    """Run the points (``mode`` full: engine and runtime; engine: engine only) and fit them."""
    with tempfile.TemporaryDirectory(prefix="afsplit-profile-") as tmp:
        eng = engine_points(config, Path(tmp), plan)
        rt, errors = ({}, [])
        if mode == "full":
            rt, errors = runtime_points(config, Path(tmp), plan, deadline=deadline)
    out = fit_system(eng, rt, layer_table, head, plan)
    if errors:
        out["errors"] = out.get("errors", []) + errors
    return out
