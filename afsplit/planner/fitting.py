"""Reading measured tables: piecewise-linear interpolation, and roofline fits for what lies beyond them.

A measured table is exact where it was measured. Outside its grid (a larger batch, another
model's shapes) the planner uses a roofline ``c + max(bytes / BW, flops / F)`` fitted to the same
table; :func:`anchored` scales that roofline so that it meets the table at the grid's edge.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Sequence


def _bracket(xs: Sequence[float], x: float) -> tuple[int, float]:
    """(i, w): x lies between xs[i] and xs[i+1] at fraction w (clamped to the ends)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 2, 1.0
    i = bisect.bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class Table1D:
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    extrapolate: bool = False  # beyond the ends: continue the end segments' slopes (else clamp)

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0]
        if self.extrapolate and (x < xs[0] or x > xs[-1]):
            i = 0 if x < xs[0] else len(xs) - 2
            slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
            return ys[i] + slope * (x - xs[i])
        i, w = _bracket(xs, x)
        return ys[i] + w * (ys[i + 1] - ys[i])

    def clamp(self, x: float) -> float:
        return min(max(x, self.xs[0]), self.xs[-1])


@dataclass(frozen=True)
class Table2D:
    """z[i][j] at (xs[i], ys[j]); bilinear inside, clamped outside (see :func:`anchored`)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    z: tuple[tuple[float, ...], ...]

    def __call__(self, x: float, y: float) -> float:
        i, u = _bracket(self.xs, x)
        j, v = _bracket(self.ys, y)
        z = self.z
        i1 = min(i + 1, len(self.xs) - 1)
        j1 = min(j + 1, len(self.ys) - 1)
        return ((1 - u) * ((1 - v) * z[i][j] + v * z[i][j1]) + u * ((1 - v) * z[i1][j] + v * z[i1][j1]))

    def clamp(self, x: float, y: float) -> tuple[float, float]:
        return min(max(x, self.xs[0]), self.xs[-1]), min(max(y, self.ys[0]), self.ys[-1])


def anchored(table, roof: Callable[..., float], *args: float) -> float:
    """The table's value inside its grid; outside, the roofline scaled to meet the table at the edge."""
    edge = table.clamp(*args) if len(args) > 1 else (table.clamp(args[0]),)
    if tuple(edge) == tuple(args):
        return table(*args)
    base = roof(*edge)
    return table(*edge) * (roof(*args) / base if base > 0 else 1.0)


@dataclass(frozen=True)
class Roofline:
    """t = c + max(bytes / bw, flops / flops_rate) (seconds, bytes/s, FLOP/s)."""

    c: float
    bw: float
    flops_rate: float

    def __call__(self, nbytes: float, flops: float) -> float:
        return self.c + max(nbytes / self.bw, flops / self.flops_rate)

    def as_dict(self) -> dict:
        return {"c_us": self.c * 1e6, "GBps": self.bw / 1e9, "TFLOPs": self.flops_rate / 1e12}


