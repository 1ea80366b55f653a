"""Markdown-ready numbers and the goals' verdicts from what launch/gpu_2gpu_runs.sh wrote.

    python -m launch.gpu_2gpu_summary RESULTS_DIR OUT.md [OUT.json]

Reads whatever parts exist under RESULTS_DIR (env.txt, tests.log, parity/parity.json,
bench/*.json, perf/*.json, profile/*/split-rank*.json) and writes one markdown page with every table
and the verdict of each goal of the issue (per-call latency <= 30 us at <= 256 tokens x hidden 2048
between two GPUs of a node; m = 2 faster than m = 1; distributed tokens/s/GPU >= 0.9x the
single-GPU engine's; tokens/s/GPU at TPOT <= 50 ms). A goal whose numbers are missing says so.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LATENCY_GOAL_US, LATENCY_TOKENS, LATENCY_HIDDEN = 30.0, 256, 2048
TPOT_GOAL_MS, PER_GPU_GOAL = 50.0, 0.9


def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _f(v, fmt=".1f") -> str:
    return "-" if v is None else format(v, fmt)


def parity_md(d: dict) -> list[str]:
    out = ["## bf16 parity (tiny models)", "",
           "| family | layout | mover | pass | prefill logit err vs fp32 | transformers bf16 err | all steps vs 1-GPU "
           "eager | all steps vs 1-GPU graphs | all steps vs same layout on NCCL | greedy token match |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d.get("rows", []):
        if "error" in r:
            out.append(f"| {r['family']} | {r['layout']} | - | **False** | error: {r['error'][-160:]!r} | | | | | |")
            continue
        out.append(f"| {r['family']} | {r['layout']} | {r.get('mover', '-')} | {r['pass']} | "
                   f"{_f(r.get('prefill_logits_rel_err_max'), '.2e')} | {_f(r.get('hf_bf16_err'), '.2e')} | "
                   f"{_f(r.get('all_steps_vs_single_gpu_err'), '.2e')} | "
                   f"{_f(r.get('all_steps_vs_single_gpu_graphs_err'), '.2e')} | "
                   f"{_f(r.get('all_steps_vs_nccl_err'), '.2e')} | {_f(r.get('greedy_token_match'), '.2f')} |")
    return out + [""]


def bench_md(name: str, d: dict) -> tuple[list[str], list[dict]]:
    """The table of one comm_bench run and its rows that bear on the latency goal."""
    ic = d.get("intra_ceilings_GBps") or {}
    out = [f"### {name}: `{d.get('nodes')}` ({d.get('device')}, NCCL {d.get('nccl')})", "",
           f"- ceilings: inter-node {_f(d.get('link_ceiling_GBps'), '.2f')} GB/s; intra-node "
           + (", ".join(f"{k} {_f(v)} GB/s" for k, v in ic.items()) or "-"),
           f"- movers: {', '.join(f'{k} -> {v}' for k, v in (d.get('movers') or {}).items())}", "",
           "| hidden | tokens | variant | mode | dispatch median / p99 us | combine median / p99 us | intra GB/s "
           "(% ceiling) | inter GB/s (% ceiling) |", "|---|---|---|---|---|---|---|---|"]
    goal_rows = []
    for r in d.get("rows", []):
        pct = lambda f: f" ({100 * f:.0f}%)" if f is not None else ""  # noqa: E731
        out.append(f"| {r['hidden']} | {r['tokens']} | {r['transport']} [{r.get('mover', '-')}] | {r.get('mode', 'eager')} | "
                   f"{r['dispatch_median_us']:.1f} / {r['dispatch_p99_us']:.1f} | {r['combine_median_us']:.1f} / "
                   f"{r['combine_p99_us']:.1f} | {r.get('intra_GBps', 0):.2f}{pct(r.get('intra_ceiling_frac'))} | "
                   f"{r['inter_GBps']:.3f}{pct(r.get('ceiling_frac'))} |")
        if r["hidden"] == LATENCY_HIDDEN and r["tokens"] <= LATENCY_TOKENS and r.get("mover") == "symm_mem":
            goal_rows.append({**r, "bench": name})
    return out + [""], goal_rows


def latency_verdict(rows: list[dict]) -> list[str]:
    if not rows:
        return ["- per-call latency <= 30 us (symm_mem, <= 256 tokens x hidden 2048): **no numbers** (bench not run "
                "or symmetric memory not used)"]
    out = []
    for mode in sorted({r.get("mode", "eager") for r in rows}):
        sel = [r for r in rows if r.get("mode", "eager") == mode]
        worst = max(sel, key=lambda r: max(r["dispatch_median_us"], r["combine_median_us"]))
        w = max(worst["dispatch_median_us"], worst["combine_median_us"])
        out.append(f"- per-call latency <= {LATENCY_GOAL_US:.0f} us at <= {LATENCY_TOKENS} tokens x hidden "
                   f"{LATENCY_HIDDEN} ({mode}): **{'met' if w <= LATENCY_GOAL_US else 'not met'}** -- worst median "
                   f"{w:.1f} us ({worst['bench']} {worst['transport']}, {worst['tokens']} tokens; dispatch "
                   f"{worst['dispatch_median_us']:.1f}, combine {worst['combine_median_us']:.1f} us)")
    return out


RUN = re.compile(r"(?P<name>.+)-b(?P<batch>\d+)\.json$")


def perf_md(runs: dict[str, dict]) -> tuple[list[str], list[str]]:
    by_batch: dict[int, dict[str, dict]] = {}
    for fname, s in runs.items():
        m = RUN.match(fname)
        if m and s:
            by_batch.setdefault(int(m["batch"]), {})[m["name"]] = s
    out, verdicts = [], []
    for b, rs in sorted(by_batch.items()):
        single = rs.get("single")
        out += [f"### {b} requests x (512 in, 128 out)", "",
                "| run | GPUs | tok/s | tok/s/GPU | vs single-GPU engine | decode step median ms | TPOT mean / p99 ms "
                "| TTFT mean ms | micro-batches used |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in sorted(rs.items()):
            ratio = s["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"] if single and name != "single" else None
            out.append(f"| {name} | {s.get('gpus')} | {s['output_throughput']:.0f} | {s['tokens_per_s_per_gpu']:.0f} | "
                       f"{_f(ratio, '.2f')}{'x' if ratio else ''} | {_f(s.get('decode_step_ms_median'), '.2f')} | "
                       f"{_f(s.get('mean_tpot_ms'), '.2f')} / {_f(s.get('p99_tpot_ms'), '.2f')} | "
                       f"{_f(s.get('mean_ttft_ms'), '.0f')} | {s.get('micro_batches', {})} |")
        out.append("")
        m1, m2 = rs.get("af-m1"), rs.get("af-m2")
        if m1 and m2:
            faster = m2["decode_step_ms_median"] < m1["decode_step_ms_median"]
            verdicts.append(f"- m = 2 faster than m = 1 (AF 1A+1E, {b} requests): **{'met' if faster else 'not met'}** "
                            f"-- decode step median {m2['decode_step_ms_median']:.2f} vs {m1['decode_step_ms_median']:.2f} ms, "
                            f"tok/s {m2['output_throughput']:.0f} vs {m1['output_throughput']:.0f}")
        else:
            verdicts.append(f"- m = 2 faster than m = 1 ({b} requests): **no numbers**")
        dist = {n: s for n, s in rs.items() if n != "single"}
        for label, group in (("AF 1A+1E (best m)", "af-"), ("colocated 2", "colocated")):
            runs_g = {n: s for n, s in dist.items() if n.startswith(group)}
            if not (single and runs_g):
                continue
            best_n, best = max(runs_g.items(), key=lambda kv: kv[1]["tokens_per_s_per_gpu"])
            r = best["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
            verdicts.append(f"- {label} tok/s/GPU >= {PER_GPU_GOAL}x the single-GPU engine's ({b} requests): "
                            f"**{'met' if r >= PER_GPU_GOAL else 'not met'}** -- {best_n} {r:.2f}x "
                            f"({best['tokens_per_s_per_gpu']:.0f} vs {single['tokens_per_s_per_gpu']:.0f})")
        ok = {n: s for n, s in dist.items() if s.get("mean_tpot_ms") is not None and s["mean_tpot_ms"] <= TPOT_GOAL_MS}
        if dist:
            verdicts.append(f"- tok/s/GPU at TPOT <= {TPOT_GOAL_MS:.0f} ms ({b} requests): "
                            + (", ".join(f"{n} {s['tokens_per_s_per_gpu']:.0f} (TPOT {s['mean_tpot_ms']:.1f} ms)"
                                         for n, s in sorted(ok.items())) or "**no run meets the TPOT bound**"))
    return out, verdicts


def profile_md(root: Path) -> list[str]:
    out = ["## One replayed decode step per rank (torch.profiler; launch/step_profile.py)", "",
           "| run | rank | graph | GPU window ms | experts | compute (attention, glue) | exchange not hidden | idle | "
           "exchange busy | wall ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    found = False
    for f in sorted(root.glob("*/split-rank*.json")):
        s = _load(f)
        if not s or "split_ms" not in s:
            continue
        found = True
        sp = s["split_ms"]
        out.append(f"| {f.parent.name} | {s['rank']} | {s['name']} {s['key']} | {s['window_ms']:.2f} | "
                   f"{sp['experts']:.2f} | {sp['compute']:.2f} | {sp['exchange']:.2f} | {sp['idle']:.2f} | "
                   f"{s['busy_ms']['exchange']:.2f} | {s['wall_ms']:.2f} |")
    return out + [""] if found else []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root, md_path = Path(argv[0]), Path(argv[1])
    lines = ["# 2-GPU runs (launch/gpu_2gpu_runs.sh)", ""]
    env = root / "env.txt"
    if env.exists():
        lines += ["```", env.read_text().strip(), "```", ""]
    if (root / "tests.log").exists():
        lines += ["## GPU tests", "", "```", (root / "tests.log").read_text().strip()[-1500:], "```", ""]
    parity = _load(root / "parity" / "parity.json")
    if parity:
        lines += parity_md(parity)
    goal_rows, bench_lines = [], []
    for f in sorted((root / "bench").glob("*.json")):
        d = _load(f)
        if d:
            md, rows = bench_md(f.stem, d)
            bench_lines += md
            goal_rows += rows
    if bench_lines:
        lines += ["## Exchange latency (launch/comm_bench.py)", ""] + bench_lines
    perf = {f.name: _load(f) for f in sorted((root / "perf").glob("*.json"))}
    perf_lines, perf_verdicts = perf_md(perf)
    if perf_lines:
        lines += ["## Qwen3-30B-A3B shapes, random weights, Zipf routing, --warmup", ""] + perf_lines
    lines += profile_md(root / "profile")
    verdicts = latency_verdict(goal_rows) + perf_verdicts
    lines += ["## Goals", ""] + verdicts + [""]
    md_path.write_text("\n".join(lines))
    if len(argv) > 2:
        Path(argv[2]).write_text(json.dumps({"verdicts": verdicts, "parity": parity, "perf": perf}, indent=1))
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
