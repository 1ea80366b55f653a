"""Argument parsing and printing for ``afsplit profile`` and ``afsplit plan [validate]``."""

from __future__ import annotations

import argparse
import sys
import time

from afsplit.errors import ConfigError


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afsplit plan", description="Size an AF deployment for a TPOT bound.")
    p.add_argument("--model", required=True, help="preset, planner shape (deepseek-v3) or Hugging Face directory")
    p.add_argument("--profile", required=True, help="profile JSON from `afsplit profile`")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster (N)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (G)")
    p.add_argument("--tpot-ms", type=float, required=True, help="time per output token bound (decode step), ms")
    p.add_argument("--ttft-ms", type=float, default=None, help="optional bound on the prefill of one prompt, ms")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=256, help="output tokens per request")
    p.add_argument("--inter-node-gbps", type=float, default=400.0, help="network bandwidth per GPU, Gb/s")
    p.add_argument("--inter-node-latency-us", type=float, default=5.0, help="network latency per message, us")
    p.add_argument("--dtype", default=None, help="weights/KV dtype (default: the profile's)")
    p.add_argument("--max-micro-batches", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch per attention rank to try")
    p.add_argument("--imbalance", type=float, default=None,
                   help="expert-side max/mean load (default: the profile's balancer, floored by routing noise)")
    p.add_argument("--exchange", choices=("padded", "exact"), default="padded",
                   help="padded: P rows per (attention, expert) pair, as the runtime moves them; exact: only the "
                        "routed rows (what an exchange with row counts would move)")
    p.add_argument("--balancer", choices=("replicas", "none"), default="replicas",
                   help="replicas: least-loaded selection over replica slots (the profile's spare fraction; "
                        "written as balancer.replicas: auto); none: round robin, no replicas")
    p.add_argument("--top", type=int, default=8, help="rows of the candidate table")
    p.add_argument("--out", help="write the best plan as a config YAML here")
    return p


def validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afsplit plan validate",
                                description="Predict recorded runs (stats JSON) and print the error of each.")
    p.add_argument("--profile", required=True)
    p.add_argument("dirs", nargs="+", help="folders (e.g. docs/benchmarks/planner-h200) searched for stats JSON")
    return p


def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afsplit profile", description="Measure the planner's building blocks.")
    p.add_argument("--config", required=True, help="config of the model to profile (dtype, model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", required=True, help="write the profile JSON here")
    p.add_argument("--quick", action="store_true", help="small grids (for CPU smoke runs and tests)")
    p.add_argument("--system", choices=("full", "engine", "none"), default="full",
                   help="whole-run measurements of shallow copies of the model: engine and runtime (full), "
                        "engine only, or none")
    p.add_argument("--time-budget-s", type=float, default=240.0, help="stop adding system runs after this long")
    return p


def main(argv: list[str]) -> int:
    """`afsplit plan ...` / `afsplit plan validate ...`; returns the exit status."""
    if argv and argv[0] == "validate":
        from afsplit.planner.validate import validate_main

        return validate_main(validate_parser().parse_args(argv[1:]))
    return plan_main(plan_parser().parse_args(argv))


def profile_main(argv: list[str]) -> int:
    from afsplit.planner.profile_measure import run_profile

    args = profile_parser().parse_args(argv)
    run_profile(args.config, args.overrides, args.out, quick=args.quick, system=args.system,
                time_budget_s=args.time_budget_s, command="afsplit profile " + " ".join(argv))
    return 0


