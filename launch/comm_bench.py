"""Dispatch+combine latency and inter-node bandwidth per transport, with the link's ceiling measured in the same run.

    python -m launch.comm_bench --nodes 4A,4A,4E,4E --device cpu --dtype float32 --tokens 1,8,64,256 --hidden 2048 \\
        --out docs/benchmarks/comm-cpu
    python -m launch.comm_bench --nodes 1A,1E --device cuda --out docs/benchmarks/comm-h200x2

The parent launches one torchrun per simulated node (launch.local_cluster) running this module with
--worker; rank 0 writes <out>.json and <out>.md. Routing: top-k over --experts experts spread evenly
over the expert ranks (expert i on expert rank i // (experts / n_expert_ranks)), uniform random.
Latency of one iteration = max over attention ranks of (dispatch + combine) wall time; the expert
rank returns its input rows as the "expert output" (no compute), so only communication is timed.
Inter-node bandwidth = bytes that crossed simulated nodes in one iteration (all ranks, both
directions) / median latency; ceiling = one plain send between the first ranks of nodes 0 and 1 at
a large size (streamed, one direction).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import statistics
import sys
import time

import torch

from afsplit.engine import DTYPES


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def link_ceiling(ctx, nbytes: int, reps: int = 5) -> float | None:
    """Bytes/s of a plain streamed send from node 0's first rank to node 1's first rank (collective)."""
    import torch.distributed as dist

    topo = ctx.topology
    if topo.num_nodes < 2:
        return None
    a, b = topo.ranks_on_node(0)[0], topo.ranks_on_node(1)[0]
    result = torch.zeros(1, dtype=torch.float64)
    if ctx.rank in (a, b):
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=ctx.device)
        ack = torch.zeros(1, dtype=torch.uint8, device=ctx.device)
        best = 0.0
        for trial in range(3):
            _sync(ctx.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                if ctx.rank == a:
                    dist.send(buf, b, group=ctx.data_group)
                else:
                    dist.recv(buf, a, group=ctx.data_group)
            if ctx.rank == a:
                dist.recv(ack, b, group=ctx.data_group)
            else:
                dist.send(ack, a, group=ctx.data_group)
            _sync(ctx.device)
            dt = time.perf_counter() - t0
            if trial:  # first trial warms up connections
                best = max(best, reps * nbytes / dt)
        result[0] = best
    dist.broadcast(result, src=a, group=ctx.control_group)
    return float(result.item())


VARIANT_HELP = ("transport[:metadata] names, e.g. direct,two_phase,adaptive,direct:counts, plus a2a (a raw "
                "all_to_all_single of the padded bytes: the collective the exchange is built on)")


def _variant(name: str) -> tuple[str, str]:
    transport, _, metadata = name.partition(":")
    return transport, metadata or "padded"


def raw_a2a(ctx, T: int, row_bytes: int):
    """The baseline: one all_to_all_single moving T padded rows between every (attention, expert) pair."""
    import torch.distributed as dist

    topo = ctx.topology
    att, exp = set(topo.attention_ranks), set(topo.expert_ranks)
    to_e = [T if ctx.is_attention and r in exp else 0 for r in range(ctx.world_size)]
    from_a = [T if ctx.is_expert and r in att else 0 for r in range(ctx.world_size)]
    send = torch.zeros(max(sum(to_e), sum(from_a)), row_bytes, dtype=torch.uint8, device=ctx.device)
    recv = torch.zeros_like(send)

    def dispatch():
        dist.all_to_all_single(recv[:sum(from_a)], send[:sum(to_e)], from_a, to_e, group=ctx.data_group)

    def combine():
        dist.all_to_all_single(send[:sum(to_e)], recv[:sum(from_a)], to_e, from_a, group=ctx.data_group)

    return dispatch, combine


def worker(ns) -> None:
    import torch.distributed as dist

    from comm.exchange import MoEExchange
    from comm.groups import init_distributed
    from comm.topology import Topology
    from comm.transports.adaptive import calibrate
    from launch.local_cluster import parse_nodes

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    topo = Topology(parse_nodes(ns.nodes))
    ctx = init_distributed(topo, backend="auto", timeout_s=300.0, device=ns.device)
    torch.manual_seed(1234 + ctx.rank)
    dev, dtype = ctx.device, DTYPES[ns.dtype]
    tokens = [int(t) for t in ns.tokens.split(",")]
    hiddens = [int(h) for h in ns.hidden.split(",")]
    variants = ns.transports.split(",")
    n_exp = len(topo.expert_ranks)
    per_rank = ns.experts // n_exp
    ceiling = link_ceiling(ctx, ns.ceiling_mb << 20)
    model = calibrate(ctx)
    rows = []
    for hidden in hiddens:
        sizes = [T for T in tokens if not ns.max_elems or T * hidden <= ns.max_elems]
        if not sizes:
            continue
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size() + 8 * ns.top_k
        exchanges = {name: MoEExchange(ctx, hidden, ns.top_k, dtype, max(sizes), *_variant(name), timeout_s=300.0,
                                       link_model=model) for name in variants if name != "a2a"}
        for T in sizes:
            iters = ns.iters if T * hidden <= 256 * 4096 else max(5, ns.iters // 3)
            routings = []  # a few routings, reused cyclically; each rank its own tokens
            for i in range(4):
                ids = torch.rand(T, ns.experts, device=dev).topk(ns.top_k, dim=1).indices
                w = torch.rand(T, ns.top_k, device=dev)
                routings.append((torch.randn(T, hidden, device=dev).to(dtype), ids // per_rank, ids % per_rank, w))
            base = raw_a2a(ctx, T, row_bytes) if "a2a" in variants else None
            # variants take turns inside each iteration, so drift and noise hit them alike
            times = {n: ([], []) for n in variants}
            inter = {n: 0 for n in variants}
            choices: dict[str, int] = {}
            for it in range(ns.warmup + iters):
                x, dest, slot, w = routings[it % len(routings)]
                for name in variants:
                    _sync(dev)
                    t0 = time.perf_counter()
                    if name == "a2a":
                        base[0]()
                        _sync(dev)
                        t1 = time.perf_counter()
                        base[1]()
                    else:
                        ex = exchanges[name]
                        ex.begin_step(T)  # the step's vote gives every rank the region size
                        b0 = ex.bytes_sent["inter"]
                        args = (x, dest, slot, w) if ctx.is_attention else (None, None, None, None)
                        h = ex.dispatch(*args, it)
                        _sync(dev)
                        t1 = time.perf_counter()
                        ex.combine(h.batch.x if h.batch is not None else None, h)
                        ex.drain()
                        if it >= ns.warmup:
                            inter[name] += ex.bytes_sent["inter"] - b0
                            choices[ex.route] = choices.get(ex.route, 0) + 1 if ex.transport == "adaptive" else 0
                    _sync(dev)
                    t2 = time.perf_counter()
                    times[name][0].append(t1 - t0)
                    times[name][1].append(t2 - t1)
            for name in variants:
                d_ts, c_ts = (t[ns.warmup:] for t in times[name])
                stats = torch.tensor([inter[name] / iters] + d_ts + c_ts, dtype=torch.float64)
                gathered = [torch.zeros_like(stats) for _ in range(ctx.world_size)]
                dist.all_gather(gathered, stats, group=ctx.control_group)
                if ctx.rank != 0:
                    continue
                # per iteration: the slowest rank (a call is done when every rank is done)
                d_it = [max(g[1 + i].item() for g in gathered) for i in range(iters)]
                c_it = [max(g[1 + iters + i].item() for g in gathered) for i in range(iters)]
                tot = [a + b for a, b in zip(d_it, c_it)]
                pct = lambda v, q: sorted(v)[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
                med = statistics.median(tot)
                inter_total = sum(g[0].item() for g in gathered)
                bw = inter_total / med if med > 0 else 0.0
                row = {"transport": name, "tokens": T, "hidden": hidden, "median_us": med * 1e6,
                       "p99_us": pct(tot, 0.99) * 1e6, "dispatch_median_us": statistics.median(d_it) * 1e6,
                       "dispatch_p99_us": pct(d_it, 0.99) * 1e6, "combine_median_us": statistics.median(c_it) * 1e6,
                       "combine_p99_us": pct(c_it, 0.99) * 1e6, "inter_bytes": inter_total, "inter_GBps": bw / 1e9,
                       "ceiling_frac": (bw / ceiling) if ceiling else None,
                       "adaptive_choice": {k: v for k, v in choices.items() if v} if name.startswith("adaptive") else None,
                       "iters": iters}
                rows.append(row)
                print(f"{name:>16} T={T:<5} D={hidden:<5} dispatch {row['dispatch_median_us']:8.1f} us (p99 "
                      f"{row['dispatch_p99_us']:8.1f})  combine {row['combine_median_us']:8.1f} us (p99 "
                      f"{row['combine_p99_us']:8.1f})  inter {inter_total / 1e6:8.2f} MB  {bw / 1e9:6.2f} GB/s"
                      + (f" ({100 * bw / ceiling:5.1f}% of ceiling)" if ceiling else ""), flush=True)
        for ex in exchanges.values():
            ex.close()
        del exchanges
    if ctx.rank == 0:
        info = {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "nccl": _nccl_version() if dev.type == "cuda" else None,
            "backend": ctx.backend, "nodes": ns.nodes, "world_size": ctx.world_size, "dtype": ns.dtype,
            "experts": ns.experts, "top_k": ns.top_k, "command": ns.command,
            "link_ceiling_GBps": ceiling / 1e9 if ceiling else None, "ceiling_message_MiB": ns.ceiling_mb,
            "link_model": model.__dict__,
            "rows": rows,
        }
        with open(ns.out + ".json", "w") as f:
            json.dump(info, f, indent=1)
        with open(ns.out + ".md", "w") as f:
            f.write(render_md(info))
    ctx.shutdown()


def _nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        return "unknown"


def render_md(info: dict) -> str:
    lm = info["link_model"]
    lines = [f"# comm benchmark: {info['nodes']} ({info['device']})", "",
             f"- date: {info['date']}; torch {info['torch']}" + (f", NCCL {info['nccl']}" if info['nccl'] else ""),
             f"- command: `{info['command']}`",
             f"- topology `{info['nodes']}` ({info['world_size']} ranks, data backend {info['backend']}), "
             f"{info['dtype']}, top-{info['top_k']} over {info['experts']} experts spread over the expert ranks",
             f"- link model used by adaptive (measured at start-up, ping-pong): intra alpha {lm['alpha_intra'] * 1e6:.1f} us, "
             f"beta {lm['beta_intra'] / 1e9:.2f} GB/s; inter alpha {lm['alpha_inter'] * 1e6:.1f} us, beta "
             f"{lm['beta_inter'] / 1e9:.2f} GB/s; header alpha {lm['alpha_ctrl'] * 1e6:.1f} us",
             f"- link ceiling (plain send node 0 -> node 1, {info['ceiling_message_MiB']} MiB messages): "
             + (f"{info['link_ceiling_GBps']:.2f} GB/s" if info['link_ceiling_GBps'] else "n/a"),
             "", "Dispatch and combine are timed separately (each until every rank is done: the slowest rank per "
             "iteration; median and p99 over iterations). Every exchange is given the step's region size (the "
             "runtime's one vote per step). `:counts` = exact-sized rows after a row-count header per stage; "
             "otherwise padded regions. `a2a` = one raw all_to_all_single per direction of the same padded bytes "
             "(the collective the exchange is built on). Inter GB/s = bytes crossing simulated nodes per iteration "
             "/ median dispatch + combine.", "",
             "| hidden | tokens/rank | transport | dispatch median us | dispatch p99 us | combine median us | "
             "combine p99 us | inter MB | inter GB/s | % ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        frac = f"{100 * r['ceiling_frac']:.1f}" if r["ceiling_frac"] is not None else "-"
        name = r["transport"] + (f" ({', '.join(f'{c}:{n}' for c, n in r['adaptive_choice'].items())})"
                                 if r.get("adaptive_choice") else "")
        lines.append(f"| {r['hidden']} | {r['tokens']} | {name} | {r['dispatch_median_us']:.1f} | {r['dispatch_p99_us']:.1f} | "
                     f"{r['combine_median_us']:.1f} | {r['combine_p99_us']:.1f} | {r['inter_bytes'] / 1e6:.2f} | "
                     f"{r['inter_GBps']:.3f} | {frac} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.comm_bench")
    ap.add_argument("--nodes", default="1A,1E")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096")
    ap.add_argument("--hidden", default="2048,4096,7168")
    ap.add_argument("--transports", default="direct,two_phase,adaptive,direct:counts,a2a", help=VARIANT_HELP)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ceiling-mb", type=int, default=None)
    ap.add_argument("--max-elems", type=int, default=0, help="skip sizes with tokens * hidden above this (memory)")
    ap.add_argument("--out", default="docs/benchmarks/comm-bench")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--command", default="", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.dtype is None:
        ns.dtype = "bfloat16" if ns.device == "cuda" else "float32"
    if ns.ceiling_mb is None:
        ns.ceiling_mb = 256 if ns.device == "cuda" else 16
    if ns.worker:
        worker(ns)
        return 0
    from comm.topology import Topology
    from launch.local_cluster import launch_local_cluster, parse_nodes

    args = list(argv if argv is not None else sys.argv[1:])
    command = "python -m launch.comm_bench " + " ".join(args)
    os.makedirs(os.path.dirname(ns.out) or ".", exist_ok=True)
    rc = launch_local_cluster(Topology(parse_nodes(ns.nodes)),
                              [sys.executable, "-m", "launch.comm_bench", "--worker", "--command", command, *args],
                              device=ns.device, timeout_s=ns.timeout)
    if rc == 0:
        print(f"wrote {ns.out}.json and {ns.out}.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())
