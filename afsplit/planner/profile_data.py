"""The profile JSON (written by ``afsplit profile``) and the building-block times read from it.

Format ``afsplit-profile/1``; every time is in milliseconds, per layer unless said::

    device, gpu_memory_gb, date, commit, torch, kind ("measured" | "synthetic"), note
    model:             the profiled model's shape signature (ModelShape.signature()) and name
    attention_decode:  {batch: [B...], context: [C...], ms: [[...] per B]}   attention block + router
                       (+ shared expert) of one MoE layer, B decode rows of context C, as in a CUDA graph
    attention_prefill: {points: [{tokens, s2, kv_tokens, ms}]}   one eager chunk of `tokens` tokens;
                       s2 = sum over its sequences of n * (prefix + (n + 1) / 2) (attention pairs)
    head:              {batch: [...], ms: [...]}                     final norm + lm_head for B rows (per step)
    moe:               {experts_per_rank: [S...], pairs: [N...], ms: [[...] per S]}   fused MoE of N
                       (token, expert) pairs spread uniformly over S local experts
    gemm:              {points: [{weight_bytes, flops, ms}]}        dense GEMMs (roofline of projections)
    links:             {intra: {alpha_us, GBps, gap_us, source}, inter: {...}}   one stage of n messages on
                       a link = alpha + n * gap + bytes / GBps
    system:            {engine: {batch, step_overhead_ms, layer_scale, eager_layer_ms},
                        runtime: {batch, step_overhead_ms, exchange_call_ms}}   measured in whole runs of
                       shallow copies of the model (see system_runs.py)
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
from afsplit.planner.fitting import Roofline, Table1D, Table2D, anchored, fit_linear, fit_roofline, touched_experts
from afsplit.planner.shapes import ModelShape

FORMAT = "afsplit-profile/1"
REQUIRED = ("model", "attention_decode", "attention_prefill", "head", "moe", "gemm", "links")
DEFAULT_ASSUMED = {"memory_reserve_gb": 6.0, "memory_utilization": 0.95, "control_us_per_doubling": 30.0}
MS = 1e-3
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
    def _attn_fit(self) -> tuple[float, float]:
        """(c, seconds per KV byte) of the decode table once its GEMMs are taken out."""
        p, sec = self.profiled, self.profile["attention_decode"]
        pts = []
        for b, row in zip(sec["batch"], sec["ms"]):
            g = self.gemm_time(p.attention_layer_weight_bytes, p.attention_gemm_flops(b))
            for ctx, ms in zip(sec["context"], row):
                pts.append((b * ctx * p.kv_bytes_per_token_layer, max(ms * MS - g, 1e-7)))
        return fit_linear(pts)

    @cached_property
    def _prefill_fit(self) -> tuple[float, float]:
        """(c, seconds per attention FLOP) of eager prefill chunks once their GEMMs are taken out."""
        p = self.profiled
        pts = []
        for q in self.profile["attention_prefill"]["points"]:
            g = self.gemm_time(p.attention_layer_weight_bytes, p.attention_gemm_flops(q["tokens"]))
            pts.append((q["s2"] * p.attn_flops_per_pair_prefill, max(q["ms"] * MS - g, 1e-7)))
        return fit_linear(pts)

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
        c_att, s_kv = self._attn_fit
        c_pf, s_fl = self._prefill_fit
        return {"gemm": self.gemm.as_dict(), "moe": self.moe_roof.as_dict(),
                "attention_decode": {"c_us": c_att * 1e6, "kv_GBps": 1e-9 / s_kv if s_kv else math.inf},
                "attention_prefill": {"c_us": c_pf * 1e6, "attn_TFLOPs": 1e-12 / s_fl if s_fl else math.inf},
                "head_c_us": self._head_c * 1e6}

    # -- rooflines in the target shape ---------------------------------------------------------

    def _roof_attention(self, shape: ModelShape, b: float, ctx: float) -> float:
        c, s_kv = self._attn_fit
        _, s_fl = self._prefill_fit
        kv = b * ctx * shape.kv_bytes_per_token_layer * s_kv
        fl = b * ctx * shape.attn_flops_per_pair_decode * s_fl
        return c + self.gemm_time(shape.attention_layer_weight_bytes, shape.attention_gemm_flops(b)) + max(kv, fl)

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

    def attention_prefill(self, tokens: float, s2: float, kv_tokens: float) -> float:
        """One eager chunk (prefill pieces and decodes together) on the attention side of one layer."""
        if tokens <= 0:
            return 0.0
        s = self.shape
        c, s_fl = self._prefill_fit
        _, s_kv = self._attn_fit
        attn = max(s2 * s.attn_flops_per_pair_prefill * s_fl, kv_tokens * s.kv_bytes_per_token_layer * s_kv)
        return c + self.gemm_time(s.attention_layer_weight_bytes, s.attention_gemm_flops(tokens)) + attn

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
    def _system_tables(self) -> dict:
        out = {}
        for mode, sec in self.profile.get("system", {}).items():
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
        """Per-step time outside the layers (host, embedding, sampling, control plane), `mode` engine|runtime."""
        return self._system(mode, "step_overhead_ms", 0.0, rows)

    def layer_scale(self, rows: float) -> float:
        """Measured in-model layer time / the sum of its blocks' isolated times (engine, CUDA graphs)."""
        return self._system("engine", "layer_scale", 1.0, rows) or 1.0

    def exchange_call(self, rows: float) -> float:
        """Fixed cost of one dispatch or one combine call on a rank (measured on one colocated rank)."""
        return self._system("runtime", "exchange_call_ms", 0.0, rows)

    def eager_layer_host(self) -> float:
        """Host time to launch one layer eagerly (a floor for layers that run outside CUDA graphs)."""
        return self.profile.get("system", {}).get("engine", {}).get("eager_layer_ms", 0.0) * MS

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
