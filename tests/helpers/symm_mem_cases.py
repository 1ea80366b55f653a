"""A CPU stand-in for torch symmetric memory, and the multi-process cases of tests/test_symm_mem.py.

Real symmetric memory needs GPUs. The stand-in keeps everything the mover relies on and swaps only
the memory: each rank's window is a file in /dev/shm that every rank of its node maps
(``torch.from_file(shared=True)``), so a rank's writes into a peer's window really land in the
peer's memory; the barrier is a gloo all_reduce over the channel's node group with the mover's
deadline (its device timeout minus the margin, as the host deadline would be). The gloo ranks are
separate processes, so the exchange runs as on GPUs, only with CPU copies and a host-side barrier.
"""

from __future__ import annotations

import os
import torch
import torch.distributed as dist

from comm.movers.symm_mem import set_provider
from tests.helpers.comm_selftest import fake_moe, make_inputs, reference, topo


class FakeWindow:
    def __init__(self, local: torch.Tensor, peers: list[torch.Tensor], group):
        self.local, self.peers, self.group, self.nbytes = local, peers, group, local.numel()
        self._flag = torch.zeros(1)

    def peer(self, group_rank: int) -> torch.Tensor:
        return self.peers[group_rank]

    def barrier(self, timeout_ms: int):
        """Runs on the host: returns its work, which the mover waits for with its own deadline."""
        return dist.all_reduce(self._flag, group=self.group, async_op=True)


class FakeSymmMem:
    """`fail`: 'allocate' or 'rendezvous' makes that step raise (on `fail_rank`, or on every rank if -1)."""

    name = "shared-file stand-in for symmetric memory (CPU)"

    def __init__(self, fail: str = "", fail_rank: int = -1):
        self.fail, self.fail_rank = fail, fail_rank
        self._paths: dict[int, str] = {}
        self._count = 0

    def _maybe_fail(self, step: str) -> None:
        if self.fail == step and self.fail_rank in (-1, dist.get_rank()):
            raise RuntimeError(f"injected {step} failure")

    def unavailable(self, ctx) -> str | None:
        return None

    def allocate(self, nbytes: int, device) -> torch.Tensor:
        self._maybe_fail("allocate")
        path = f"/dev/shm/afsplit-symm-test-{os.getpid()}-{self._count}"
        self._count += 1
        t = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._paths[t.data_ptr()] = path
        return t

    def rendezvous(self, local: torch.Tensor, group) -> FakeWindow:
        mine = self._paths.pop(local.data_ptr())
        try:
            self._maybe_fail("rendezvous")
            paths: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(paths, mine, group=group)
            peers = [local if p == mine else torch.from_file(p, shared=True, size=local.numel(), dtype=torch.uint8)
                     for p in paths]
            dist.barrier(group=group)  # every rank has mapped every file: the names can go
        finally:
            os.unlink(mine)
        return FakeWindow(local, peers, group)


# ----------------------------------------------------------------------------------------------
# cases run inside spawned ranks


def fallback_case(spec: str, failures: list[tuple[str, int]]) -> list[dict]:
    """Set-up failing as each of `failures` says ((step, rank), see FakeSymmMem): every rank must fall back to
    the backend's mover, and the exchange must still be right."""
    from comm.exchange import MoEExchange
    from comm.groups import init_distributed

    tp = topo(spec)
    ctx = init_distributed(tp, backend="gloo", timeout_s=30.0)
    out = []
    try:
        for fail, fail_rank in failures:
            set_provider(FakeSymmMem(fail, fail_rank))
            ex = MoEExchange(ctx, 8, 2, torch.float32, 4, "direct", "padded", 10.0, intra_node="symm_mem")
            data = make_inputs(tp, 3, "full", 8, 2, 3, 4)
            ex.begin_step(4)
            h = ex.dispatch(*(data[ctx.rank] if ctx.is_attention else (None, None, None, None)), 0)
            y = ex.combine(fake_moe(h.batch, tp.expert_index(ctx.rank)) if ctx.is_expert else None, h)
            ex.drain()
            out.append({"mover": ex.mover.name, "ok": y is None or torch.equal(y, reference(*data[ctx.rank])),
                        "windows": [ch.window is not None for ch in ex.channels]})
            ex.close()
    finally:
        ctx.shutdown()
    return out


def gpu_case(spec: str, transports: list[str], dtype_name: str = "float32") -> dict:
    """On CUDA (NCCL, one GPU per rank): nccl vs symm_mem movers, eager and as a replayed CUDA graph, every
    output checked against the reference and bitwise across movers; returns failures and movers used."""
    from comm.exchange import MoEExchange
    from comm.groups import init_distributed

    tp = topo(spec)
    ctx = init_distributed(tp, backend="nccl", timeout_s=60.0)
    dev, dtype = ctx.device, getattr(torch, dtype_name)
    hidden, top_k, slots, T = 64, 4, 6, 24
    failures, movers, outs = [], {}, {}
    try:
        for transport in transports:
            for intra in ("nccl", "symm_mem"):
                ex = MoEExchange(ctx, hidden, top_k, dtype, T, transport, "padded", 30.0, channels=2, intra_node=intra)
                movers[f"{transport}@{intra}"] = ex.mover.name
                cases = [make_inputs(tp, seed, "full", hidden, top_k, slots, T) for seed in range(3)]
                ex.begin_step(T)

                def step(args, u):
                    h = ex.dispatch(*args, 0, channel=u)
                    y = fake_moe(h.batch, tp.expert_index(ctx.rank)) if ctx.is_expert else None
                    return ex.combine(y, h)

                def on_dev(data):
                    return [t.to(dev) for t in data[ctx.rank]] if ctx.is_attention else [None] * 4

                for i, data in enumerate(cases[:2]):  # eager, both channels
                    out = step(on_dev(data), i % 2)
                    ex.drain()
                    _check(out, data, ctx, f"{spec} {transport}@{intra} eager {i}", failures, outs, (transport, i))
                static = on_dev(cases[0])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    g_out = step(static, 0)
                for i, data in enumerate(cases):  # replay on fresh inputs copied into the captured tensors
                    if ctx.is_attention:
                        for t, new in zip(static, on_dev(data)):
                            t.copy_(new)
                    graph.replay()
                    ex.drain()
                    _check(g_out, data, ctx, f"{spec} {transport}@{intra} graph {i}", failures, outs,
                           (transport, "g", i))
                del graph
                ex.close()
    finally:
        torch.cuda.synchronize()
        ctx.shutdown(abort=True)
    return {"failures": failures, "movers": movers}


def _check(out, data, ctx, tag: str, failures: list, outs: dict, key: tuple) -> None:
    if not ctx.is_attention:
        return
    ref = reference(*[t.float() for t in data[ctx.rank]]).to(out.dtype)
    got = out.cpu()
    if not torch.equal(got, ref):
        failures.append(f"{tag}: rank {ctx.rank} combine differs from reference (max err "
                        f"{(got.float() - ref.float()).abs().max()})")
    first = outs.setdefault(key, got)
    if not torch.equal(first, got):
        failures.append(f"{tag}: rank {ctx.rank} differs bitwise between movers")
