"""Dispatch+combine latency and inter-node bandwidth per transport, with the link's ceiling measured in the same run.

    python -m comm.bench --nodes 4A,4A,4E,4E --device cpu --dtype float32 --tokens 1,8,64,256 --hidden 2048 \\
        --out docs/benchmarks/comm-cpu
    python -m comm.bench --nodes 1A,1E --device cuda --out docs/benchmarks/comm-h200x2

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


def worker(ns) -> None:
    import torch.distributed as dist

    from comm.communicator import MoECommunicator
    from comm.groups import init_distributed
    from comm.transports.adaptive import calibrate
    from launch.local_cluster import parse_nodes
    from comm.topology import Topology

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    topo = Topology(parse_nodes(ns.nodes))
    ctx = init_distributed(topo, backend="auto", timeout_s=300.0, device=ns.device)
    torch.manual_seed(1234 + ctx.rank)
    dev, dtype = ctx.device, DTYPES[ns.dtype]
    tokens = [int(t) for t in ns.tokens.split(",")]
    hiddens = [int(h) for h in ns.hidden.split(",")]
    transports = ns.transports.split(",")
    n_exp = len(topo.expert_ranks)
    per_rank = ns.experts // n_exp
    ceiling_bytes = ns.ceiling_mb << 20
    ceiling = link_ceiling(ctx, ceiling_bytes)
    model = calibrate(ctx)
    rows = []
    for hidden in hiddens:
        # one communicator serves all transports (comm.transport is switched per call), so the
        # buffers are shared as in the runtime, where only one transport is configured
        sizes = [T for T in tokens if not ns.max_elems or T * hidden <= ns.max_elems]
        if not sizes:
            continue
        comm = MoECommunicator(ctx, hidden, ns.top_k, dtype, max(sizes), "adaptive", 300.0, link_model=model)
        # direct_padded: the default padded path (one all_to_all_single on NCCL); _p2p: per-peer P2P ops
        padded = {name: MoECommunicator(ctx, hidden, ns.top_k, dtype, max(sizes), "direct", 300.0,
                                        metadata="padded", collective=name != "direct_padded_p2p")
                  for name in transports if name.startswith("direct_padded")}
        for T in sizes:
            iters = ns.iters if T * hidden <= 256 * 4096 else max(5, ns.iters // 3)
            # a few routings, reused cyclically (same on every rank of a given seed; each rank its own tokens)
            routings = []
            for i in range(4):
                ids = torch.rand(T, ns.experts, device=dev).topk(ns.top_k, dim=1).indices
                w = torch.rand(T, ns.top_k, device=dev)
                routings.append((torch.randn(T, hidden, device=dev).to(dtype), ids // per_rank, ids % per_rank, w))
            # transports take turns inside each iteration, so drift and noise hit them alike
            times = {n: [] for n in transports}
            inter = {n: 0 for n in transports}
            hdr = {n: 0.0 for n in transports}
            choices: dict[str, int] = {}
            for it in range(ns.warmup + iters):
                x, dest, slot, w = routings[it % len(routings)]
                for name in transports:
                    c = padded.get(name, comm)
                    if c is comm:
                        comm.transport = name
                    b0, h0 = c.bytes_sent["inter"], c.header_time_s
                    # adaptive (and padded, which pads to it) get the step's token count as the runtime
                    # would pass it (agree_tokens once per step, amortised over all MoE layers); the vote
                    # itself is timed below
                    hint = T if name == "adaptive" or name in padded else None
                    _sync(dev)
                    t0 = time.perf_counter()
                    if ctx.is_attention:
                        batch = c.dispatch(x, dest, slot, w, it, tokens_hint=hint)
                    else:
                        batch = c.dispatch(None, None, None, None, it, tokens_hint=hint)
                    c.combine(batch.x if batch is not None else None, it)
                    _sync(dev)
                    times[name].append(time.perf_counter() - t0)
                    if it >= ns.warmup:
                        inter[name] += c.bytes_sent["inter"] - b0
                        hdr[name] += c.header_time_s - h0
                        if name == "adaptive":
                            choices[comm.last_transport] = choices.get(comm.last_transport, 0) + 1
            vote_us = None
            if "adaptive" in transports:
                vt = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    comm.agree_tokens(T if ctx.is_attention else 0)
                    vt.append(time.perf_counter() - t0)
                vote_us = statistics.median(vt) * 1e6
            for name in transports:
                ts = times[name][ns.warmup:]
                stats = torch.tensor([inter[name] / iters, hdr[name] / iters] + ts, dtype=torch.float64)
                gathered = [torch.zeros_like(stats) for _ in range(ctx.world_size)]
                dist.all_gather(gathered, stats, group=ctx.control_group)
                if ctx.rank == 0:
                    att = [gathered[r] for r in topo.attention_ranks]
                    per_iter = [max(g[2 + i].item() for g in att) for i in range(iters)]
                    med = statistics.median(per_iter)
                    p99 = sorted(per_iter)[min(len(per_iter) - 1, int(round(0.99 * (len(per_iter) - 1))))]
                    inter_total = sum(g[0].item() for g in gathered)
                    hdr_max = max(g[1].item() for g in gathered)
                    bw = inter_total / med if med > 0 else 0.0
                    row = {"transport": name, "tokens": T, "hidden": hidden, "median_us": med * 1e6,
                           "p99_us": p99 * 1e6, "inter_bytes": inter_total, "inter_GBps": bw / 1e9,
                           "ceiling_frac": (bw / ceiling) if ceiling else None, "header_us_max_rank": hdr_max * 1e6,
                           "adaptive_choice": dict(choices) if name == "adaptive" else None, "iters": iters,
                           "vote_us": vote_us if name == "adaptive" else None}
                    rows.append(row)
                    print(f"{name:>9} T={T:<5} D={hidden:<5} median {med * 1e6:9.1f} us  p99 {p99 * 1e6:9.1f} us  "
                          f"inter {inter_total / 1e6:8.2f} MB  {bw / 1e9:6.2f} GB/s"
                          + (f" ({100 * bw / ceiling:5.1f}% of ceiling)" if ceiling else "")
                          + (f"  choice {choices}" if name == "adaptive" else ""), flush=True)
        for c in (comm, *padded.values()):
            c.close()
        del comm, padded
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
    lines = [f"# comm benchmark: {info['nodes']} ({info['device']})", "",
             f"- date: {info['date']}; torch {info['torch']}" + (f", NCCL {info['nccl']}" if info['nccl'] else ""),
             f"- command: `{info['command']}`",
             f"- topology `{info['nodes']}` ({info['world_size']} ranks, data backend {info['backend']}), "
             f"{info['dtype']}, top-{info['top_k']} over {info['experts']} experts spread over the expert ranks",
             f"- link model used by adaptive (measured at start-up, ping-pong): intra alpha "
             f"{info['link_model']['alpha_intra'] * 1e6:.1f} us, beta {info['link_model']['beta_intra'] / 1e9:.2f} GB/s; "
             f"inter alpha {info['link_model']['alpha_inter'] * 1e6:.1f} us, beta {info['link_model']['beta_inter'] / 1e9:.2f} GB/s; "
             f"header alpha {info['link_model']['alpha_ctrl'] * 1e6:.1f} us",
             f"- link ceiling (plain send node 0 -> node 1, {info['ceiling_message_MiB']} MiB messages): "
             + (f"{info['link_ceiling_GBps']:.2f} GB/s" if info['link_ceiling_GBps'] else "n/a"),
             "", "Latency = dispatch + combine, max over attention ranks, per iteration (median / p99). "
             "Inter GB/s = bytes crossing simulated nodes per iteration / median latency. "
             "Adaptive is given the step's token count (tokens_hint, as the runtime passes it after one "
             "agree_tokens vote per engine step); 'vote us' is that vote's cost, paid once per step, not per layer. "
             "'vs best' = median / the better of direct and two_phase. 'header us' = time the slowest rank spent in "
             "header (row count) exchanges per iteration, including waiting for its peer to get there. "
             "direct_padded = direct with fixed-capacity regions of tokens_hint rows per pair instead of count "
             "headers (no header round, no host sync on the data path, more bytes), moved by one all_to_all_single "
             "on NCCL; direct_padded_p2p = the same regions as per-peer P2P ops.", "",
             "| hidden | tokens/rank | transport | median us | p99 us | inter MB | inter GB/s | % ceiling | vs best | header us | vote us |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = info["rows"]
    best = {}
    for r in rows:
        if r["transport"] != "adaptive":
            k = (r["hidden"], r["tokens"])
            best[k] = min(best.get(k, float("inf")), r["median_us"])
    for r in rows:
        k = (r["hidden"], r["tokens"])
        frac = f"{100 * r['ceiling_frac']:.1f}" if r["ceiling_frac"] is not None else "-"
        vs = f"{r['median_us'] / best[k]:.2f}x" if k in best else "-"
        name = r["transport"] + (f" ({', '.join(f'{c}:{n}' for c, n in r['adaptive_choice'].items())})"
                                 if r["adaptive_choice"] else "")
        lines.append(f"| {r['hidden']} | {r['tokens']} | {name} | {r['median_us']:.1f} | {r['p99_us']:.1f} | "
                     f"{r['inter_bytes'] / 1e6:.2f} | {r['inter_GBps']:.3f} | {frac} | {vs} | {r['header_us_max_rank']:.0f} | "
                     + (f"{r['vote_us']:.0f} |" if r.get("vote_us") is not None else "- |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comm.bench")
    ap.add_argument("--nodes", default="1A,1E")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096")
    ap.add_argument("--hidden", default="2048,4096,7168")
    ap.add_argument("--transports", default="direct,two_phase,adaptive,direct_padded,direct_padded_p2p")
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
    command = "python -m comm.bench " + " ".join(args)
    os.makedirs(os.path.dirname(ns.out) or ".", exist_ok=True)
    rc = launch_local_cluster(Topology(parse_nodes(ns.nodes)),
                              [sys.executable, "-m", "comm.bench", "--worker", "--command", command, *args],
                              device=ns.device, timeout_s=ns.timeout)
    if rc == 0:
        print(f"wrote {ns.out}.json and {ns.out}.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())
