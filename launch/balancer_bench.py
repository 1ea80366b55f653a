"""Benchmark: replica-selection time per layer and max/mean expert-rank load under Zipf routing.

    python3 -m launch.balancer_bench --out docs/benchmarks/balancer-h100.json --md docs/benchmarks/balancer-h100.md

Timing: one attention rank's `assign` for one MoE layer (4096 tokens x top-8, 128 experts, 32 spare
slots in all, counts from 4 attention ranks), on the device: CUDA events around each call (or
each graph replay), after warm-up, median of the repetitions. The timed region is `assign` only
(quotas + this rank's share + slot lookup); the all_gather of the counts is not included (it is
a separate collective); `local_counts` (the bincount that feeds it) is timed on its own line.
Variants: eager; the same call captured in a CUDA graph (as a runtime that graphs its decode step
would run it); torch.compile + CUDA graph (where it compiles). Loads: see :func:`balance_case`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from comm.topology import NodeSpec, Topology
from comm.balancer import LeastLoadedBalancer, StaticBalancer, local_counts
from comm.placement import Placement
from comm.replica_planner import max_over_mean, plan_placement


def zipf_topk(T: int, K: int, E: int, s: float, gen: torch.Generator, perm: torch.Tensor) -> torch.Tensor:
    """Top-K routing with Zipf(s) popularity: expert perm[i] has weight (i+1)^-s; each token draws
    K distinct experts without replacement (Gumbel top-k), as a top-k router with skewed logits."""
    w = torch.arange(1, E + 1, dtype=torch.float64) ** -s
    logits = torch.empty(E, dtype=torch.float64)
    logits[perm] = torch.log(w / w.sum())
    gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
    return (logits + gumbel).topk(K, dim=1).indices


def bench_topology(num_attention: int, num_expert_ranks: int, per_node: int = 8) -> Topology:
    """Attention ranks on node 0, expert ranks `per_node` to a node after it."""
    nodes = [NodeSpec(attention=num_attention)]
    left = num_expert_ranks
    while left > 0:
        nodes.append(NodeSpec(expert=min(per_node, left)))
        left -= per_node
    return Topology(tuple(nodes))


def _loads(dest_list, n: int) -> list[int]:
    d = torch.cat([x.reshape(-1) for x in dest_list]).long().cpu()
    return torch.bincount(d, minlength=n).tolist()


def balance_case(s: float, num_expert_ranks: int, spare_total: int = 32, seed: int = 0, E: int = 128,
                 T: int = 4096, K: int = 8, A: int = 4, calib: int = 4, drift: bool = False,
                 iters: int = 4) -> dict:
    """max/mean expert-rank load of one micro-batch (T tokens x top-K over A attention ranks).

    The planner sees `calib` earlier micro-batches of the same routing (with `drift`, the 16
    hottest experts' popularity is rotated before the measured batch). Columns: round_robin (no
    replicas), planned_no_spare (planner packing only), and with spare_total / n spare slots per
    rank: planned_static (first replica), planned_even (even split), least_loaded.
    """
    n = num_expert_ranks
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(E, generator=gen)
    topo = bench_topology(A, n)
    stats = torch.zeros(E, dtype=torch.int64)
    for _ in range(calib):
        stats += torch.bincount(zipf_topk(T, K, E, s, gen, perm).flatten(), minlength=E)
    if drift:
        perm = torch.cat([perm[:16].roll(3), perm[16:]])
    ids = zipf_topk(T, K, E, s, gen, perm)
    parts = list(ids.chunk(A))
    counts_AE = torch.stack([local_counts(x, E) for x in parts])
    spare = spare_total // n
    planned = plan_placement(stats[None], topo, spare)
    out = {"s": s, "num_expert_ranks": n, "spare_slots_per_rank": spare, "tokens": T, "topk": K,
           "experts": E, "attention_ranks": A, "drift": drift}
    cases = {
        "round_robin": StaticBalancer(Placement.round_robin(1, E, n)),
        "planned_no_spare": StaticBalancer(plan_placement(stats[None], topo, 0)),
        "planned_static": StaticBalancer(planned),
        "planned_even": LeastLoadedBalancer(planned, iters=0),
        "least_loaded": LeastLoadedBalancer(planned, iters=iters),
    }
    for name, bal in cases.items():
        dest = [bal.assign(0, x, counts_AE, a)[0] for a, x in enumerate(parts)]
        out[name] = max_over_mean(_loads(dest, n))
    out["hottest_expert_over_mean_rank"] = counts_AE.sum(0).max().item() / (T * K / n)
    return out


# ----------------------------------------------------------------------------------------------
# Timing


def _median_us(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for a, b in zip(starts, ends):
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) * 1e3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _graphed(fn, device):
    """Capture fn() (static inputs) in a CUDA graph; return the replay callable."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def timing_case(n: int, device: torch.device, args, log) -> dict:
    E, T, K, A = args.experts, args.tokens, args.topk, args.attention
    gen = torch.Generator().manual_seed(n)
    perm = torch.randperm(E, generator=gen)
    topo = bench_topology(A, n)
    stats = torch.bincount(zipf_topk(4 * T, K, E, args.zipf, gen, perm).flatten(), minlength=E)
    planned = plan_placement(stats[None], topo, args.spare_total // n)
    ids_cpu = [zipf_topk(T, K, E, args.zipf, gen, perm) for _ in range(A)]
    counts_cpu = torch.stack([local_counts(x, E) for x in ids_cpu])
    a = 1  # time attention rank 1 (a middle rank: non-trivial prefix of counts)
    ids = ids_cpu[a].to(device)
    counts = counts_cpu.to(device)
    bal = LeastLoadedBalancer(planned, device, iters=args.iters)
    row = {"num_expert_ranks": n, "spare_slots_per_rank": args.spare_total // n,
           "max_replicas": max(planned.num_replicas(0)),
           "replicated_experts": sum(r > 1 for r in planned.num_replicas(0))}
    # correctness on the device: same as the CPU, same twice
    ref = LeastLoadedBalancer(planned, "cpu", iters=args.iters).assign(0, ids_cpu[a], counts_cpu, a)
    got = bal.assign(0, ids, counts, a)
    row["matches_cpu"] = bool(torch.equal(ref[0], got[0].cpu()) and torch.equal(ref[1], got[1].cpu()))
    w, r = args.warmup, args.reps
    timed = {
        "local_counts": lambda: local_counts(ids, E),
        "lookup_no_replicas": (lambda b=LeastLoadedBalancer(Placement.round_robin(1, E, n), device):
                               b.assign(0, ids, counts, a)),
        "static_first_replica": (lambda b=StaticBalancer(planned, device): b.assign(0, ids, counts, a)),
        "quotas_only": lambda: bal.quotas(0, counts),
        "least_loaded_eager": lambda: bal.assign(0, ids, counts, a),
    }
    for name, fn in timed.items():
        row[name + "_us"] = _median_us(fn, device, w, r)
        log(f"  n={n} {name}: {row[name + '_us']:.1f} us")
    if device.type == "cuda":
        try:
            replay, out = _graphed(lambda: bal.assign(0, ids, counts, a), device)
            replay()
            torch.cuda.synchronize()
            row["graph_matches_cpu"] = bool(torch.equal(ref[0], out[0].cpu()) and torch.equal(ref[1], out[1].cpu()))
            row["least_loaded_graph_us"] = _median_us(replay, device, w, r)
            log(f"  n={n} least_loaded_graph: {row['least_loaded_graph_us']:.1f} us")
        except Exception as e:  # keep the other numbers
            row["least_loaded_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"  n={n} graph failed: {row['least_loaded_graph_error']}")
    return row


def compiled_case(n: int, device: torch.device, args, log) -> dict:
    """torch.compile(assign) then a CUDA graph of it; GPU only, last (compilation is slow)."""
    E, T, K, A = args.experts, args.tokens, args.topk, args.attention
    gen = torch.Generator().manual_seed(n)
    perm = torch.randperm(E, generator=gen)
    stats = torch.bincount(zipf_topk(4 * T, K, E, args.zipf, gen, perm).flatten(), minlength=E)
    planned = plan_placement(stats[None], bench_topology(A, n), args.spare_total // n)
    ids_cpu = [zipf_topk(T, K, E, args.zipf, gen, perm) for _ in range(A)]
    counts_cpu = torch.stack([local_counts(x, E) for x in ids_cpu])
    ids, counts = ids_cpu[1].to(device), counts_cpu.to(device)
    bal = LeastLoadedBalancer(planned, device, iters=args.iters)
    ref = LeastLoadedBalancer(planned, "cpu", iters=args.iters).assign(0, ids_cpu[1], counts_cpu, 1)
    t0 = time.perf_counter()
    fn = torch.compile(bal.assign, dynamic=False)
    out = fn(0, ids, counts, 1)
    torch.cuda.synchronize()
    row = {"compile_s": time.perf_counter() - t0,
           "compiled_matches_cpu": bool(torch.equal(ref[0], out[0].cpu()) and torch.equal(ref[1], out[1].cpu()))}
    row["least_loaded_compiled_us"] = _median_us(lambda: fn(0, ids, counts, 1), device, args.warmup, args.reps)
    replay, gout = _graphed(lambda: fn(0, ids, counts, 1), device)
    replay()
    torch.cuda.synchronize()
    row["compiled_graph_matches_cpu"] = bool(torch.equal(ref[0], gout[0].cpu()) and torch.equal(ref[1], gout[1].cpu()))
    row["least_loaded_compiled_graph_us"] = _median_us(replay, device, args.warmup, args.reps)
    log(f"  n={n} compiled: {row['least_loaded_compiled_us']:.1f} us, compiled+graph "
        f"{row['least_loaded_compiled_graph_us']:.1f} us (compile {row['compile_s']:.0f} s)")
    return row


# ----------------------------------------------------------------------------------------------
# Report


def markdown(result: dict) -> str:
    lines = [f"# Balancer benchmark: {result['device']}", "",
             f"Date: {result['date']}. Command: `{result['command']}`. torch {result['torch']}.", "",
             "## Selection time per layer (one attention rank, median, us)", "",
             f"{result['tokens']} tokens x top-{result['topk']}, {result['experts']} experts, "
             f"{result['spare_total']} spare slots in all, counts from {result['attention']} attention ranks, "
             f"{result['iters']} Sinkhorn rounds. Timed: `assign` only (not the counts all_gather); "
             "`local_counts` (the bincount feeding the all_gather) separately.", ""]
    cols = ["local_counts_us", "lookup_no_replicas_us", "static_first_replica_us", "quotas_only_us",
            "least_loaded_eager_us", "least_loaded_graph_us", "least_loaded_compiled_us",
            "least_loaded_compiled_graph_us"]
    rows = result["timing"]
    present = [c for c in cols if any(c in r for r in rows)]
    lines.append("| expert ranks | replicated experts | max replicas | " + " | ".join(c[:-3] for c in present) + " | matches CPU |")
    lines.append("|" + "---|" * (len(present) + 4))
    for r in rows:
        vals = " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in present)
        ok = r.get("matches_cpu") and r.get("graph_matches_cpu", True) and r.get("compiled_matches_cpu", True) \
            and r.get("compiled_graph_matches_cpu", True)
        lines.append(f"| {r['num_expert_ranks']} | {r['replicated_experts']} | {r['max_replicas']} | {vals} | {ok} |")
    errs = [f"{k}: {v}" for r in rows for k, v in r.items() if k.endswith("error")]
    if errs:
        lines += ["", "Errors: " + "; ".join(errs)]
    lines += ["", "## max/mean expert-rank load under Zipf routing", "",
              f"{result['tokens']} tokens x top-{result['topk']} per micro-batch over {result['attention']} attention "
              f"ranks, {result['experts']} experts; planner fed {4} earlier micro-batches; spare = "
              f"{result['spare_total']} / n slots per rank (+25% expert memory). Target: least-loaded <= 1.10.", "",
              "| s | expert ranks | spare/rank | hottest expert / mean rank | round robin (no replicas) | planned, no spare | "
              "planned+spare, first replica | even split | least-loaded |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["balance"]:
        tag = " (drift)" if r["drift"] else ""
        lines.append(f"| {r['s']}{tag} | {r['num_expert_ranks']} | {r['spare_slots_per_rank']} | "
                     f"{r['hottest_expert_over_mean_rank']:.2f} | {r['round_robin']:.3f} | {r['planned_no_spare']:.3f} | "
                     f"{r['planned_static']:.3f} | {r['planned_even']:.3f} | **{r['least_loaded']:.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--attention", type=int, default=4)
    p.add_argument("--spare-total", type=int, default=32)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.5, help="routing skew for the timing cases")
    p.add_argument("--ranks", default="4,8,16", help="expert-rank counts")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-budget-s", type=float, default=150.0,
                   help="start no further torch.compile case after this many seconds since start")
    p.add_argument("--out", default="")
    p.add_argument("--md", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    ranks = [int(x) for x in args.ranks.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python3 -m launch.balancer_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "tokens": args.tokens, "topk": args.topk, "experts": args.experts,
              "attention": args.attention, "spare_total": args.spare_total, "iters": args.iters,
              "timing": [], "balance": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(result))

    def log(msg):
        print(msg, flush=True)

    log(f"device: {name}")
    for s in (1.0, 1.5):
        for n in ranks:
            result["balance"].append(balance_case(s, n, args.spare_total, seed=0, E=args.experts, T=args.tokens,
                                                  K=args.topk, A=args.attention, iters=args.iters))
    result["balance"].append(balance_case(1.2, 8, args.spare_total, seed=1, E=args.experts, T=args.tokens,
                                          K=args.topk, A=args.attention, iters=args.iters, drift=True))
    save()
    for n in ranks:
        try:
            result["timing"].append(timing_case(n, device, args, log))
        except Exception as e:
            result["timing"].append({"num_expert_ranks": n, "replicated_experts": 0, "max_replicas": 0,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"  n={n} failed: {e}")
        save()
    print(markdown(result), flush=True)
    if device.type == "cuda" and not args.no_compile:
        for row in sorted(result["timing"], key=lambda r: -r["num_expert_ranks"]):  # largest n first
            n = row["num_expert_ranks"]
            if "error" in row or time.perf_counter() - t_start > args.compile_budget_s:
                continue
            try:
                row.update(compiled_case(n, device, args, log))
            except Exception as e:
                row["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
                log(f"  n={n} compile failed: {row['compiled_error']}")
                save()
                break
            save()
        print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
