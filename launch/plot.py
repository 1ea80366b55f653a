"""Plots of sweep results (launch/sweep.py JSON lines) as PNG files.

    python3 launch/plot.py docs/benchmarks/e2e-cpu/sweep.jsonl --out-dir docs/benchmarks/e2e-cpu

* ``pareto.png``: tokens/s per GPU against tokens/s per user (1000 / median TPOT), one line per
  series (split, micro-batches, transport, replicas), batch sizes annotated, one panel per workload;
  the upper-right points are the better ones, the dashed line is the frontier over all series.
* ``tpot_vs_batch.png``: median TPOT against batch size (log2), per series.
* ``time_split.png``: per-layer time split (ms per MoE layer per rank and step) as stacked bars, for
  attention ranks and expert ranks (DeepSpeed: attention vs its whole MoE layer).

Only points with ``"status": "ok"`` are drawn; failed points are counted in the titles.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASE_ORDER = ["attention", "dispatch", "experts", "combine", "moe", "idle"]
PHASE_COLORS = {"attention": "#4c72b0", "dispatch": "#dd8452", "experts": "#55a868", "combine": "#c44e52",
                "moe": "#8172b3", "idle": "#bbbbbb"}


def load(paths) -> list[dict]:
    recs = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                recs.append(json.loads(line))
    return recs


def series_label(r: dict) -> str:
    p = r.get("params", {})
    parts = [r.get("split", p.get("split", "?"))]
    if "micro_batches" in p:
        parts.append(f"m={p['micro_batches']}")
    for key, default in (("transport", "direct"), ("replicas", "none")):
        if key in p and str(p[key]) != default:
            parts.append(str(p[key]))
    return " ".join(parts)


def workload(r: dict) -> str:
    p = r.get("params", {})
    return f"in {p.get('input_len')} / out {p.get('output_len')}"


def _grouped(recs):
    """workload -> series label -> records sorted by batch size (ok points only)."""
    out = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("status") == "ok" and r.get("median_tpot_ms"):
            out[workload(r)][series_label(r)].append(r)
    for w in out.values():
        for s in w.values():
            s.sort(key=lambda r: r["params"]["batch_size"])
    return out


def _panels(n: int, title: str, width: float = 6.5, height: float = 4.8):
    fig, axes = plt.subplots(1, max(1, n), figsize=(width * max(1, n), height), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _line_style(rec) -> str:
    """AF solid, colocated dotted, DeepSpeed dashed."""
    return {"deepspeed": "--", "colocated": ":"}.get(rec.get("mode"), "-")


def _finish_panel(ax, title: str) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(recs) -> str:
    ok = [r for r in recs if r.get("status") == "ok"]
    bad = len(recs) - len(ok)
    head = ok[0] if ok else (recs[0] if recs else {})
    t = f"{head.get('model', '?')} on {head.get('device', '?')}, commit {head.get('git_commit', '?')}"
    return t + (f" ({bad} failed point(s) not shown)" if bad else "")


def _frontier(points):
    """Pareto frontier (maximise both coordinates), sorted by x."""
    best, front = -math.inf, []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot_pareto(recs, out: Path) -> Path:
    groups = _grouped(recs)
    fig, axes = _panels(len(groups), "Throughput per GPU vs per-user speed\n" + _title(recs))
    for ax, (w, series) in zip(axes, sorted(groups.items())):
        every = []
        for label, rs in sorted(series.items()):
            xs = [1000.0 / r["median_tpot_ms"] for r in rs]
            ys = [r["tokens_per_s_per_gpu"] for r in rs]
            every += list(zip(xs, ys))
            style = _line_style(rs[0])
            ax.plot(xs, ys, style, marker="o", label=label)
            for x, y, r in zip(xs, ys, rs):
                ax.annotate(str(r["params"]["batch_size"]), (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        front = _frontier(every)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=0.8, alpha=0.4, ls="--")
        ax.set_xlabel("tokens/s per user (1000 / median TPOT ms)")
        ax.set_ylabel("output tokens/s per GPU")
        _finish_panel(ax, w)
    return _save(fig, out / "pareto.png")


def plot_tpot(recs, out: Path, tpot_line: float | None = None) -> Path:
    groups = _grouped(recs)
    fig, axes = _panels(len(groups), "Median TPOT vs batch size\n" + _title(recs))
    for ax, (w, series) in zip(axes, sorted(groups.items())):
        for label, rs in sorted(series.items()):
            style = _line_style(rs[0])
            ax.plot([r["params"]["batch_size"] for r in rs], [r["median_tpot_ms"] for r in rs], style, marker="o",
                    label=label)
        if tpot_line:
            ax.axhline(tpot_line, color="r", lw=0.8, ls="--", label=f"TPOT {tpot_line:g} ms")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (concurrent sequences, all ranks)")
        ax.set_ylabel("median TPOT (ms)")
        _finish_panel(ax, w)
    return _save(fig, out / "tpot_vs_batch.png")


def plot_time_split(recs, out: Path, max_bars: int = 24) -> Path:
    ok = [r for r in recs if r.get("status") == "ok" and r.get("per_layer_ms")]
    if len(ok) > max_bars:  # many points: the largest batch of each series and workload
        last = {}
        for r in ok:
            last[(workload(r), series_label(r))] = r
        ok = list(last.values())
    ok.sort(key=lambda r: (workload(r), series_label(r), r["params"]["batch_size"]))
    roles = [role for role in ("attention", "expert") if any(role in r["per_layer_ms"] for r in ok)] or ["attention"]
    fig, axes = plt.subplots(len(roles), 1, figsize=(max(7.0, 0.55 * len(ok) + 2), 3.8 * len(roles)), squeeze=False)
    fig.suptitle("Per-layer time split (ms per MoE layer, per rank and step)\n" + _title(recs))
    labels = [f"{series_label(r)} B={r['params']['batch_size']}" + (f"\n{workload(r)}" if len({workload(x) for x in ok}) > 1
                                                                     else "") for r in ok]
    for ax, role in zip(axes[:, 0], roles):
        bottom = [0.0] * len(ok)
        phases = [p for p in PHASE_ORDER if any(p in r["per_layer_ms"].get(role, {}) for r in ok)]
        phases += sorted({p for r in ok for p in r["per_layer_ms"].get(role, {})} - set(phases))
        for ph in phases:
            vals = [r["per_layer_ms"].get(role, {}).get(ph, 0.0) for r in ok]
            ax.bar(range(len(ok)), vals, bottom=bottom, label=ph, color=PHASE_COLORS.get(ph))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel(f"{role} ranks: ms")
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "time_split.png")


def plot_all(paths, out_dir, tpot_line: float | None = None) -> list[Path]:
    recs = load(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not any(r.get("status") == "ok" for r in recs):
        raise SystemExit(f"plot: no successful points in {', '.join(map(str, paths))}")
    return [plot_pareto(recs, out), plot_tpot(recs, out, tpot_line), plot_time_split(recs, out)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot sweep results (PNG).")
    ap.add_argument("jsonl", nargs="+", help="sweep output(s) of launch/sweep.py")
    ap.add_argument("--out-dir", default=".", help="where to write pareto.png, tpot_vs_batch.png, time_split.png")
    ap.add_argument("--tpot-line", type=float, default=None, help="draw a TPOT limit (ms) on the TPOT plot")
    args = ap.parse_args(argv)
    for p in plot_all(args.jsonl, args.out_dir, args.tpot_line):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
