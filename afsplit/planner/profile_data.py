"""The profile JSON (written by ``afsplit profile``) and the building-block times read from it.

Format ``afsplit-profile/1``; every time is in milliseconds, per layer unless said::

    device, gpu_memory_gb, date, commit, torch, kind ("measured" | "synthetic"), note
    model:             the profiled model's shape signature (ModelShape.signature()) and name
    attention_decode:  {batch: [B...], context: [C...], ms: [[...] per B]}   attention block + router
                       (+ shared expert) of one MoE layer, B decode rows of context C, as in a CUDA graph
    attention_prefill: {points: [{tokens, prompt_len, s2, kv_tokens, ms}], block_m?, block_n?}   one eager
                       chunk of tokens / prompt_len whole prompts, timed with its host launches (the
                       planner fits max(host, GPU) to it, GPU work on the kernel's padded tiles)
    attention_mixed:   {decodes: k, points: [{prompt_len, decode_ctx, ms, alone_ms}]} (optional)   GPU time
                       of a prompt piece plus k decode rows of context decode_ctx, and of the piece alone
    head:              {batch: [...], ms: [...]}                     final norm + lm_head for B rows (per step)
    moe:               {experts_per_rank: [S...], pairs: [N...], ms: [[...] per S]}   fused MoE of N
                       (token, expert) pairs spread uniformly over S local experts
    gemm:              {points: [{weight_bytes, flops, ms}]}        dense GEMMs (roofline of projections)
    links:             {intra: {alpha_us, GBps, gap_us, source}, inter: {...}}   one stage of n messages on
                       a link = alpha + n * gap + bytes / GBps
    system:            {engine: {batch, step_overhead_ms, layer_scale, eager_layer_ms, eager_step_extra_ms,
                                 context_factor, admit_us_per_prompt_token, static_eager_layer_ms},
                        runtime: {batch, step_overhead_ms, exchange_call_ms, eager_layer_ms, eager_step_extra_ms,
                                  admit_us_per_prompt_token}, points, depths, workload}
                       measured in whole runs of 2-layer and full-depth (or 16-layer) copies of the model (see
                       system_runs.py; the planner refits the raw points with the current estimator)
    balancer:          {expert_ranks: [...], max_over_mean: [...] (least-loaded over replicas),
                        round_robin: [...] (no replicas), spare_fraction (replica slots / experts), source}
    assumed:           {memory_reserve_gb, memory_utilization, control_us_per_doubling}

:class:`BlockTimes` turns a profile plus a :class:`ModelShape` into per-block times in seconds: read
from the tables when the model is the profiled one (anchored rooflines beyond the grid), from
roofline fits of the same tables otherwise ("transferred").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from afsplit.errors import ConfigError
from afsplit.planner.fitting import (Roofline, Table1D, Table2D, anchored, fit_floor_or_rate, fit_nonneg, fit_roofline,
                                     flash_tile_pairs, touched_experts)
from afsplit.planner.shapes import ModelShape

FORMAT = "afsplit-profile/1"
REQUIRED = ("model", "attention_decode", "attention_prefill", "head", "moe", "gemm", "links")
DEFAULT_ASSUMED = {"memory_reserve_gb": 6.0, "memory_utilization": 0.95, "control_us_per_doubling": 30.0}
MS = 1e-3
PREFILL_TILE = 128  # kernels/flash_attention.py _config: paged prefix, head_dim > 64, bf16 -> 128 x 128 tiles
DEFAULT_INTER_GAP_US = 1.0  # assumed: ~1 M messages/s issued per GPU's NIC (NCCL proxy + RDMA post)


def load_profile(path: str | Path) -> dict:
    """Read and check a profile; errors name the file and the missing part."""
    path = Path(path)
    try:
        prof = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read profile ({e.strerror}); write one with `afsplit profile`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    check_profile(prof, str(path))
    return prof


def check_profile(prof: dict, where: str = "profile") -> None:
    if not isinstance(prof, dict) or prof.get("format") != FORMAT:
        raise ConfigError(f"{where}: format must be {FORMAT!r}, got {prof.get('format') if isinstance(prof, dict) else prof!r}")
    missing = [k for k in REQUIRED if k not in prof]
    if missing:
        raise ConfigError(f"{where}: missing section(s) {', '.join(missing)}; re-run `afsplit profile`")
    for name, axes in (("attention_decode", ("batch", "context")), ("moe", ("experts_per_rank", "pairs"))):
        sec = prof[name]
        rows, cols = sec.get(axes[0]) or [], sec.get(axes[1]) or []
        ms = sec.get("ms") or []
        if not rows or not cols or len(ms) != len(rows) or any(len(r) != len(cols) for r in ms):
            raise ConfigError(f"{where}: {name}.ms must be {len(rows)} x {len(cols)} ({axes[0]} x {axes[1]})")
    for kind in ("intra", "inter"):
        link = prof["links"].get(kind)
        if not link or link.get("GBps", 0) <= 0:
            raise ConfigError(f"{where}: links.{kind}: needs alpha_us and GBps > 0")


def _table2(sec: dict, xk: str, yk: str) -> Table2D:
    return Table2D(tuple(map(float, sec[xk])), tuple(map(float, sec[yk])),
                   tuple(tuple(v * MS for v in row) for row in sec["ms"]))


def _table1(xs, ys, scale: float = MS, extrapolate: bool = False) -> Table1D:
    return Table1D(tuple(map(float, xs)), tuple(v * scale for v in ys), extrapolate)


@dataclass(frozen=True)
class Link:
    """A rank's link of one kind: latency once per exchange stage, `gap` per message it issues, then bytes."""

    alpha: float  # seconds of latency (messages in flight together overlap it)
    beta: float  # bytes per second
    gap: float = 0.0  # seconds per message issued (NIC / proxy message rate); 0 on NVLink

    def time(self, nbytes: float, messages: int = 1) -> float:
        return self.alpha + messages * self.gap + nbytes / self.beta if messages else 0.0


