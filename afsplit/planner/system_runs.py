"""Whole-run measurements of shallow copies of the model: what the kernel tables cannot see.

The profiled model is rewritten with 2 layers and with its own depth when that fits on the GPU (else 16;
SystemPlan, :func:`deep_plan`) (random weights, same shapes) and run end to end: the single-GPU engine in this process, the distributed runtime with one colocated rank as
``torchrun --nproc-per-node 1 -m afsplit.cli generate --warmup --stats-json`` (only the CLI, so no
runtime internals are touched). For each batch B the median decode step of the two depths gives a
straight line ``step = overhead(B) + layers x layer(B)``:

* engine ``layer_scale(B)`` = layer(B) / (attention + fused MoE from the kernel tables), the
  in-model correction of isolated kernel times; ``step_overhead(B)`` = the intercept minus the
  lm_head (host work, embedding, sampling); ``eager_layer_ms`` from the same pair with CUDA graphs off;
* runtime ``exchange_call(B)`` = (runtime layer - engine layer) / 2 per dispatch or combine call,
  ``step_overhead(B)`` = its intercept minus the lm_head (adds the control plane);
* per mode ``admit_us_per_prompt_token``: the run's wall time outside its steps (the driver's and the
  coordinator's work between steps: copying each request to its attention rank, the outputs) per prompt
  token of the run.
* engine ``static_eager_layer_ms``: host per layer of a decode bucket's first visit (the static path run
  eagerly, the tail of the graphed runs: engine_runs.step_kind), which the graphs-off runs do not take;
* ``points.engine.routing`` (diagnostic only): distinct experts per layer of a decode step at B = 8, 64.

Why the model's own depth: per-layer time is not the same in every layer (routing, and with random weights
the hidden states of different sequences grow alike with depth, so small batches touch fewer experts in
deep layers); the slope from 2 layers to all of them is the mean layer of the model as it runs.

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
    """What the whole-run measurements run: two depths, batch sizes per mode, one small workload, plus
    the eager (CUDA graphs off) batch of both modes and a longer prompt at one batch (the in-model cost
    of context, which the kernel tables measure only in isolation). The deeper depth is the model's own
    where it fits (:func:`deep_plan`); 16 is the fallback."""

    depths: tuple[int, int] = (2, 16)
    engine_batches: tuple[int, ...] = (1, 8, 32, 64, 256)
    runtime_batches: tuple[int, ...] = (256, 8)  # in the order they run, the eager batch after the first
    eager_batch: int = 64
    input_len: int = 128
    output_len: int = 32
    context_batch: int = 64
    long_input_len: int = 2048

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2

    @property
    def long_context(self) -> float:
        return self.long_input_len + self.output_len / 2

    @property
    def max_model_len(self) -> int:
        return max(self.input_len, self.long_input_len) + self.output_len + 16


FULL = SystemPlan()
DEEP_MEMORY_FRACTION = 0.8  # of the GPU's memory a full-depth copy (weights + its KV) may take


def _kv_gb(hf: dict, layers: int, max_seqs: int, plan: SystemPlan) -> float:
    """KV cache (GB, with room) a copy of `layers` layers needs for the plan's runs."""
    kv_bytes = 2 * layers * hf.get("num_key_value_heads", hf["num_attention_heads"]) * (
        hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]) * 4
    tokens = max(max_seqs * (plan.input_len + plan.output_len + 16), plan.context_batch * plan.max_model_len)
    return round(tokens * kv_bytes * 1.5 / 2**30 + 0.05, 3)


def deep_plan(config, plan: SystemPlan, gpu_bytes: float) -> SystemPlan:
    """`plan` with its deeper depth set to the model's own layer count when a copy that deep (weights and
    KV) fits in DEEP_MEMORY_FRACTION of `gpu_bytes`; else unchanged."""
    import dataclasses

    from afsplit.planner.shapes import preset_config_json, shape_from_config

    shape = shape_from_config(config)
    m = config.model
    hf = preset_config_json(m.preset if m.preset and not m.path else m.path)
    depth = shape.num_layers
    if depth <= plan.depths[1]:
        return plan
    per_layer = shape.attention_layer_weight_bytes + shape.num_experts * shape.expert_bytes
    weights = shape.head_bytes * (1 if shape.tied_embeddings else 2) + depth * per_layer
    max_seqs = max(plan.engine_batches + plan.runtime_batches + (plan.eager_batch,))
    need = weights + _kv_gb(hf, depth, max_seqs, plan) * 2**30
    if need > DEEP_MEMORY_FRACTION * gpu_bytes:
        log.info("full depth %d needs %.1f GB > %.0f%% of %.1f GB: depths %s", depth, need / 1e9,
                 100 * DEEP_MEMORY_FRACTION, gpu_bytes / 1e9, plan.depths)
        return plan
    return dataclasses.replace(plan, depths=(plan.depths[0], depth))