def fit_roofline(points: Sequence[tuple[float, float, float]], bw_range=(1e9, 2e13),
                 flops_range=(1e11, 5e15)) -> Roofline:
    """Fit (c, bw, flops_rate) to points (bytes, flops, seconds) by least relative squares.

    Coarse-to-fine search over bw and flops_rate (log scale, vectorised), with c >= 0 solved in
    closed form for each pair and capped below the smallest time."""
    import numpy as np

    pts = np.array([(b, f, t) for b, f, t in points if t > 0], dtype=np.float64).reshape(-1, 3)
    if not len(pts):
        raise ValueError("fit_roofline: no points with a positive time")
    b, f, t = pts[:, 0], pts[:, 1], pts[:, 2]
    lo_b, hi_b = np.log(bw_range[0]), np.log(bw_range[1])
    lo_f, hi_f = np.log(flops_range[0]), np.log(flops_range[1])
    w = 1.0 / (t * t)
    for _ in range(4):
        bws = np.exp(np.linspace(lo_b, hi_b, 32))[:, None, None]
        frs = np.exp(np.linspace(lo_f, hi_f, 32))[None, :, None]
        r = np.maximum(b / bws, f / frs)  # [32, 32, n]
        c = ((t - r) * w).sum(-1, keepdims=True) / w.sum()
        c = np.clip(c, 0.0, 0.999 * t.min())
        err = (((c + r - t) / t) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        db, df = (hi_b - lo_b) / 31, (hi_f - lo_f) / 31
        best = (float(c[i, j, 0]), float(bws[i, 0, 0]), float(frs[0, j, 0]))
        lo_b, hi_b = np.log(best[1]) - 2 * db, np.log(best[1]) + 2 * db
        lo_f, hi_f = np.log(best[2]) - 2 * df, np.log(best[2]) + 2 * df
    return Roofline(*best)


def fit_linear(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(c, s) >= 0 with t ~ c + s * x by least relative squares (x, t) pairs."""
    pts = [(x, t) for x, t in points if t > 0]
    if not pts:
        return 0.0, 0.0
    w = [1.0 / (t * t) for _, t in pts]
    sw = sum(w)
    sx = sum(wi * x for wi, (x, _) in zip(w, pts))
    st = sum(wi * t for wi, (_, t) in zip(w, pts))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, pts))
    sxt = sum(wi * x * t for wi, (x, t) in zip(w, pts))
    det = sw * sxx - sx * sx
    if det <= 1e-300:
        return st / sw, 0.0
    s = (sw * sxt - sx * st) / det
    c = (st - s * sx) / sw
    if s < 0:
        return st / sw, 0.0
    if c < 0:
        return 0.0, sxt / sxx if sxx > 0 else 0.0
    return c, s


def touched_experts(slots: float, pairs: float) -> float:
    """Expected distinct experts among `slots` hit by `pairs` uniform random assignments."""
    if slots <= 1:
        return min(1.0, pairs) if slots > 0 else 0.0
    return slots * (1.0 - math.exp(pairs * math.log1p(-1.0 / slots)))


def fit_nonneg(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> tuple[float, ...]:
    """Coefficients a >= 0 with y ~ sum_k a_k x_k by least relative squares (weights 1 / y^2).

    Exact non-negative least squares for the few columns the planner fits: every subset of
    columns is solved unconstrained and the best solution without a negative coefficient wins."""
    import itertools

    import numpy as np

    pts = [(r, y) for r, y in zip(rows, ys) if y > 0]
    if not pts:
        raise ValueError("fit_nonneg: no points with a positive value")
    x = np.array([r for r, _ in pts], dtype=np.float64)
    y = np.array([v for _, v in pts], dtype=np.float64)
    xw, yw = x / y[:, None], np.ones_like(y)
    k = x.shape[1]
    best, best_err = np.zeros(k), float(np.sum(yw ** 2))
    for n in range(1, k + 1):
        for cols in itertools.combinations(range(k), n):
            sol, *_ = np.linalg.lstsq(xw[:, cols], yw, rcond=None)
            if (sol < 0).any():
                continue
            a = np.zeros(k)
            a[list(cols)] = sol
            err = float(np.sum((xw @ a - yw) ** 2))
            if err < best_err - 1e-15:
                best, best_err = a, err
    return tuple(float(v) for v in best)


def fit_floor_or_rate(points: Sequence[tuple[float, float, float]], rate_range=(1e-17, 1e-12)) -> tuple[float, float]:
    """(h, s) with t ~ max(h, g + s * x) by least squares of log t, from points (g, x, t).

    For calls timed eagerly (host launches overlap the GPU work): a call takes the longer of its
    host time h (the same for every point) and its GPU time g + s x, g known, s >= 0 fitted.
    Coarse-to-fine grid over log h and log s."""
    import numpy as np

    pts = np.array([p for p in points if p[2] > 0], dtype=np.float64).reshape(-1, 3)
    if not len(pts):
        raise ValueError("fit_floor_or_rate: no points with a positive time")
    g, x, t = pts[:, 0], pts[:, 1], pts[:, 2]
    lo_h, hi_h = np.log(t.min() * 0.25), np.log(t.max())
    lo_s, hi_s = np.log(rate_range[0]), np.log(rate_range[1])
    best = (float(t.min()), 0.0)
    for _ in range(5):
        hs = np.exp(np.linspace(lo_h, hi_h, 48))[:, None, None]
        ss = np.exp(np.linspace(lo_s, hi_s, 48))[None, :, None]
        model = np.maximum(hs, g + ss * x)
        err = (np.log(model / t) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        dh, ds = (hi_h - lo_h) / 47, (hi_s - lo_s) / 47
        best = (float(hs[i, 0, 0]), float(ss[0, j, 0]))
        lo_h, hi_h = np.log(best[0]) - 2 * dh, np.log(best[0]) + 2 * dh
        lo_s, hi_s = np.log(best[1]) - 2 * ds, np.log(best[1]) + 2 * ds
    return best


def flash_tile_pairs(new: int, prefix: int, block_m: int, block_n: int) -> float:
    """(query row, key) pairs the prefill kernel computes for one sequence's chunk of `new` tokens
    after `prefix` cached ones (kernels/flash_attention.py): every query block of block_m rows reads
    the prefix in block_n-key tiles, the chunk's keys left of its diagonal and the diagonal tile(s),
    masked or not. A decode row in a mixed step thus costs a full block_m-row tile per key tile."""
    if new <= 0:
        return 0.0
    q_blocks = -(-new // block_m)
    prefix_keys = -(-prefix // block_n) * block_n
    per = block_m // block_n if block_m >= block_n else 1
    # query block j (0-based) reads chunk keys up to min((j + 1) block_m, new), rounded up to block_n
    chunk_tiles = per * (q_blocks - 1) * q_blocks / 2 + -(-new // block_n)
    return float(block_m * (q_blocks * prefix_keys + chunk_tiles * block_n))
