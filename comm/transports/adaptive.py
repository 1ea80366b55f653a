"""Adaptive transport choice: a cost model ``alpha + bytes / beta`` per link kind.

alpha/beta are measured once at start-up by a short ping-pong (one intra-node pair, one inter-node
pair) and an extra alpha for the control-plane header exchange; the measuring rank broadcasts its
numbers so every rank holds the same model and therefore makes the same choice. Links are timed on
the path the exchange uses: send/recv over the data group, or -- when intra-node rows go through
symmetric memory (comm/movers/symm_mem.py) -- that mover's own peer copy + node barrier.
The per-call choice is a pure function of (global max tokens per attention rank, model), cached.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.transports.route import RoutePlan

log = logging.getLogger(__name__)

INTRA, INTER = "intra", "inter"


@dataclass(frozen=True)
class LinkModel:
    """One-way message time = alpha + bytes / beta, per link kind (seconds, bytes/second)."""

    alpha_intra: float
    beta_intra: float
    alpha_inter: float
    beta_inter: float
    alpha_ctrl: float  # one header message on the control group

    def time(self, kind: str, nbytes: float) -> float:
        if kind == INTRA:
            return self.alpha_intra + nbytes / self.beta_intra
        return self.alpha_inter + nbytes / self.beta_inter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pingpong(ctx, peer_a: int, peer_b: int, nbytes: int, iters: int, group, device) -> float:
    """Median one-way time of `nbytes` between peer_a and peer_b (others return 0)."""
    if ctx.rank not in (peer_a, peer_b):
        return 0.0
    buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)
    other = peer_b if ctx.rank == peer_a else peer_a
    times = []
    for it in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        if ctx.rank == peer_a:
            dist.send(buf, other, group=group)
            dist.recv(buf, other, group=group)
        else:
            dist.recv(buf, other, group=group)
            dist.send(buf, other, group=group)
        _sync(device)
        if it >= 2:
            times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def _measure_link(ctx, pair: tuple[int, int] | None, small: int, large: int, iters: int,
                  pingpong=None) -> tuple[float, float] | None:
    """(alpha, beta) of the link between `pair` (collective). pingpong(ctx, a, b, nbytes, iters): the path
    to time (default: send/recv over the data group)."""
    if pair is None:
        return None
    a, b = pair
    if pingpong is None:
        pingpong = lambda ctx, a, b, n, it: _pingpong(ctx, a, b, n, it, ctx.data_group, ctx.device)  # noqa: E731
    t_small = pingpong(ctx, a, b, small, iters)
    t_large = pingpong(ctx, a, b, large, max(3, iters // 4))
    out = torch.tensor([t_small, t_large], dtype=torch.float64)
    dist.broadcast(out, src=a, group=ctx.control_group)
    t_small, t_large = out.tolist()
    beta = (large - small) / max(t_large - t_small, 1e-9)
    return t_small, beta


def calibrate(ctx, iters: int = 20, large_bytes: int | None = None, intra_link=None) -> LinkModel:
    """Collective over all ranks: measure alpha/beta for intra- and inter-node links. `intra_link`: the mover's
    own intra-node path (an object with pingpong(ctx, a, b, nbytes, iters) and max_bytes, the same on
    every rank), None for send/recv over the data group."""
    topo = ctx.topology
    if large_bytes is None:
        large_bytes = (32 << 20) if ctx.device.type == "cuda" else (1 << 20)
    per_node = [topo.ranks_on_node(n) for n in range(topo.num_nodes)]
    intra = next(((ns[0], ns[1]) for ns in per_node if len(ns) >= 2), None)
    inter = (topo.ranks_on_node(0)[0], topo.ranks_on_node(1)[0]) if topo.num_nodes >= 2 else None
    small = 64
    if intra_link is not None and intra is not None:
        m_intra = _measure_link(ctx, intra, small, min(large_bytes, intra_link.max_bytes), iters, intra_link.pingpong)
    else:
        m_intra = _measure_link(ctx, intra, small, large_bytes, iters)
    m_inter = _measure_link(ctx, inter, small, large_bytes, iters)
    # header alpha on the control group (CPU tensors over gloo)
    ctrl_pair = inter or intra
    if ctrl_pair is not None:
        a, b = ctrl_pair
        t = _pingpong(ctx, a, b, 8 * 8, iters, ctx.control_group, torch.device("cpu"))
        out = torch.tensor([t], dtype=torch.float64)
        dist.broadcast(out, src=a, group=ctx.control_group)
        alpha_ctrl = out.item()
    else:
        alpha_ctrl = 0.0
    m_intra = m_intra or m_inter or (1e-5, 1e10)
    m_inter = m_inter or m_intra
    model = LinkModel(m_intra[0], m_intra[1], m_inter[0], m_inter[1], alpha_ctrl)
    if ctx.rank == 0:
        log.info("comm link model: intra alpha %.1f us beta %.2f GB/s; inter alpha %.1f us beta %.2f GB/s; "
                 "header alpha %.1f us (intra pair %s over %s, inter pair %s)",
                 model.alpha_intra * 1e6, model.beta_intra / 1e9, model.alpha_inter * 1e6,
                 model.beta_inter / 1e9, model.alpha_ctrl * 1e6, intra,
                 "symmetric memory" if intra_link is not None else "send/recv", inter)
    return model


class CostModel:
    """Estimated dispatch+combine time of a RoutePlan with T tokens on every attention rank.

    Padded metadata moves P = T rows per key; exact counts move the expected T * p_hit rows (uniform
    routing) after one header round per stage.
    """

    def __init__(self, plan: RoutePlan, model: LinkModel, top_k: int, dispatch_row_bytes: int,
                 combine_row_bytes: int, exact: bool = False):
        self.plan, self.model, self.exact = plan, model, exact
        topo = plan.topology
        n_exp = len(topo.expert_ranks)
        # chance that a token's top-k lands on a given expert rank at least once (uniform routing)
        self.p_hit = 1.0 - (1.0 - 1.0 / n_exp) ** top_k
        self.row_d, self.row_c = dispatch_row_bytes, combine_row_bytes
        # per active stage: [(p, q, kind, n_keys)] for p != q
        self.stages = []
        for s in plan.active_stages:
            pairs = []
            for p, dests in plan.sends[s].items():
                for q, keys in dests:
                    if q != p:
                        kind = INTRA if topo.node_of(p) == topo.node_of(q) else INTER
                        pairs.append((p, q, kind, len(keys), topo.node_of(p), topo.node_of(q)))
            self.stages.append(pairs)
        self._cache: dict[int, float] = {}

    def _stage_time(self, pairs, rows_per_key: float, row_bytes: int) -> float:
        send: dict[int, float] = {}
        recv: dict[int, float] = {}
        link: dict[tuple[int, int], float] = {}
        for p, q, kind, nk, n, m in pairs:
            nbytes = nk * rows_per_key * row_bytes
            t = self.model.time(kind, nbytes)
            send[p] = send.get(p, 0.0) + t
            recv[q] = recv.get(q, 0.0) + t
            if kind == INTER:
                link[(n, m)] = link.get((n, m), 0.0) + nbytes / self.model.beta_inter
        return max([0.0, *send.values(), *recv.values(), *link.values()])

    def __call__(self, tokens: int) -> float:
        if tokens in self._cache:
            return self._cache[tokens]
        rows = tokens * self.p_hit if self.exact else tokens
        total = 0.0
        for pairs in self.stages:
            if pairs and self.exact:
                total += self.model.alpha_ctrl  # header round
            total += self._stage_time(pairs, rows, self.row_d)  # dispatch
            total += self._stage_time(pairs, rows, self.row_c)  # combine (reverse direction, same sizes)
        self._cache[tokens] = total
        return total
