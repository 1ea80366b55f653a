"""Dispatch and combine latency and bandwidth per transport and intra-node mover, with the links' ceilings
measured in the same run.

    python -m launch.comm_bench --nodes 4A,4A,4E,4E --device cpu --dtype float32 --tokens 1,8,64,256 --hidden 2048 \\
        --out docs/benchmarks/comm-cpu
    python -m launch.comm_bench --nodes 1A+1E --device cuda --transports direct,direct@symm_mem,a2a --out /tmp/comm

The parent launches one torchrun per simulated node (launch.local_cluster) running this module with
--worker; rank 0 writes <out>.json and <out>.md. Routing: top-k over --experts experts spread evenly
over the expert ranks (expert i on expert rank i // (experts / n_expert_ranks)), uniform random.
Latency of one iteration = max over ranks of the dispatch (resp. combine) wall time; the expert rank
returns its input rows as the "expert output" (no compute), so only communication is timed. Modes:
eager calls, and on CUDA the same calls captured as CUDA graphs and replayed (the decode path).
Bandwidth = bytes that moved within (across) simulated nodes in one iteration (all ranks, both
directions) / median latency; ceilings: a plain streamed send between two ranks (inter: the first
ranks of nodes 0 and 1; intra: the first two ranks of a node), and one large device copy into a
peer's symmetric-memory window when a variant uses it.
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


def pair_ceiling(ctx, pair: tuple[int, int] | None, nbytes: int, reps: int = 5) -> float | None:
    """Bytes/s of a plain streamed send from pair[0] to pair[1] over the data group (collective)."""
    import torch.distributed as dist

    if pair is None:
        return None
    a, b = pair
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


def link_ceiling(ctx, nbytes: int, reps: int = 5) -> float | None:
    """Inter-node: node 0's first rank -> node 1's first rank (None with one node)."""
    topo = ctx.topology
    pair = (topo.ranks_on_node(0)[0], topo.ranks_on_node(1)[0]) if topo.num_nodes >= 2 else None
    return pair_ceiling(ctx, pair, nbytes, reps)


def intra_pair(topo) -> tuple[int, int] | None:
    """The first two ranks of the first node with two or more (None if there is none)."""
    return next(((ns[0], ns[1]) for ns in (topo.ranks_on_node(n) for n in range(topo.num_nodes)) if len(ns) >= 2),
                None)


def symm_copy_ceiling(ctx, ex, nbytes: int, reps: int = 5) -> float | None:
    """Bytes/s of one large device copy into the peer's symmetric-memory window (the intra pair of `ex`, whose
    mover must be symm_mem; collective). The window is zeroed again afterwards (the exchange relies on it)."""
    import torch.distributed as dist

    pair = intra_pair(ctx.topology)
    if pair is None or ex.mover.name != "symm_mem":
        return None
    a, b = pair
    result = torch.zeros(1, dtype=torch.float64)
    win = ex.channels[0].window
    if ctx.topology.node_of(ctx.rank) == ctx.topology.node_of(a):
        ms = ex.mover.barrier_ms
        n = min(nbytes, win.nbytes)
        src = torch.ones(n, dtype=torch.uint8, device=ctx.device)
        dst = win.peer(ex.mover.node_ranks.index(b))[:n] if ctx.rank == a else None
        best = 0.0
        for trial in range(3):
            win.barrier(ms)
            _sync(ctx.device)
            t0 = time.perf_counter()
            if ctx.rank == a:
                for _ in range(reps):
                    dst.copy_(src)
            win.barrier(ms)
            _sync(ctx.device)
            if trial:
                best = max(best, reps * n / (time.perf_counter() - t0))
        win.local.zero_()
        win.barrier(ms)
        _sync(ctx.device)
        result[0] = best
    dist.broadcast(result, src=a, group=ctx.control_group)
    return float(result.item())


VARIANT_HELP = ("transport[:metadata][@intra_node] names, e.g. direct,direct@symm_mem,two_phase@symm_mem,adaptive,"
                "direct:counts (intra_node: nccl unless named), plus a2a (a raw all_to_all_single of the padded "
                "bytes: the collective the exchange is built on)")


def _variant(name: str) -> tuple[str, str, str]:
    """(transport, metadata, intra_node) of a variant name."""
    base, _, intra = name.partition("@")
    transport, _, metadata = base.partition(":")
    return transport, metadata or "padded", intra or "nccl"


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


class _Calls:
    """One variant at one size: dispatch() and combine() to time, eagerly or as two replayed CUDA graphs.

    Graph mode captures dispatch and combine separately (each followed by joining the channel streams
    into the capturing one), after an eager warm-up call with the same region size; replays then
    read the inputs copied into the captured (static) tensors before each iteration."""

    def __init__(self, ctx, ex, base, routings: list, mode: str, T: int):
        self.ctx, self.ex, self.base, self.routings, self.mode, self.T = ctx, ex, base, routings, mode, T
        self.h = None
        if mode == "graph":
            self._capture()

    def _args(self, it: int):
        return self.routings[it % len(self.routings)] if self.ctx.is_attention else (None, None, None, None)

    def _join(self):
        cur = torch.cuda.current_stream(self.ctx.device)
        for ch in self.ex.channels:
            if ch.stream is not None:
                cur.wait_stream(ch.stream)

    def _capture(self):
        ex = self.ex
        pool = torch.cuda.graph_pool_handle()
        self.gd, self.gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        if ex is None:
            for g, fn in ((self.gd, self.base[0]), (self.gc, self.base[1])):
                fn()
                _sync(self.ctx.device)
                with torch.cuda.graph(g, pool=pool):
                    fn()
            return
        ex.begin_step(self.T)
        self.static = [t.clone() for t in self.routings[0]] if self.ctx.is_attention else [None] * 4
        h = ex.dispatch(*self.static, 0)  # eager warm-up: layouts, offsets, peer views for this size
        ex.combine(h.batch.x if h.batch is not None else None, h)
        ex.drain()
        with torch.cuda.graph(self.gd, pool=pool):
            self.h = ex.dispatch(*self.static, 0)
            self._join()
        with torch.cuda.graph(self.gc, pool=pool):
            ex.combine(self.h.batch.x if self.h.batch is not None else None, self.h)
            self._join()

    def prepare(self, it: int) -> None:
        if self.mode == "graph" and self.ex is not None and self.ctx.is_attention:
            for t, new in zip(self.static, self._args(it)):
                t.copy_(new)
        if self.ex is not None:
            self.ex.begin_step(self.T)  # the step's vote gives every rank the region size

    def dispatch(self, it: int) -> None:
        if self.mode == "graph":
            self.gd.replay()
        elif self.ex is None:
            self.base[0]()
        else:
            self.h = self.ex.dispatch(*self._args(it), it)

    def combine(self) -> None:
        if self.mode == "graph":
            self.gc.replay()
        elif self.ex is None:
            self.base[1]()
        else:
            self.ex.combine(self.h.batch.x if self.h.batch is not None else None, self.h)
        if self.ex is not None:
            self.ex.drain()


def _pct(v: list, q: float) -> float:
    return sorted(v)[min(len(v) - 1, int(round(q * (len(v) - 1))))]


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
    modes = [m for m in ns.modes.split(",") if m == "eager" or dev.type == "cuda"]
    n_exp = len(topo.expert_ranks)
    per_rank = ns.experts // n_exp
    ceiling = link_ceiling(ctx, ns.ceiling_mb << 20)
    intra_ceilings = {"nccl_send": pair_ceiling(ctx, intra_pair(topo), ns.ceiling_mb << 20)}
    model = calibrate(ctx)  # send/recv links: the model of every exchange whose intra-node mover is NCCL
    link_models = {"nccl": model.__dict__}
    movers: dict[str, str] = {}
    rows = []
    for hidden in hiddens:
        sizes = [T for T in tokens if not ns.max_elems or T * hidden <= ns.max_elems]
        if not sizes:
            continue
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size() + 8 * ns.top_k
        exchanges = {}
        for name in variants:
            if name == "a2a":
                continue
            transport, metadata, intra = _variant(name)
            # symmetric-memory exchanges calibrate their intra-node links through their own mover
            ex = exchanges[name] = MoEExchange(ctx, hidden, ns.top_k, dtype, max(sizes), transport, metadata,
                                               timeout_s=300.0, link_model=model if intra == "nccl" else None,
                                               intra_node=intra)
            movers[name] = ex.mover.name
            if ex.link_model is not None and intra != "nccl":
                link_models[f"{name} (hidden {hidden})"] = ex.link_model.__dict__
            if ex.mover.name == "symm_mem" and "symm_copy" not in intra_ceilings:
                intra_ceilings["symm_copy"] = symm_copy_ceiling(ctx, ex, ns.ceiling_mb << 20)
        for T in sizes:
            iters = ns.iters if T * hidden <= 256 * 4096 else max(5, ns.iters // 3)
            routings = []  # a few routings, reused cyclically; each rank its own tokens
            for i in range(4):
                ids = torch.rand(T, ns.experts, device=dev).topk(ns.top_k, dim=1).indices
                w = torch.rand(T, ns.top_k, device=dev)
                routings.append((torch.randn(T, hidden, device=dev).to(dtype), ids // per_rank, ids % per_rank, w))
            base = raw_a2a(ctx, T, row_bytes) if "a2a" in variants else None
            # exact counts read sizes on the host inside each call: never captured
            keys = [(n, m) for m in modes for n in variants if m == "eager" or _variant(n)[1] == "padded"]
            calls = {(n, m): _Calls(ctx, exchanges.get(n), base, routings, m, T) for n, m in keys}
            # variants take turns inside each iteration, so drift and noise hit them alike
            times = {k: ([], []) for k in keys}
            moved = {k: [0, 0] for k in keys}  # intra, inter bytes per iteration (counted by eager calls)
            choices: dict[str, int] = {}
            for it in range(ns.warmup + iters):
                for k in keys:
                    c = calls[k]
                    c.prepare(it)
                    ex = c.ex
                    b0 = dict(ex.bytes_sent) if ex is not None else None
                    _sync(dev)
                    t0 = time.perf_counter()
                    c.dispatch(it)
                    _sync(dev)
                    t1 = time.perf_counter()
                    c.combine()
                    _sync(dev)
                    t2 = time.perf_counter()
                    times[k][0].append(t1 - t0)
                    times[k][1].append(t2 - t1)
                    if ex is not None and it == ns.warmup and k[1] == "eager":
                        moved[k] = [ex.bytes_sent["intra"] - b0["intra"], ex.bytes_sent["inter"] - b0["inter"]]
                        for m in modes:  # graphs move the same bytes
                            moved[(k[0], m)] = moved[k]
                    if ex is not None and it >= ns.warmup and ex.transport == "adaptive":
                        choices[f"{k[0]}|{ex.route}"] = choices.get(f"{k[0]}|{ex.route}", 0) + 1
            del calls
            for k in keys:
                name, mode = k
                d_ts, c_ts = (t[ns.warmup:] for t in times[k])
                stats = torch.tensor(moved[k] + d_ts + c_ts, dtype=torch.float64)
                gathered = [torch.zeros_like(stats) for _ in range(ctx.world_size)]
                dist.all_gather(gathered, stats, group=ctx.control_group)
                if ctx.rank != 0:
                    continue
                # per iteration: the slowest rank (a call is done when every rank is done)
                d_it = [max(g[2 + i].item() for g in gathered) for i in range(iters)]
                c_it = [max(g[2 + iters + i].item() for g in gathered) for i in range(iters)]
                tot = [a + b for a, b in zip(d_it, c_it)]
                med = statistics.median(tot)
                intra_total = sum(g[0].item() for g in gathered)
                inter_total = sum(g[1].item() for g in gathered)
                bw = inter_total / med if med > 0 else 0.0
                bw_intra = intra_total / med if med > 0 else 0.0
                intra_ceiling = max([c for c in intra_ceilings.values() if c], default=None)
                row = {"transport": name, "mover": movers.get(name, ctx.backend), "mode": mode, "tokens": T,
                       "hidden": hidden, "median_us": med * 1e6, "p99_us": _pct(tot, 0.99) * 1e6,
                       "dispatch_median_us": statistics.median(d_it) * 1e6, "dispatch_p99_us": _pct(d_it, 0.99) * 1e6,
                       "combine_median_us": statistics.median(c_it) * 1e6, "combine_p99_us": _pct(c_it, 0.99) * 1e6,
                       "intra_bytes": intra_total, "intra_GBps": bw_intra / 1e9,
                       "intra_ceiling_frac": (bw_intra / intra_ceiling) if intra_ceiling else None,
                       "inter_bytes": inter_total, "inter_GBps": bw / 1e9,
                       "ceiling_frac": (bw / ceiling) if ceiling else None,
                       "adaptive_choice": {r.split("|")[1]: v for r, v in choices.items() if r.split("|")[0] == name}
                       or None, "iters": iters}
                rows.append(row)
                print(f"{name:>20} {mode:>5} T={T:<5} D={hidden:<5} dispatch {row['dispatch_median_us']:8.1f} us "
                      f"(p99 {row['dispatch_p99_us']:8.1f})  combine {row['combine_median_us']:8.1f} us (p99 "
                      f"{row['combine_p99_us']:8.1f})  intra {bw_intra / 1e9:6.2f} GB/s  inter {bw / 1e9:6.2f} GB/s"
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
            "experts": ns.experts, "top_k": ns.top_k, "command": ns.command, "modes": modes,
            "link_ceiling_GBps": ceiling / 1e9 if ceiling else None, "ceiling_message_MiB": ns.ceiling_mb,
            "intra_ceilings_GBps": {k: v / 1e9 if v else None for k, v in intra_ceilings.items()},
            "link_model": model.__dict__, "link_models": link_models, "movers": movers,
            "rows": rows,
        }
        with open(ns.out + ".json", "w") as f:
            json.dump(info, f, indent=1)
        with open(ns.out + ".md", "w") as f:
            f.write(render_md(info))
    ctx.shutdown(abort=dev.type == "cuda")  # captured collectives: abort rather than an orderly teardown


def _nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        return "unknown"


def render_md(info: dict) -> str:
    lm = info["link_model"]
    ic = info.get("intra_ceilings_GBps") or {}
    lines = [f"# comm benchmark: {info['nodes']} ({info['device']})", "",
             f"- date: {info['date']}; torch {info['torch']}" + (f", NCCL {info['nccl']}" if info['nccl'] else ""),
             f"- command: `{info['command']}`",
             f"- topology `{info['nodes']}` ({info['world_size']} ranks, data backend {info['backend']}), "
             f"{info['dtype']}, top-{info['top_k']} over {info['experts']} experts spread over the expert ranks",
             f"- link model of the NCCL-intra exchanges (start-up ping-pong over send/recv): intra alpha "
             f"{lm['alpha_intra'] * 1e6:.1f} us, beta {lm['beta_intra'] / 1e9:.2f} GB/s; inter alpha "
             f"{lm['alpha_inter'] * 1e6:.1f} us, beta {lm['beta_inter'] / 1e9:.2f} GB/s; header alpha "
             f"{lm['alpha_ctrl'] * 1e6:.1f} us"]
    for name, m in (info.get("link_models") or {}).items():
        if name != "nccl":
            lines.append(f"- link model of `{name}` (intra links timed through its mover): intra alpha "
                         f"{m['alpha_intra'] * 1e6:.1f} us, beta {m['beta_intra'] / 1e9:.2f} GB/s")
    lines += [f"- inter-node ceiling (plain send node 0 -> node 1, {info['ceiling_message_MiB']} MiB messages): "
              + (f"{info['link_ceiling_GBps']:.2f} GB/s" if info['link_ceiling_GBps'] else "n/a"),
              "- intra-node ceilings (same size): " + (", ".join(
                  f"{k} {v:.1f} GB/s" for k, v in ic.items() if v) or "n/a")
              + " (nccl_send: plain send between the node's first two ranks; symm_copy: one device copy into the "
              "peer's symmetric-memory window)",
              f"- movers: {', '.join(f'{k} -> {v}' for k, v in (info.get('movers') or {}).items())}",
              "", "Dispatch and combine are timed separately (each until every rank is done: the slowest rank per "
              "iteration; median and p99 over iterations; wall time from a device sync to a device sync). Every "
              "exchange is given the step's region size (the runtime's one vote per step). `@symm_mem` = intra-node "
              "rows through torch symmetric memory (otherwise NCCL); `:counts` = exact-sized rows after a row-count "
              "header per stage, otherwise padded regions; `a2a` = one raw all_to_all_single per direction of the "
              "same padded bytes (the collective the NCCL exchange is built on). Mode `eager`: the calls as the "
              "host issues them (Python, pack kernels, launches); `graph`: the same calls captured as one CUDA graph "
              "each and replayed (how decode steps run them). GB/s = bytes moved per iteration (all ranks, both "
              "directions) / median dispatch + combine.", "",
              "| hidden | tokens/rank | variant | mode | dispatch median us | dispatch p99 us | combine median us | "
              "combine p99 us | intra GB/s | % intra ceiling | inter GB/s | % inter ceiling |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        frac = f"{100 * r['ceiling_frac']:.1f}" if r.get("ceiling_frac") is not None else "-"
        ifrac = f"{100 * r['intra_ceiling_frac']:.1f}" if r.get("intra_ceiling_frac") is not None else "-"
        name = r["transport"] + (f" ({', '.join(f'{c}:{n}' for c, n in r['adaptive_choice'].items())})"
                                 if r.get("adaptive_choice") else "")
        if r.get("mover") and r["transport"] != "a2a" and r["mover"] not in r["transport"]:
            name += f" [{r['mover']}]"
        lines.append(f"| {r['hidden']} | {r['tokens']} | {name} | {r.get('mode', 'eager')} | "
                     f"{r['dispatch_median_us']:.1f} | {r['dispatch_p99_us']:.1f} | {r['combine_median_us']:.1f} | "
                     f"{r['combine_p99_us']:.1f} | {r.get('intra_GBps', 0):.2f} | {ifrac} | {r['inter_GBps']:.3f} | "
                     f"{frac} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.comm_bench")
    ap.add_argument("--nodes", default="1A,1E")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096")
    ap.add_argument("--hidden", default="2048,4096,7168")
    ap.add_argument("--transports", default="direct,two_phase,adaptive,direct:counts,a2a", help=VARIANT_HELP)
    ap.add_argument("--modes", default="eager,graph", help="eager and/or graph (CUDA graphs; CUDA only)")
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