QUICK = SystemPlan(depths=(1, 2), engine_batches=(1, 2), runtime_batches=(2,), eager_batch=2, input_len=8,
                   output_len=4, context_batch=2, long_input_len=24)


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
    d["model"].update(path=str(model_dir), preset="", weights="random", tiny="", max_model_len=plan.max_model_len)
    d["topology"]["nodes"] = [{"colocated": 1}]
    d["runtime"].update(max_num_seqs=max_seqs, num_kv_blocks=0, kv_cache_memory_gb=_kv_gb(hf, layers, max_seqs, plan),
                        micro_batches="1", profile=False, cuda_graphs=graphs,
                        # graphs made lazily, as the distributed runtime's ranks make them: the runs' tails
                        # measure a bucket's first visit (engine static_eager_layer_ms)
                        capture_at_start=False)
    d["balancer"] = {}
    d["comm"].update(metadata="padded", transport="direct")
    return d


def _load(d: dict, where: str):
    from afsplit.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(d)), where)


def engine_points(config, tmp: Path, plan: SystemPlan) -> tuple[dict, list]:
    """({"graphs": {depth: {B: median decode ms}}, "eager": {depth: ms at plan.eager_batch},
    "long": {depth: ms at plan.context_batch with the long prompt}, "gap": {depth: {B: [seconds of the run
    outside its steps, prompt tokens]}}, "first": {depth: {B: median ms of a bucket's first visits}}}, errors)
    of the engine; an engine that fails (memory) is an error,
    the other points still count."""
    import torch

    out = {"graphs": {}, "eager": {}, "long": {}, "gap": {}, "first": {}}
    errors = []
    for depth in plan.depths:
        for graphs in (True, False):
            what = f"engine depth {depth} {'graphs' if graphs else 'eager'}"
            try:
                _engine_points(config, tmp, plan, depth, graphs, out)
            except Exception as e:  # noqa: BLE001 -- one engine's failure (e.g. out of memory) loses its points only
                errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                log.warning("%s failed: %s", what, e)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                log.info("after %s: %.1f GB allocated", what, torch.cuda.memory_allocated() / 1e9)
    return out, errors


