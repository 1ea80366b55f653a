"""Failover on CPU: detection time, recovery time and throughput before/after the loss of an expert rank.

    python -m launch.failover_bench --out docs/benchmarks/failover-cpu.json --md docs/benchmarks/failover-cpu.md

Runs ``afsplit generate`` on configs/cpu-failover.yaml (attention node + two expert nodes, every expert
on both; tiny qwen3_moe, float32, gloo over loopback) under the cluster simulation: once without a
failure, then with an expert rank SIGKILLed / SIGSTOPped in the middle of a step (AFSPLIT_FAULTS), and
with replicas off so the lost experts are reloaded into spare slots. Each run's tokens are compared
with the run without the failure; the figures come from each run's stats JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.make_prompts import make_prompts

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (name, faults, extra --set overrides)
    ("no failure", "", []),
    ("SIGKILL expert rank 2 mid-step", "2@{step}:KILL", []),
    ("SIGSTOP expert rank 1 mid-step", "1@{step}:STOP", []),
    ("SIGKILL, no replicas: reload into spare slots", "2@{step}:KILL",
     ["balancer.replicas=none", "balancer.replicas_on_distinct_nodes=false"]),
]


def run(case, prompts: Path, tmp: Path, step: int) -> dict:
    name, faults, sets = case
    out, stats = tmp / "out.jsonl", tmp / "stats.json"
    for p in (out, stats):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", str(ROOT / "configs" / "cpu-failover.yaml"),
           "--prompts-file", str(prompts), "--output", str(out), "--stats-json", str(stats), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, AFSPLIT_FAULTS=faults.format(step=step)),
                          capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = {r["index"]: r["token_ids"] for r in map(json.loads, out.read_text().splitlines())}
    return {"case": name, "faults": faults.format(step=step), "sets": sets, "command_s": round(elapsed, 2),
            "tokens": rows, "stats": json.loads(stats.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--fault-step", type=int, default=60, help="the step in which the expert rank fails")
    ap.add_argument("--out", required=True)
    ap.add_argument("--md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(args.requests, 16, args.output_len, 200)))
    results = [run(c, prompts, tmp, args.fault_step) for c in CASES]
    base = results[0]["tokens"]
    rows = []
    for r in results:
        s = r["stats"]
        fo = (s.get("failovers") or [{}])[0]
        tp = s.get("failover_throughput") or {}
        rows.append({"case": r["case"], "requests": s["num_requests"],
                     "identical_to_no_failure": sum(base.get(i) == t for i, t in r["tokens"].items()),
                     "wall_s": round(s["wall_s"], 2), "tok_s": round(s["output_throughput"], 1),
                     "detection_s": fo.get("detection_s"), "recovery_s": fo.get("recovery_s"),
                     "requests_replayed": fo.get("requests_replayed"), "reloaded_experts": fo.get("reloaded_experts"),
                     "before_tok_s": tp.get("before_tok_s"), "after_tok_s": tp.get("after_tok_s")})
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                             capture_output=True, text=True).stdout.strip(),
            "command": "python -m launch.failover_bench " + " ".join(sys.argv[1:]), "requests": args.requests,
            "output_len": args.output_len, "fault_step": args.fault_step}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.md:
        def f(v, spec=".2f"):
            return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)
        lines = ["| case | requests | identical tokens | wall s | tok/s | detection s | recovery s | replayed | "
                 "reloaded experts | tok/s before | tok/s after |", "|---" * 11 + "|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['requests']} | {r['identical_to_no_failure']} | {f(r['wall_s'])} | "
                         f"{f(r['tok_s'], '.1f')} | {f(r['detection_s'])} | {f(r['recovery_s'])} | "
                         f"{f(r['requests_replayed'])} | {f(r['reloaded_experts'])} | {f(r['before_tok_s'], '.1f')} | "
                         f"{f(r['after_tok_s'], '.1f')} |")
        Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
    main()
