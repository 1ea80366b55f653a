"""The planner report: Pareto frontiers (TPOT vs tokens/s/GPU), AF vs colocated, per model and cluster size.

    python -m afsplit.planner.report --profile P.json [--profile-for mixtral-8x7b=M.json] \\
        --out-dir docs/benchmarks/planner-h200 [--gpus 8,16,64] [--models qwen3-30b-a3b,mixtral-8x7b,deepseek-v3]

writes ``pareto.png`` (one panel per model x cluster size: every feasible candidate's predicted
TPOT and tokens/s/GPU, AF and colocated frontiers), ``frontier.json`` (the frontiers, the best
candidates at each TPOT bound and the variants) and prints a markdown table of the AF gain at each
bound. Variants re-run the search with one assumption changed (exchange moving only routed rows;
a different fixed cost per exchange call; no expert replicas) to show what the gain depends on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BOUNDS_MS = (50.0, 100.0)
VARIANTS = {"padded exchange (runtime today)": {},
            "exact rows (counts, DeepEP-like)": {"exchange": "exact"},
            "padded, 0.18 ms per exchange call": {"exchange_call_ms": 0.18},
            "padded, no replicas (round robin)": {"balancer": "none"}}


def _planner(profile: dict, model: str, gpus: int, gpus_per_node: int, wl, exchange: str = "padded",
             exchange_call_ms: float | None = None, balancer: str = "replicas", inter_gbps: float = 400.0,
             inter_latency_us: float = 5.0):
    from afsplit.planner.profile_data import BlockTimes
    from afsplit.planner.search import Planner
    from afsplit.planner.shapes import resolve_shape
    from afsplit.planner.step_model import StepModel

    shape = resolve_shape(model, profile["model"].get("dtype", "bfloat16"))
    if exchange_call_ms is not None:
        # the planner refits system.points on reading; fix the fitted section, then change the one number
        fitted = BlockTimes(profile, shape).system_section
        profile = json.loads(json.dumps({**profile, "system": {k: v for k, v in fitted.items() if k != "points"}}))
        rt = profile["system"].setdefault("runtime", {"batch": [1]})
        rt["exchange_call_ms"] = [exchange_call_ms] * len(rt["batch"])
        rt.setdefault("step_overhead_ms", [0.0] * len(rt["batch"]))
    blocks = BlockTimes(profile, shape)
    sm = StepModel(blocks, *blocks.links(inter_gbps, inter_latency_us), exchange=exchange, balancer=balancer)
    return Planner(sm, gpus, gpus_per_node, wl)


def _point(c) -> dict:
    return {"layout": c.layout.label(), "instances": c.instances, "m": c.m, "transport": c.transport,
            "batch": c.batch, "tpot_ms": round(c.tpot_ms, 3), "tokens_per_s_per_gpu": round(c.tokens_per_s_per_gpu, 1),
            "bottleneck": c.result.bottleneck}


def best_at(points, bound_ms: float, kinds) -> dict | None:
    ok = [p for p in points if p.layout.kind in kinds and p.tpot_ms <= bound_ms]
    return _point(max(ok, key=lambda p: p.tokens_per_s_per_gpu)) if ok else None


def study(profiles: dict, models: list[str], gpus_list: list[int], gpus_per_node: int, wl) -> dict:
    """Every (model, cluster size, variant): frontiers and the best AF / colocated at each bound."""
    from afsplit.planner.search import instance_layouts, pareto

    out = {}
    for model in models:
        prof = profiles.get(model, profiles["default"])
        for gpus in gpus_list:
            key = f"{model}/{gpus}"
            entry = {"model": model, "gpus": gpus, "variants": {}}
            for vname, opts in VARIANTS.items():
                t0 = time.perf_counter()
                pl = _planner(prof, model, gpus, gpus_per_node, wl, **opts)
                pts = pl.all_points()
                v = {"points": len(pts), "seconds": round(time.perf_counter() - t0, 2)}
                if not pts:
                    # the reason of the largest colocated instance (all GPUs' memory, evenly shared)
                    layouts = sorted((lay for lay, _ in instance_layouts(gpus, gpus_per_node)),
                                     key=lambda lay: (-lay.gpus, lay.kind != "colocated"))
                    v["why_none"] = next(filter(None, (pl.layout_problem(lay) for lay in layouts)), ("", "?"))[1]
                af = [p for p in pts if p.layout.kind == "af"]
                co = [p for p in pts if p.layout.kind != "af"]
                v["frontier_af"] = [_point(p) for p in pareto(af)]
                v["frontier_colocated"] = [_point(p) for p in pareto(co)]
                for bound in BOUNDS_MS:
                    a, c = best_at(pts, bound, ("af",)), best_at(pts, bound, ("colocated", "engine"))
                    gain = a["tokens_per_s_per_gpu"] / c["tokens_per_s_per_gpu"] if a and c else None
                    v[f"tpot_{bound:g}"] = {"af": a, "colocated": c, "gain": gain}
                entry["variants"][vname] = v
            out[key] = entry
    return out


def plot(result: dict, models: list[str], gpus_list: list[int], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(gpus_list), figsize=(5.2 * len(gpus_list), 4.0 * len(models)),
                             squeeze=False)
    fig.suptitle(title)
    base = next(iter(VARIANTS))
    for i, model in enumerate(models):
        for j, gpus in enumerate(gpus_list):
            ax = axes[i][j]
            entry = result[f"{model}/{gpus}"]
            for vname, style in ((base, "-"), ("exact rows (counts, DeepEP-like)", ":")):
                v = entry["variants"][vname]
                for kind, color in (("af", "#c44e52"), ("colocated", "#4c72b0")):
                    fr = v[f"frontier_{kind}"]
                    if fr:
                        label = ("AF" if kind == "af" else "colocated") + ("" if vname == base else " (exact rows)")
                        ax.plot([p["tpot_ms"] for p in fr], [p["tokens_per_s_per_gpu"] for p in fr], style,
                                color=color, marker="o" if vname == base else None, ms=3, label=label)
            v = entry["variants"][base]
            if not v["frontier_af"] and not v["frontier_colocated"]:
                ax.text(0.5, 0.5, "does not fit:\n" + _wrap(v.get("why_none", "")), ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            g = v["tpot_50"]["gain"]
            ax.axvline(50, color="k", lw=0.7, ls="--")
            ax.set_title(f"{model}, {gpus} GPUs" + (f": AF {g:.2f}x at 50 ms" if g else ""), fontsize=9)
            ax.set_xlabel("predicted TPOT (ms)")
            ax.set_ylabel("tokens/s per GPU")
            ax.set_xlim(0, 200)
            ax.grid(alpha=0.3)
            if any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 48) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])


def markdown(result: dict) -> str:
    rows = ["| model | GPUs | variant | bound | best AF (tok/s/GPU, TPOT) | best colocated | AF gain |",
            "|---|---|---|---|---|---|---|"]
    for entry in result.values():
        for vname, v in entry["variants"].items():
            for bound in BOUNDS_MS:
                b = v[f"tpot_{bound:g}"]
                a, c = b["af"], b["colocated"]
                fa = f"{a['layout']} m={a['m']} B={a['batch']}: {a['tokens_per_s_per_gpu']:.0f} ({a['tpot_ms']:.1f} ms)" if a else "-"
                fc = f"{c['layout']} m={c['m']} B={c['batch']}: {c['tokens_per_s_per_gpu']:.0f} ({c['tpot_ms']:.1f} ms)" if c else "-"
                g = f"{b['gain']:.2f}x" if b["gain"] else "-"
                rows.append(f"| {entry['model']} | {entry['gpus']} | {vname} | {bound:g} ms | {fa} | {fc} | {g} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from afsplit.planner.profile_data import load_profile
    from afsplit.planner.search import Workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--profile-for", action="append", default=[], metavar="MODEL=PROFILE.json")
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b,deepseek-v3")
    ap.add_argument("--gpus", default="8,16,64")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    profiles = {"default": load_profile(args.profile)}
    for item in args.profile_for:
        model, _, path = item.partition("=")
        profiles[model] = load_profile(path)
    models = args.models.split(",")
    gpus = [int(g) for g in args.gpus.split(",")]
    wl = Workload(args.input_len, args.output_len)
    result = study(profiles, models, gpus, args.gpus_per_node, wl)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prof = profiles["default"]
    meta = {"profile": args.profile, "profile_kind": prof.get("kind"), "device": prof.get("device"),
            "workload": {"input_len": wl.input_len, "output_len": wl.output_len}, "network": "400 Gb/s, 5 us",
            "gpus_per_node": args.gpus_per_node}
    # one line per (model, cluster size): small, and diffs stay readable
    lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in result.items()]
    (out / "frontier.json").write_text(f'{{"meta": {json.dumps(meta)},\n "results": {{\n' + ",\n".join(lines) + "}}\n")
    title = (f"Predicted Pareto frontiers, {prof.get('device')} ({prof.get('kind')} profile), "
             f"{wl.input_len} in / {wl.output_len} out, 400 Gb/s network")
    plot(result, models, gpus, out / "pareto.png", title)
    print(markdown(result))
    slowest = max(v["seconds"] for e in result.values() for v in e["variants"].values())
    print(f"\nwrote {out / 'pareto.png'} and {out / 'frontier.json'}; slowest full sweep {slowest:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