def _engine_points(config, tmp: Path, plan: SystemPlan, depth: int, graphs: bool, out: dict) -> None:
    from afsplit.engine import LLMEngine
    from afsplit.planner.engine_runs import measure_engine

    batches = plan.engine_batches
    cfg = _load(shallow_dict(config, depth, tmp / f"d{depth}", max(batches), plan, graphs), f"shallow {depth}")
    engine = LLMEngine(cfg)
    for b in batches if graphs else [plan.eager_batch]:
        run = measure_engine(engine, b, plan.input_len, plan.output_len)
        ms = run["decode_step_ms_median"]
        if graphs:
            out["graphs"].setdefault(depth, {})[b] = ms
            out["gap"].setdefault(depth, {})[b] = [run["wall_s"] - 1e-3 * sum(run["step_ms"]), b * plan.input_len]
            first = sorted(t for t, k in zip(run["step_ms"], run["step_kinds"]) if k == "first")
            if first:  # a bucket's first visit (static path, eager): the tail of a run whose sequences finish apart
                out["first"].setdefault(depth, {})[b] = first[len(first) // 2]
        else:
            out["eager"][depth] = ms
        log.info("engine depth %d %s B=%d: %.3f ms", depth, "graphs" if graphs else "eager", b, ms)
    if graphs and plan.long_input_len:
        ms = measure_engine(engine, plan.context_batch, plan.long_input_len, plan.output_len)["decode_step_ms_median"]
        out["long"][depth] = ms
        log.info("engine depth %d graphs B=%d, %d-token prompts: %.3f ms", depth, plan.context_batch,
                 plan.long_input_len, ms)
    if not graphs:  # after the timed run (it syncs every layer): what the routing does in this model
        for b in [b for b in ROUTING_BATCHES if b <= max(plan.engine_batches)]:
            out.setdefault("routing", {}).setdefault(depth, {})[b] = distinct_experts(engine, b, plan.input_len)
            log.info("engine depth %d B=%d: distinct experts per layer in decode %s", depth, b,
                     " ".join(f"{v:.0f}" for v in out["routing"][depth][b]))


ROUTING_BATCHES = (8, 64)


def distinct_experts(engine, batch: int, input_len: int, output_len: int = 6) -> list[float]:
    """Mean number of distinct experts the `batch` rows of a decode step route to, per MoE layer, in an eager
    engine (the router is called from Python there): a diagnostic of how far the model's routing is from the
    kernel table's uniform spread (the in-model layer time already contains it)."""
    from afsplit.planner.engine_runs import measure_engine

    model = engine.model
    seen: dict[int, list[int]] = {}

    def route(layer, x):
        weights, ids = type(model).route(model, layer, x)
        if x.shape[0] == batch:  # a decode step of the whole batch
            seen.setdefault(layer, []).append(int(ids.unique().numel()))
        return weights, ids

    model.route = route
    try:
        measure_engine(engine, batch, input_len, output_len, warmup=False)
    finally:
        del model.route
    return [sum(v) / len(v) for _, v in sorted(seen.items())]


def runtime_gap(stats: dict, moe_layers: int) -> float:
    """Seconds of a 1-rank runtime run's wall time outside its steps: the coordinator's time of every step is
    what its rank's phases add up to (RunStats.add_report), summarised per MoE layer and step."""
    acc = stats.get("per_layer_ms", {}).get("attention", {})
    steps_s = 1e-3 * sum(acc.values()) * stats["steps"] * max(1, moe_layers)
    return max(0.0, stats["wall_s"] - steps_s)


def runtime_points(config, tmp: Path, plan: SystemPlan, deadline: float | None = None) -> tuple[dict, dict, list, dict]:
    """({depth: {B: median decode ms}}, {depth: ms with CUDA graphs off at plan.eager_batch}, errors,
    {depth: {B: [seconds outside steps, prompt tokens]}}) of the runtime with one colocated rank, one torchrun
    each; both depths of a batch run together, so a time budget drops whole batches."""
    from afsplit.planner.engine_runs import random_prompts
    from afsplit.planner.shapes import shape_from_config

    vocab = shape_from_config(config).vocab
    graphs_out, eager_out, errors, gaps = {}, {}, [], {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    max_seqs = max(plan.runtime_batches + (plan.eager_batch,))
    order = [(b, True) for b in plan.runtime_batches]
    order.insert(1, (plan.eager_batch, False))  # the eager point early: a budget drops the last batch
    for b, graphs in order:
        if deadline is not None and time.monotonic() > deadline:
            errors.append(f"B={b}{'' if graphs else ' eager'}: skipped (time budget)")
            continue
        for depth in plan.depths:
            cfg_path = tmp / f"runtime-d{depth}{'' if graphs else '-eager'}.yaml"
            if not cfg_path.exists():
                cfg_path.write_text(yaml.safe_dump(shallow_dict(config, depth, tmp / f"d{depth}", max_seqs, plan,
                                                                graphs)))
            prompts, stats = tmp / f"p{b}.jsonl", tmp / f"rt-d{depth}-b{b}-{graphs}.json"
            with open(prompts, "w") as f:
                for p in random_prompts(b, plan.input_len, vocab):
                    f.write(json.dumps({**p, "max_tokens": plan.output_len, "ignore_eos": True, "temperature": 0}) + "\n")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                   "afsplit.cli", "generate", "--config", str(cfg_path), "--prompts-file", str(prompts), "--output",
                   os.devnull, "--no-progress", "--warmup", "--stats-json", str(stats)]
            what = f"depth {depth} B={b}{'' if graphs else ' eager'}"
            try:
                run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
            except subprocess.TimeoutExpired:
                errors.append(f"{what}: timeout")
                continue
            if run.returncode != 0 or not stats.exists():
                tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
                errors.append(f"{what}: exit {run.returncode}: {' | '.join(tail)}")
                continue
            got = json.loads(stats.read_text())
            ms = got["decode_step_ms_median"]
            if graphs:
                graphs_out.setdefault(depth, {})[b] = ms
                gaps.setdefault(depth, {})[b] = [runtime_gap(got, depth), b * plan.input_len]
            else:
                eager_out[depth] = ms
            log.info("runtime %s: %.3f ms", what, ms)
    return graphs_out, eager_out, errors, gaps


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


def admit_per_prompt_token(gaps: dict) -> float | None:
    """Seconds outside the steps per prompt token over every run of {depth: {B: [gap_s, prompt tokens]}}, or None."""
    runs = [v for by_b in gaps.values() for v in by_b.values()]
    tokens = sum(t for _, t in runs)
    return sum(g for g, _ in runs) / tokens if tokens else None


def fit_system(eng: dict, rt: dict, layer_table, head, plan: SystemPlan = FULL, rt_eager: dict | None = None,
               attention=None, rt_gap: dict | None = None) -> dict:
    """The profile's ``system`` section from the points; layer_table(B), head(B), attention(B, ctx) in seconds.

    Per batch: the layer slope (pooled_slopes), engine ``layer_scale`` = slope / layer_table,
    ``step_overhead`` = intercept - lm_head; runtime ``exchange_call`` = (runtime slope - engine slope) / 2;
    per mode ``eager_layer_ms`` (host launches of one layer, CUDA graphs off) and ``eager_step_extra_ms``
    (the eager step's intercept beyond the graphed step's at the same batch: embedding, lm_head and
    sampler launched one by one, and the per-sequence metadata); engine ``static_eager_layer_ms`` (host
    per layer of a decode bucket's first visit, the static path run eagerly, from the graphed runs' tails); engine ``context_factor`` = the
    in-model growth of a layer from the short to the long prompt / the attention table's growth; per mode
    ``admit_us_per_prompt_token`` (admit_per_prompt_token: the wall time outside the steps)."""
    from afsplit.planner.fitting import Table1D
    from afsplit.planner.step_model import bucket

    depths = plan.depths
    out: dict = {"depths": list(depths), "workload": {"input_len": plan.input_len, "output_len": plan.output_len},
                 "eager_batch": plan.eager_batch, "context_batch": plan.context_batch,
                 "long_input_len": plan.long_input_len, "points": {"engine": eng, "runtime": rt}}
    if rt_eager:
        out["points"]["runtime_eager"] = rt_eager
    if rt_gap:
        out["points"]["runtime_gap"] = rt_gap
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
        over = Table1D(tuple(map(float, e_batch)), tuple(e_over), True)(plan.eager_batch)
        out["engine"].update(_eager(eng.get("eager", {}), depths, over, 1e3 * head(plan.eager_batch)))
        long = eng.get("long", {})
        cb = plan.context_batch
        if attention is not None and cb in e_slopes and all(d in long for d in depths):
            grow = (long[depths[1]] - long[depths[0]]) / (depths[1] - depths[0]) - 1e3 * e_slopes[cb]
            short = 1e3 * attention(bucket(cb), plan.mean_context)
            table = 1e3 * attention(bucket(cb), plan.long_context) - short
            if table > 0.1 * short:  # the table must itself see the context, or the ratio is noise over noise
                out["engine"]["context_factor"] = max(0.0, grow / table)
        admit = admit_per_prompt_token(eng.get("gap", {}))
        if admit is not None:
            out["engine"]["admit_us_per_prompt_token"] = 1e6 * admit
        first = eng.get("first", {})
        both = sorted(set(first.get(depths[0], {})) & set(first.get(depths[1], {})))
        if both and first[depths[1]][both[-1]] > first[depths[0]][both[-1]]:  # the largest batch seen at both
            b = both[-1]
            out["engine"]["static_eager_layer_ms"] = (first[depths[1]][b] - first[depths[0]][b]) / (depths[1] - depths[0])
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
        r_at = Table1D(tuple(map(float, r_batch)), tuple(r_over), True)(plan.eager_batch)
        out["runtime"].update(_eager(rt_eager or {}, depths, r_at, 1e3 * head(plan.eager_batch)))
        admit = admit_per_prompt_token(rt_gap or {})
        if admit is not None:
            out["runtime"]["admit_us_per_prompt_token"] = 1e6 * admit
    return out


def _eager(points: dict, depths, graph_overhead_ms: float, head_ms: float) -> dict:
    """eager_layer_ms and eager_step_extra_ms from the eager points {depth: ms} (empty if they say nothing)."""
    if not all(d in points for d in depths) or points[depths[1]] <= points[depths[0]]:
        return {}
    layer = (points[depths[1]] - points[depths[0]]) / (depths[1] - depths[0])
    intercept = points[depths[0]] - depths[0] * layer
    return {"eager_layer_ms": layer, "eager_step_extra_ms": max(0.0, intercept - head_ms - graph_overhead_ms)}


def points_from_json(points: dict) -> tuple[dict, dict, dict, dict]:
    """(engine, runtime, runtime eager, runtime gap) points of a profile's system.points with the int keys
    fit_system takes."""
    def ints(d: dict) -> dict:
        return {int(k): (ints(v) if isinstance(v, dict) else v) for k, v in d.items()}

    eng = points.get("engine", {})
    return ({key: ints(eng.get(key, {})) for key in ("graphs", "eager", "long", "gap", "first")},
            ints(points.get("runtime", {})), ints(points.get("runtime_eager", {})), ints(points.get("runtime_gap", {})))


def measure_system(config, layer_table, head, mode: str = "full", plan: SystemPlan = FULL,
                   deadline: float | None = None, attention=None) -> dict:
    """Run the points (``mode`` full: engine and runtime; engine: engine only) and fit them."""
    with tempfile.TemporaryDirectory(prefix="afsplit-profile-") as tmp:
        eng, errors = engine_points(config, Path(tmp), plan)
        rt, rt_eager, rt_gap = {}, {}, {}
        if mode == "full":
            rt, rt_eager, rt_errors, rt_gap = runtime_points(config, Path(tmp), plan, deadline=deadline)
            errors += rt_errors
    out = fit_system(eng, rt, layer_table, head, plan, rt_eager, attention, rt_gap)
    if errors:
        out["errors"] = out.get("errors", []) + errors
    return out