def build_planner(args):
    """(planner, shape, blocks) from parsed `afsplit plan` arguments."""
    from afsplit.planner.profile_data import BlockTimes, load_profile
    from afsplit.planner.search import Planner, Workload
    from afsplit.planner.shapes import resolve_shape
    from afsplit.planner.step_model import StepModel

    prof = load_profile(args.profile)
    dtype = args.dtype or prof["model"].get("dtype", "bfloat16")
    shape = resolve_shape(args.model, dtype)
    for name in ("input_len", "output_len", "max_micro_batches", "max_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.imbalance is not None and args.imbalance < 1:
        raise ConfigError(f"--imbalance: max/mean load is >= 1, got {args.imbalance}")
    blocks = BlockTimes(prof, shape)
    intra, inter = blocks.links(args.inter_node_gbps, args.inter_node_latency_us)
    sm = StepModel(blocks, intra, inter, args.imbalance, args.exchange, args.balancer)
    wl = Workload(args.input_len, args.output_len)
    planner = Planner(sm, args.gpus, args.gpus_per_node, wl, max_m=args.max_micro_batches, max_batch=args.max_batch)
    return planner, shape, blocks


def _mem(c) -> str:
    parts = [f"{r.role[:3]} {(r.total - r.reserve) / 1e9:.1f}" for r in c.memory]
    return " | ".join(parts)


def format_table(res, top: int) -> list[str]:
    head = (f"{'#':>2}  {'layout':<26} {'inst':>4} {'m':>2} {'transport':<9} {'batch':>5} {'TPOT ms':>8} "
            f"{'tok/s/GPU':>9}  {'mem/GPU GB':<20} {'KV seqs':>7}  {'bottleneck':<10} {'gain':>6}")
    lines = [head]
    shown = res.candidates[:top]
    if res.best_colocated and res.best_colocated not in shown:
        shown = shown + [res.best_colocated]
    for i, c in enumerate(shown, 1):
        idx = str(res.candidates.index(c) + 1)
        gain = f"{c.gain:.2f}x" if c.gain is not None else "-"
        lines.append(f"{idx:>2}  {c.layout.label():<26} {c.instances:>4} {c.m:>2} {c.transport:<9} {c.batch:>5} "
                     f"{c.tpot_ms:>8.1f} {c.tokens_per_s_per_gpu:>9.0f}  {_mem(c):<20} {c.kv_capacity_seqs:>7}  "
                     f"{c.result.bottleneck:<10} {gain:>6}")
    return lines


def plan_main(args) -> int:
    from afsplit.planner.config_out import instances_note, write_plan_config

    t0 = time.perf_counter()
    planner, shape, blocks = build_planner(args)
    t1, c1 = time.perf_counter(), time.process_time()
    res = planner.search(args.tpot_ms, args.ttft_ms)
    took, cpu, setup = time.perf_counter() - t1, time.process_time() - c1, t1 - t0
    nodes = planner.nodes
    print(f"afsplit plan: {shape.name} on {args.gpus} GPUs ({nodes} node(s) x {min(args.gpus, args.gpus_per_node)}), "
          f"TPOT <= {args.tpot_ms:g} ms" + (f", TTFT <= {args.ttft_ms:g} ms" if args.ttft_ms else "")
          + f", {args.input_len} in / {args.output_len} out tokens")
    print(f"{blocks.describe()}; network {args.inter_node_gbps:g} Gb/s per GPU, {args.inter_node_latency_us:g} us")
    print(f"model: {shape.describe()}")
    print(f"searched {res.evaluated} points in {took:.2f} s ({cpu:.2f} s CPU; start-up: imports, profile, fits {setup:.2f} s)")
    rejected = ", ".join(f"{n} {k}" for k, n in res.rejected.most_common())
    if not res.candidates:
        print(f"no layout meets the bounds; rejected: {rejected}", file=sys.stderr)
        for kind, msg in res.examples.items():
            print(f"  {kind}: {msg}", file=sys.stderr)
        raise ConfigError(f"no plan for {shape.name} on {args.gpus} GPUs at TPOT <= {args.tpot_ms:g} ms "
                          f"(closest rejection: {next(iter(res.examples.values()), 'none')})")
    for line in format_table(res, args.top):
        print(line)
    best, col = res.best, res.best_colocated
    print(f"best: {best.layout.label()}, m={best.m}, {best.transport}, batch {best.batch} per attention rank: "
          f"TPOT {best.tpot_ms:.1f} ms, {best.tokens_per_s_per_gpu:.0f} tok/s/GPU"
          + (f", {best.gain:.2f}x the best colocated ({col.layout.label()}, {col.tokens_per_s_per_gpu:.0f})"
             if col else ", no colocated layout fits"))
    if rejected:
        print(f"rejected (layout, m, transport) series: {rejected}")
        for kind, msg in res.examples.items():
            print(f"  e.g. {kind}: {msg}")
    if args.out:
        header = (f"afsplit plan --model {args.model} --gpus {args.gpus} --gpus-per-node {args.gpus_per_node} "
                  f"--tpot-ms {args.tpot_ms:g}\npredicted: TPOT {best.tpot_ms:.1f} ms, "
                  f"{best.tokens_per_s_per_gpu:.0f} tok/s/GPU ({best.result.bottleneck}-bound); {instances_note(best)}")
        write_plan_config(args.out, best, shape, args.model, planner.wl, header)
        print(f"wrote {args.out} ({instances_note(best)})")
    return 0
