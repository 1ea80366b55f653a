"""Multi-process helpers for comm tests and benchmarks: spawn a gloo world, check dispatch/combine.

``spawn_world(world, fn, *args)`` starts `world` processes (multiprocessing spawn) with the torchrun
environment set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=free port), runs
``fn(*args)`` in each and returns the per-rank results; it never hangs (a deadline kills the world).
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from typing import Any

import torch

from comm.topology import Topology
from launch.local_cluster import free_port, parse_nodes  # noqa: F401 (re-exported)


def topo(spec: str) -> Topology:
    return Topology(parse_nodes(spec))


def local_ranks_of(spec: str) -> list[int]:
    return [r.local_rank for r in topo(spec).ranks]


def _entry(rank: int, world: int, port: int, local_rank: int, fn, args, q, env: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        q.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))


def spawn_world(world: int, fn, *args, local_ranks: list[int] | None = None, timeout_s: float = 180.0,
                env: dict | None = None) -> list[tuple[bool, Any]]:
    """Run fn(*args) on `world` spawned ranks; returns [(ok, result or traceback)] by rank."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    local_ranks = local_ranks or list(range(world))
    procs = [ctx.Process(target=_entry, args=(r, world, port, local_ranks[r], fn, args, q, env or {}), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, res = q.get(timeout=min(left, 1.0))
                results[rank] = (ok, res)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead and all(p.exitcode is not None for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results.get(r, (False, f"rank {r}: no result (exit code {procs[r].exitcode})")) for r in range(world)]


def run_world_checks(check, specs: list[str], world: int, timeout_s: float = 200, **kw) -> list[dict]:
    """Run `check(specs, kw)` (a module-level function: it is spawned) on `world` gloo ranks laid out as
    specs[0]; assert every rank succeeded with no failures; return the ranks' results."""
    res = spawn_world(world, check, specs, kw, local_ranks=local_ranks_of(specs[0]), timeout_s=timeout_s)
    errors = [f"rank {r}: {v}" for r, (ok, v) in enumerate(res) if not ok]
    assert not errors, "\n".join(errors)
    failures = [f for _ok, v in res for f in v["failures"]]
    assert not failures, "\n".join(failures[:20])
    return [v for _ok, v in res]


# ----------------------------------------------------------------------------------------------
# Correctness check run inside each rank


def make_inputs(topology: Topology, seed: int, scenario: str, hidden: int, top_k: int, slots: int, max_tokens: int):
    """Deterministic per-attention-rank inputs, identical on every rank (all ranks build all of them)."""
    g = torch.Generator().manual_seed(seed)
    n_exp = len(topology.expert_ranks)
    out = {}
    for i, a in enumerate(topology.attention_ranks):
        T = int(torch.randint(0, max_tokens + 1, (1,), generator=g))
        if scenario == "zero_first" and i == 0:
            T = 0
        if scenario == "full":
            T = max_tokens
        if scenario == "single":
            T = 1
        if scenario == "one_rank":
            dest = torch.full((T, top_k), n_exp - 1, dtype=torch.long)
            slot = torch.rand(T, slots, generator=g).topk(top_k, dim=1).indices
        else:
            lo = 1 if (scenario == "zero_first" and n_exp > 1) else 0  # expert rank 0 receives nothing
            ids = torch.rand(T, (n_exp - lo) * slots, generator=g).topk(top_k, dim=1).indices + lo * slots
            dest, slot = ids // slots, ids % slots
        w = torch.randint(1, 4, (T, top_k), generator=g).float()
        t = torch.arange(T)
        d = torch.arange(hidden)
        x = (((a * 7 + t[:, None] * 3 + d[None, :]) % 11) - 5).float()
        x[:, 0] = a * 4096 + t
        out[a] = (x, dest, slot, w)
    return out


def fake_moe(batch, expert_index: int) -> torch.Tensor:
    """y = factor * x with factor = sum over this rank's slots of w * (slot + 1 + 20 * expert_index)."""
    valid = batch.topk_ids >= 0
    f = (batch.topk_weights * (batch.topk_ids.float() + 1 + 20 * expert_index) * valid).sum(1, keepdim=True)
    y = batch.x.float() * f
    y[:, 0] = f[:, 0]
    return y.to(batch.x.dtype)


def reference(x, dest, slot, w) -> torch.Tensor:
    f = (w * (slot.float() + 1 + 20 * dest.float())).sum(1, keepdim=True)
    y = x * f
    y[:, 0] = f[:, 0]
    return y


VARIANTS = {
    # name: (transport, metadata, one-collective stages on gloo, micro-batches interleaved on 2 channels)
    "direct": ("direct", "padded", False, False),
    "two_phase": ("two_phase", "padded", False, False),
    "adaptive": ("adaptive", "padded", False, False),
    "direct_a2a": ("direct", "padded", True, False),
    "two_phase_a2a": ("two_phase", "padded", True, False),
    "direct_counts": ("direct", "counts", False, False),
    "two_phase_counts": ("two_phase", "counts", False, False),
    "adaptive_counts": ("adaptive", "counts", False, False),
    "two_phase_2ch": ("two_phase", "padded", False, True),
}


def check_topologies(specs: list[str], variants: list[str], scenarios: list[str], hidden: int = 16,
                     top_k: int = 4, slots: int = 6, max_tokens: int = 24, layers: int = 2,
                     calibrated: tuple[str, ...] = (), timeout_s: float = 30.0, check_mismatch: bool = False,
                     intra_node: str = "auto", symm_provider=None) -> dict:
    """Run every (topology, variant, scenario) on this rank; return failures, what adaptive chose and the
    mover each (topology, variant) used. `symm_provider`: how symmetric-memory windows are made (tests:
    tests/helpers/symm_mem_cases.py's CPU stand-in), with `intra_node` choosing whether to use them."""
    from comm.exchange import MoEExchange
    from comm.groups import init_distributed
    from comm.movers.symm_mem import set_provider
    from comm.transports.adaptive import LinkModel, calibrate

    if symm_provider is not None:
        set_provider(symm_provider)
    topos = [topo(s) for s in specs]
    ctx0 = init_distributed(topos[0], backend="gloo", timeout_s=timeout_s)
    failures: list[str] = []
    chosen: dict[str, set] = {}
    movers: dict[str, str] = {}
    results: dict[tuple, torch.Tensor] = {}
    mismatch = None
    try:
        for spec, tp in zip(specs, topos):
            ctx = ctx0.with_topology(tp)
            if spec not in calibrated:  # network slow per message: two_phase for 1 token per rank, direct for 24
                model = LinkModel(alpha_intra=1e-6, beta_intra=1e12, alpha_inter=5e-4, beta_inter=4e6, alpha_ctrl=1e-6)
            else:
                model = calibrate(ctx, iters=3, large_bytes=1 << 16)
            for variant in variants:
                transport, metadata, a2a, interleave = VARIANTS[variant]
                # a calibrated topology through symmetric memory: adaptive times its intra links via the mover
                own = spec in calibrated and intra_node == "symm_mem" and transport == "adaptive"
                ex = MoEExchange(ctx, hidden, top_k, torch.float32, max_tokens, transport, metadata, timeout_s,
                                 channels=2 if interleave else 1, link_model=None if own else model, collective=a2a,
                                 intra_node=intra_node)
                movers[f"{spec} {variant}"] = ex.mover.name
                for si, scenario in enumerate(scenarios):
                    datas = [make_inputs(tp, 1000 * si + layer, scenario, hidden, top_k, slots, max_tokens)
                             for layer in range(layers)]
                    # padded: regions of the step's largest micro-batch (the runtime's vote)
                    ex.begin_step(max(d[0].shape[0] for data in datas for d in data.values()))
                    if transport == "adaptive":
                        chosen.setdefault(spec, set()).add(ex.route)
                    order = [(layer, 0) for layer in range(layers)]
                    if interleave:  # attention ranks: both micro-batches out, then both back (as ping-pong does)
                        order = [(layer, u) for layer in range(layers) for u in (0, 1)]
                    tags = {k: f"[{spec} {variant} {scenario} layer {k[0]} mb {k[1]}] rank {ctx.rank}" for k in order}
                    handles = {}
                    if ctx.is_attention and not ctx.is_expert and interleave:
                        for layer in range(layers):
                            for u in (0, 1):
                                handles[(layer, u)] = ex.dispatch(*datas[layer][ctx.rank], layer, channel=u)
                            for u in (0, 1):
                                _check_out(ex.combine(None, handles[(layer, u)]), datas[layer][ctx.rank],
                                           tags[(layer, u)], failures, results, (spec, scenario, layer, u, variant))
                        continue
                    for layer, u in order:
                        data = datas[layer]
                        args = data[ctx.rank] if ctx.is_attention else (None, None, None, None)
                        h = ex.dispatch(*args, layer, channel=u)
                        y = None
                        if ctx.is_expert:
                            batch = _unpadded(h.batch) if metadata == "padded" else h.batch
                            failures += _check_batch(tp, ctx.rank, batch, data, tags[(layer, u)])
                            y = fake_moe(h.batch, tp.expert_index(ctx.rank))
                        elif h.batch is not None:
                            failures.append(f"{tags[(layer, u)]}: attention-only rank got a batch")
                        out = ex.combine(y, h)
                        if ctx.is_attention:
                            _check_out(out, data[ctx.rank], tags[(layer, u)], failures, results,
                                       (spec, scenario, layer, u, variant))
                        elif out is not None:
                            failures.append(f"{tags[(layer, u)]}: expert-only rank got a combine output")
                ex.drain()
                ex.close()
        if check_mismatch:  # rank 1 claims another config: every rank must fail naming rank 1
            from comm.groups import verify_same_config
            try:
                verify_same_config(ctx0, "other" if ctx0.rank == 1 else "same")
                mismatch = "no error"
            except Exception as e:  # noqa: BLE001
                mismatch = str(e)
    finally:
        ctx0.shutdown()
    return {"failures": failures, "chosen": {k: sorted(v) for k, v in chosen.items()}, "mismatch": mismatch,
            "movers": movers}


def _check_out(out, data, tag: str, failures: list, results: dict, key: tuple) -> None:
    """The combined output equals the reference, and is bitwise the same for every variant."""
    ref = reference(*data)
    if out is None or not torch.equal(out, ref):
        failures.append(f"{tag}: combine differs from reference "
                        f"(max err {(out - ref).abs().max() if out is not None else 'None'})")
        return
    first = results.setdefault(key[:-1], out)
    if not torch.equal(out.view(torch.int32), first.view(torch.int32)):
        failures.append(f"{tag}: result differs bitwise from another variant's")


def _unpadded(batch):
    """Drop padding rows (all topk_ids == -1) of a padded-mode ExpertBatch."""
    from dataclasses import replace

    keep = (batch.topk_ids >= 0).any(1)
    return replace(batch, x=batch.x[keep], topk_ids=batch.topk_ids[keep], topk_weights=batch.topk_weights[keep])


def _check_batch(tp: Topology, rank: int, batch, data, tag: str) -> list[str]:
    me = tp.expert_index(rank)
    xs, ids, ws = [], [], []
    for a, (x, dest, slot, w) in data.items():
        hit = (dest == me).any(1)
        m = dest[hit] == me
        xs.append(x[hit])
        ids.append(torch.where(m, slot[hit], -1).int())
        ws.append(torch.where(m, w[hit], 0.0))
    ex, eids, ew = torch.cat(xs), torch.cat(ids), torch.cat(ws)
    if batch is None:
        return [f"{tag}: expert rank got no batch"]
    if batch.x.shape != ex.shape:
        return [f"{tag}: expected {ex.shape[0]} rows, got {batch.x.shape[0]}"]
    o1, o2 = ex[:, 0].argsort(), batch.x[:, 0].argsort()
    errs = []
    if not torch.equal(ex[o1], batch.x[o2]):
        errs.append(f"{tag}: payload rows differ")
    if not torch.equal(eids[o1], batch.topk_ids[o2]):
        errs.append(f"{tag}: topk_ids differ")
    if not torch.equal(ew[o1], batch.topk_weights[o2]):
        errs.append(f"{tag}: topk_weights differ")
    if batch.topk_ids.dtype != torch.int32 or batch.topk_weights.dtype != torch.float32:
        errs.append(f"{tag}: wrong metadata dtypes")
    return errs


def _to_cpu(batch):
    from dataclasses import replace

    return replace(batch, x=batch.x.cpu(), topk_ids=batch.topk_ids.cpu(), topk_weights=batch.topk_weights.cpu())


def fault_worker(spec: str, victim: int, mode: str, timeout_s: float, intra_node: str = "auto",
                 symm_provider=None) -> dict:
    """Layer 0 runs normally; then `victim` exits ('exit') or stops answering ('hang') before layer 1."""
    from comm.exchange import MoEExchange
    from comm.groups import init_distributed
    from comm.movers.symm_mem import set_provider

    if symm_provider is not None:
        set_provider(symm_provider)
    tp = topo(spec)
    ctx = init_distributed(tp, backend="gloo", timeout_s=60.0)
    ex = MoEExchange(ctx, 8, 2, torch.float32, 4, "direct", "padded", timeout_s, intra_node=intra_node)
    data = make_inputs(tp, 0, "full", 8, 2, 4, 4)
    for layer in range(2):
        if layer == 1 and ctx.rank == victim:
            if mode == "exit":
                os._exit(3)
            time.sleep(timeout_s * 2 + 1)
            os._exit(0)
        t0 = time.monotonic()
        try:
            args = data[ctx.rank] if ctx.is_attention else (None, None, None, None)
            h = ex.dispatch(*args, layer)
            y = fake_moe(h.batch, tp.expert_index(ctx.rank)) if ctx.is_expert else None
            ex.combine(y, h)
            ex.drain()
        except Exception as e:  # noqa: BLE001
            elapsed = time.monotonic() - t0
            ctx.shutdown(abort=True)
            return {"error": f"{type(e).__name__}: {e}", "elapsed": elapsed, "layer": layer, "mover": ex.mover.name}
    ctx.shutdown()
    return {"error": None, "mover": ex.mover.name}


# ----------------------------------------------------------------------------------------------
# `python -m tests.helpers.comm_selftest --nodes 1A,3E [--fail-rank R]`: run under torchrun / local_cluster


def _cluster_main(argv: list[str] | None = None) -> int:
    import argparse

    from comm.exchange import MoEExchange
    from comm.groups import init_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", required=True)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--transport", default="two_phase")
    ap.add_argument("--metadata", default="padded")
    ap.add_argument("--device", default="cpu")
    ns = ap.parse_args(argv)
    tp = topo(ns.nodes)
    ctx = init_distributed(tp, backend="auto", timeout_s=60.0, device=ns.device)
    if ctx.rank == ns.fail_rank:
        print(f"rank {ctx.rank}: failing on purpose", flush=True)
        os._exit(7)
    try:
        return _cluster_check(ctx, tp, ns, MoEExchange)
    except Exception as e:  # noqa: BLE001 -- a peer's death: report it as the CLI's ranks do (the launcher blames)
        from launch.local_cluster import report_rank_failure

        report_rank_failure(tp, ctx.rank, e, 1)
        return 1


def _cluster_check(ctx, tp, ns, MoEExchange) -> int:
    ex = MoEExchange(ctx, 8, 2, torch.float32, 8, ns.transport, ns.metadata, 20.0)
    ok = True
    for layer, scenario in enumerate(["random", "one_rank", "zero_first", "full"]):
        data = make_inputs(tp, layer, scenario, 8, 2, 3, 8)
        ex.begin_step(max(d[0].shape[0] for d in data.values()))
        args = [t.to(ctx.device) for t in data[ctx.rank]] if ctx.is_attention else (None, None, None, None)
        h = ex.dispatch(*args, layer)
        if ctx.is_expert:
            batch = _to_cpu(h.batch)
            ok &= not _check_batch(tp, ctx.rank, _unpadded(batch) if ns.metadata == "padded" else batch, data, "")
        y = fake_moe(h.batch, tp.expert_index(ctx.rank)) if ctx.is_expert else None
        out = ex.combine(y, h)
        ok &= out is None or torch.equal(out.cpu(), reference(*data[ctx.rank]))
    ex.drain()
    ex.close()
    print(f"rank {ctx.rank} node {ctx.node} local {ctx.local_rank} {tp.role_of(ctx.rank)}: "
          f"{'ok' if ok else 'WRONG'}", flush=True)
    ctx.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(_cluster_main())