class BlockTimes:
    """Seconds per building block for `shape`, from `profile` (see the module docstring)."""

    def __init__(self, profile: dict, shape: ModelShape):
        self.profile, self.shape = profile, shape
        self.profiled = self._profiled_shape()
        sig = dict(profile["model"].get("signature", {}))
        self.matched = sig == shape.signature()
        self.assumed = {**DEFAULT_ASSUMED, **profile.get("assumed", {})}

    def _profiled_shape(self) -> ModelShape:
        """The profiled model's shape (the tables' own x axes are in its bytes and FLOPs)."""
        from dataclasses import fields

        m = self.profile["model"]
        names = {f.name for f in fields(ModelShape)}
        return ModelShape(**{k: v for k, v in m.items() if k in names})

    # -- fits of the tables (what transfers to other shapes) -----------------------------------

    @cached_property
    def gemm(self) -> Roofline:
        pts = [(p["weight_bytes"], p["flops"], p["ms"] * MS) for p in self.profile["gemm"]["points"]]
        return fit_roofline(pts)

    def gemm_time(self, weight_bytes: float, flops: float) -> float:
        return max(weight_bytes / self.gemm.bw, flops / self.gemm.flops_rate)

    @cached_property
    def _attn_fit(self) -> tuple[float, float, float]:
        """(c, seconds per token, seconds per KV byte) of the decode table once its GEMMs are taken out: the
        attention block's fixed cost, its per-token kernels (norms, RoPE, KV store, router), its KV reads."""
        p, sec = self.profiled, self.profile["attention_decode"]
        rows, ys = [], []
        for b, row in zip(sec["batch"], sec["ms"]):
            g = self.gemm_time(p.attention_layer_weight_bytes, p.attention_gemm_flops(b))
            for ctx, ms in zip(sec["context"], row):
                rows.append((1.0, float(b), b * ctx * p.kv_bytes_per_token_layer))
                ys.append(max(ms * MS - g, 1e-7))
        return fit_nonneg(rows, ys)

    @property
    def prefill_tiles(self) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) of the prefill kernel: the profile's, else kernels/flash_attention.py's choice with
        a paged KV cache on Hopper for head_dim > 64 (128 x 128)."""
        sec = self.profile["attention_prefill"]
        return int(sec.get("block_m", PREFILL_TILE)), int(sec.get("block_n", PREFILL_TILE))

    def _prefill_gpu_base(self, shape: ModelShape, tokens: float) -> float:
        """GPU time of a prefill chunk's attention block without the attention kernel itself (GEMMs and the
        per-token kernels measured in decode: the same kernels run on every token)."""
        c, per_token, _ = self._attn_fit
        return (c + self.gemm_time(shape.attention_layer_weight_bytes, shape.attention_gemm_flops(tokens))
                + per_token * tokens * shape.hidden / self.profiled.hidden)

    @cached_property
    def _prefill_fit(self) -> tuple[float, float]:
        """(host seconds, seconds per attention FLOP) of the eager prefill points: each point is one eager call
        timed with its host launches, so it takes max(host, GPU) with GPU = the base above plus the FLOPs of
        the kernel's (query tile, key tile) pairs."""
        p = self.profiled
        bm, bn = self.prefill_tiles
        pts = []
        for q in self.profile["attention_prefill"]["points"]:
            n = int(q.get("prompt_len") or q["tokens"])
            tiles = (q["tokens"] / n) * flash_tile_pairs(n, 0, bm, bn)
            pts.append((self._prefill_gpu_base(p, q["tokens"]), tiles * p.attn_flops_per_pair_prefill, q["ms"] * MS))
        return fit_floor_or_rate(pts)

    @cached_property
    def _mixed_fit(self) -> tuple[float, float, float] | None:
        """(seconds per query block of the longest piece, per key tile of the row's context, fixed) of one decode
        row in a mixed step, or None without the profile's mixed points. Profiles made before 2026-12-04 measured
        the decode rows inside the prefill kernel, whose grid is (query blocks of the longest piece, heads,
        sequences): a row got as many programs as the longest piece has query blocks, all but one exiting at
        once, its one real program walking its paged prefix. Since then the engine serves them with the paged
        decode kernel (afsplit/ops.py `attention`) and profile_measure.measure_mixed measures that, so a new
        profile fits the per-block term to ~0 and the per-tile and fixed terms to the decode kernel's cost."""
        sec = self.profile.get("attention_mixed") or {}
        pts, k = sec.get("points") or [], sec.get("decodes", 0)
        if len(pts) < 3 or k <= 0:
            return None
        p = self.profiled
        bm, bn = self.prefill_tiles
        rows, ys = [], []
        for q in pts:  # what k rows add beyond the piece, less their share of the GEMMs and per-token kernels
            base = self._prefill_gpu_base(p, q["prompt_len"] + k) - self._prefill_gpu_base(p, q["prompt_len"])
            rows.append([math.ceil(q["prompt_len"] / bm), math.ceil(q["decode_ctx"] / bn), 1.0])
            ys.append(max(0.0, ((q["ms"] - q["alone_ms"]) * MS - base) / k))
        try:
            return fit_nonneg(rows, ys)
        except ValueError:
            return None

    @property
    def has_mixed(self) -> bool:
        return self._mixed_fit is not None

    def mixed_decode_row(self, longest_piece: int, ctx: float) -> float:
        """GPU seconds one decode row (context `ctx`) adds to a mixed step's attention kernel whose longest
        prompt piece has `longest_piece` tokens (0 without the mixed points); other shapes scale the profiled
        model's coefficients by their query heads (programs) and head size (the prefix loop's work)."""
        fit = self._mixed_fit
        if fit is None:
            return 0.0
        per_block, per_tile, fixed = fit
        bm, bn = self.prefill_tiles
        heads = self.shape.num_heads / self.profiled.num_heads
        dim = self.shape.head_dim / self.profiled.head_dim
        return heads * (per_block * math.ceil(max(1, longest_piece) / bm) + dim * per_tile * math.ceil(ctx / bn)
                        + fixed)

    @cached_property
    def moe_roof(self) -> Roofline:
        p, sec = self.profiled, self.profile["moe"]
        pts = []
        for s, row in zip(sec["experts_per_rank"], sec["ms"]):
            for n, ms in zip(sec["pairs"], row):
                pts.append((touched_experts(s, n) * p.expert_bytes, p.expert_flops(n), ms * MS))
        return fit_roofline(pts)

    @cached_property
    def _head_c(self) -> float:
        p, sec = self.profiled, self.profile["head"]
        res = sorted(ms * MS - self.gemm_time(p.head_bytes, 2.0 * b * p.head_bytes / p.itemsize)
                     for b, ms in zip(sec["batch"], sec["ms"]))
        return max(0.0, res[len(res) // 2])

    def fits(self) -> dict:
        c_att, per_token, s_kv = self._attn_fit
        host, s_fl = self._prefill_fit
        return {"gemm": self.gemm.as_dict(), "moe": self.moe_roof.as_dict(),
                "attention_decode": {"c_us": c_att * 1e6, "per_token_ns": per_token * 1e9,
                                     "kv_GBps": 1e-9 / s_kv if s_kv else math.inf},
                "attention_prefill": {"eager_host_us": host * 1e6, "attn_TFLOPs": 1e-12 / s_fl if s_fl else math.inf,
                                      "tiles": list(self.prefill_tiles)},
                "head_c_us": self._head_c * 1e6,
                "mixed_decode_row_us": (None if self._mixed_fit is None else
                                        dict(zip(("per_query_block", "per_key_tile", "fixed"),
                                                 (v * 1e6 for v in self._mixed_fit))))}

    # -- rooflines in the target shape ---------------------------------------------------------

    def _roof_attention(self, shape: ModelShape, b: float, ctx: float) -> float:
        c, per_token, s_kv = self._attn_fit
        _, s_fl = self._prefill_fit
        kv = b * ctx * shape.kv_bytes_per_token_layer * s_kv
        fl = b * ctx * shape.attn_flops_per_pair_decode * s_fl
        return (c + self.gemm_time(shape.attention_layer_weight_bytes, shape.attention_gemm_flops(b))
                + per_token * b * shape.hidden / self.profiled.hidden + max(kv, fl))

    def _roof_moe(self, shape: ModelShape, slots: float, pairs: float) -> float:
        if pairs <= 0:
            return 0.0
        return self.moe_roof(touched_experts(slots, pairs) * shape.expert_bytes, shape.expert_flops(pairs))

    def _roof_head(self, shape: ModelShape, b: float) -> float:
        return self._head_c + self.gemm_time(shape.head_bytes, 2.0 * b * shape.head_bytes / shape.itemsize)

    # -- the blocks ----------------------------------------------------------------------------

    @cached_property
    def _tables(self):
        pr = self.profile
        head = pr["head"]
        return (_table2(pr["attention_decode"], "batch", "context"), _table2(pr["moe"], "experts_per_rank", "pairs"),
                _table1(head["batch"], head["ms"]))

    def attention_decode(self, rows: float, ctx: float) -> float:
        """One MoE layer's attention side for `rows` decode rows at mean context `ctx`."""
        if rows <= 0:
            return 0.0
        roof = lambda b, c: self._roof_attention(self.shape, b, c)  # noqa: E731
        return anchored(self._tables[0], roof, rows, ctx) if self.matched else roof(rows, ctx)

    def dense_layer(self, rows: float, ctx: float) -> float:
        """A non-MoE layer: the attention side plus the dense MLP, minus the router and shared expert."""
        s = self.shape
        extra = self.gemm_time(s.dense_layer_weight_bytes - s.attention_layer_weight_bytes,
                               s.dense_gemm_flops(rows) - s.attention_gemm_flops(rows))
        return self.attention_decode(rows, ctx) + max(0.0, extra)

    def attention_prefill(self, tokens: float, tile_pairs: float) -> float:
        """GPU seconds of one eager chunk's attention side of one layer (prefill pieces and the decodes of a
        mixed step together): `tokens` rows, `tile_pairs` (query, key) pairs of the prefill kernel's tiles
        (fitting.flash_tile_pairs). Its host launches are the eager layer's (eager_layer_host)."""
        if tokens <= 0:
            return 0.0
        _, s_fl = self._prefill_fit
        return self._prefill_gpu_base(self.shape, tokens) + tile_pairs * self.shape.attn_flops_per_pair_prefill * s_fl

    def moe(self, pairs: float, slots: float) -> float:
        """Fused MoE on one expert rank: `pairs` (token, expert) assignments over `slots` local experts."""
        if pairs <= 0:
            return 0.0
        roof = lambda s, n: self._roof_moe(self.shape, s, n)  # noqa: E731
        return anchored(self._tables[1], roof, slots, pairs) if self.matched else roof(slots, pairs)

    def head(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        roof = lambda b: self._roof_head(self.shape, b)  # noqa: E731
        return anchored(self._tables[2], roof, rows) if self.matched else roof(rows)

    # -- whole-system terms --------------------------------------------------------------------

    @cached_property
    def system_section(self) -> dict:
        """The profile's ``system`` section, refitted from its raw points when it has them (system_runs.fit_system:
        the estimator of this version applies to older profiles too)."""
        sec = self.profile.get("system", {})
        pts, depths = sec.get("points"), sec.get("depths")
        if not pts or not depths or len(depths) != 2:
            return sec
        from afsplit.planner.step_model import bucket
        from afsplit.planner.system_runs import FULL, SystemPlan, fit_system, points_from_json

        wl = sec.get("workload", {})
        plan = SystemPlan(depths=tuple(depths), input_len=wl.get("input_len", FULL.input_len),
                          output_len=wl.get("output_len", FULL.output_len),
                          eager_batch=sec.get("eager_batch", FULL.eager_batch),
                          context_batch=sec.get("context_batch", FULL.context_batch),
                          long_input_len=sec.get("long_input_len", FULL.long_input_len))
        own = self if self.matched else BlockTimes(self.profile, self.profiled)
        p, ctx = own.shape, plan.mean_context

        def layer_table(b):
            return own.attention_decode(bucket(b), ctx) + own.moe(b * p.top_k, p.num_experts)

        eng, rt, rt_eager, rt_gap = points_from_json(pts)
        return {**sec, **fit_system(eng, rt, layer_table, own.head, plan, rt_eager, own.attention_decode, rt_gap)}

    @cached_property
    def _system_tables(self) -> dict:
        out = {}
        for mode, sec in self.system_section.items():
            if not isinstance(sec, dict) or "batch" not in sec:
                continue
            for key, val in sec.items():
                if key != "batch" and isinstance(val, list) and len(val) == len(sec["batch"]):
                    scale = 1.0 if key == "layer_scale" else MS
                    # host work per sequence grows with the batch: continue the overhead's slope
                    out[(mode, key)] = _table1(sec["batch"], val, scale, extrapolate=key == "step_overhead_ms")
        return out

    def _system(self, mode: str, key: str, default: float, rows: float) -> float:
        table = self._system_tables.get((mode, key))
        return default if table is None else max(0.0, table(rows))

    def step_overhead(self, mode: str, rows: float) -> float:
        """Per-step time outside the layers (host, embedding, sampling, control plane), `mode` engine|runtime.

        A runtime rank runs the engine's step (scheduler, inputs, sampler) plus the coordinator's broadcast
        and gather, so its overhead is the engine's plus the runtime's measured excess over it (>= 0,
        interpolated between the runtime's batches, flat beyond them)."""
        engine = self._system("engine", "step_overhead_ms", 0.0, rows)
        if mode == "engine":
            return engine
        table = self._system_tables.get(("runtime", "step_overhead_ms"))
        if table is None:
            return engine
        if ("engine", "step_overhead_ms") not in self._system_tables:
            return max(0.0, table(rows))
        xs = table.xs
        excess = [max(0.0, y - self._system("engine", "step_overhead_ms", 0.0, x)) for x, y in zip(xs, table.ys)]
        return engine + Table1D(xs, tuple(excess))(rows)

    @cached_property
    def system_context(self) -> float | None:
        """Mean decode context of the whole-run measurements (what layer_scale was measured at), or None."""
        wl = self.system_section.get("workload")
        return wl["input_len"] + wl["output_len"] / 2 if wl else None

    @cached_property
    def _in_model_layer(self):
        """(measured in-model layer ms per batch as a table, the isolated layer of the profiled model), or None."""
        sec = self.system_section.get("engine", {})
        if not sec.get("layer_ms") or self.system_context is None:
            return None
        from afsplit.planner.step_model import bucket

        own = self if self.matched else BlockTimes(self.profile, self.profiled)
        p, ctx = own.shape, self.system_context

        def isolated(b: float) -> float:
            return own.attention_decode(bucket(math.ceil(b)), ctx) + own.moe(b * p.top_k, p.num_experts)

        return _table1(sec["batch"], sec["layer_ms"]), isolated

    def layer_scale(self, rows: float) -> float:
        """In-model layer time / the sum of its blocks' isolated times (engine, CUDA graphs, at system_context).

        Between the measured batches the measured *time* is interpolated and divided by the isolated time
        at `rows` (the isolated MoE time rises steeply at small batches, so interpolating the ratio would
        not follow the measurement); beyond them the end batch's ratio holds."""
        got = self._in_model_layer
        if got is None:
            return self._system("engine", "layer_scale", 1.0, rows) or 1.0
        table, isolated = got
        b = table.clamp(max(1.0, rows))
        iso = isolated(b)
        return table(b) / iso if iso > 0 else 1.0

    def in_model_attention(self, rows: float, ctx: float, scale: float) -> float:
        """One MoE layer's attention side in the model: the in-model correction applies to what the whole runs
        measured (attention at system_context); the change with context is the isolated kernel's."""
        at = self.attention_decode(rows, ctx)
        c0 = self.system_context
        if c0 is None:
            return at * scale
        base = self.attention_decode(rows, c0)
        factor = self.system_section.get("engine", {}).get("context_factor", 1.0)
        return max(0.0, base * scale + (at - base) * factor)

    def exchange_call(self, rows: float) -> float:
        """Fixed cost of one dispatch or one combine call on a rank (measured on one colocated rank)."""
        return self._system("runtime", "exchange_call_ms", 0.0, rows)

    def _eager_term(self, mode: str, key: str) -> float:
        sec = self.system_section
        for m in (mode, "engine"):  # the runtime's own where measured, else the engine's
            if key in sec.get(m, {}):
                return sec[m][key] * MS
        return 0.0

    def admit_per_prompt_token(self, mode: str = "engine") -> float:
        """Wall time outside the steps per prompt token of a run (the driver's and, in the runtime, the
        coordinator's copy of each request for its attention rank), measured in mode's own runs only."""
        return self.system_section.get(mode, {}).get("admit_us_per_prompt_token", 0.0) * 1e-6

    def eager_layer_host(self, mode: str = "engine") -> float:
        """Host time to launch one layer eagerly (a floor for layers that run outside CUDA graphs)."""
        return self._eager_term(mode, "eager_layer_ms")

    def static_layer_host(self, mode: str = "engine") -> float:
        """Host time per layer of a decode bucket's first visit (and of a capture's launches): the static path
        (static_decode.py) run eagerly. Measured in the engine's graphed runs where their tails visit new
        buckets; the 1-rank runtime runs the same static path (plus a router and dispatch/combine calls that
        move nothing), so it uses the engine's; without it, the mode's graphs-off eager layer."""
        sec = self.system_section.get("engine", {})
        if "static_eager_layer_ms" in sec:
            return sec["static_eager_layer_ms"] * MS
        return self.eager_layer_host(mode)

    def eager_step_extra(self, mode: str = "engine") -> float:
        """What an eager step costs beyond a graphed one outside its layers (embedding, lm_head and sampler
        launched one by one; per-sequence metadata)."""
        return self._eager_term(mode, "eager_step_extra_ms")

    def control(self, ranks: int) -> float:
        """Extra control-plane time per step beyond one rank's (broadcast/gather grow with log2 ranks)."""
        return self.assumed["control_us_per_doubling"] * 1e-6 * math.log2(max(1, ranks))

    def links(self, inter_gbps: float | None = None, inter_latency_us: float | None = None) -> tuple[Link, Link]:
        """(intra-node, inter-node) links; the inter-node one from the command line when given."""
        lk = self.profile["links"]
        intra = Link(lk["intra"]["alpha_us"] * 1e-6, lk["intra"]["GBps"] * 1e9, lk["intra"].get("gap_us", 0.0) * 1e-6)
        inter = Link((inter_latency_us if inter_latency_us is not None else lk["inter"]["alpha_us"]) * 1e-6,
                     (inter_gbps / 8 if inter_gbps is not None else lk["inter"]["GBps"]) * 1e9,
                     lk["inter"].get("gap_us", DEFAULT_INTER_GAP_US) * 1e-6)
        return intra, inter

    def balancer_max_over_mean(self, expert_ranks: int, policy: str = "replicas") -> float:
        """The balancer's measured max/mean expert-rank load (interpolated in log2 ranks, flat beyond);
        policy replicas: least-loaded selection over replicas, none: round robin."""
        sec = self.profile.get("balancer")
        key = "max_over_mean" if policy == "replicas" else "round_robin"
        if not sec or key not in sec or expert_ranks <= 1:
            return 1.0
        xs = [math.log2(max(1, n)) for n in sec["expert_ranks"]]
        return max(1.0, Table1D(tuple(xs), tuple(sec[key]))(math.log2(expert_ranks)))

    def spare_slots(self, num_experts: int, expert_ranks: int, policy: str) -> int:
        """Replica slots per expert rank the balancer's measurement had (0 without replicas or with one rank)."""
        if policy != "replicas" or expert_ranks <= 1:
            return 0
        frac = self.profile.get("balancer", {}).get("spare_fraction", 0.0)
        return math.ceil(frac * num_experts / expert_ranks)

    @property
    def gpu_memory_bytes(self) -> float:
        return float(self.profile.get("gpu_memory_gb", 0.0)) * 1e9

    def describe(self) -> str:
        how = "tables of this model" if self.matched else (
            f"roofline fits transferred from {self.profile['model'].get('name', '?')}'s tables")
        return f"profile {self.profile.get('device', '?')} ({self.profile.get('kind', '?')}): {how}"
