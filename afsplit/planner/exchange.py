"""Time of one padded dispatch or combine, per transport, in closed form (no per-rank loops).

The runtime's region exchange is padded: every (sender, receiver) pair moves P rows per
micro-batch (P = the micro-batch's bucket), whatever the routing (``exact`` instead moves only the
rows whose top-k reaches the receiver, as an exchange with row counts would). n messages of one
stage on a link cost ``alpha + n * gap + bytes / beta``: latency once (messages fly together), an
issue cost per message, the bytes; a rank's NVLink and its NIC work in parallel. On top, every
collective call pays the fixed ``call`` cost measured on one rank (launch and bookkeeping).

* direct: each sender sends one message to every receiver; same-node ones over NVLink, the rest
  over its NIC. The time is the slowest sender's or receiver's.
* two_phase (Janus): stage 0 gathers, over NVLink, each node's rows for a remote node onto one
  gateway rank (gateways spread over the node's senders); stage 1 sends one packet per node pair
  over the network; stage 2 spreads it over NVLink from an entry rank (spread over the receiving
  node's ranks). Three calls. With one node it is direct.

A colocated rank is sender and receiver: its own region stays local (no link).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from afsplit.planner.profile_data import Link

TRANSPORTS = ("direct", "two_phase")


@dataclass(frozen=True)
class Side:
    """Ranks of one role on a class of identical nodes: `count` nodes with `per_node` such ranks each."""

    count: int
    per_node: int


def _others(groups: list[tuple[Side, Side]], i: int, role: int) -> tuple[int, int]:
    """(ranks, nodes) of `role` (0 senders, 1 receivers) on nodes other than one node of group i."""
    ranks = nodes = 0
    for j, g in enumerate(groups):
        n = g[role].count - (1 if j == i else 0)
        if g[role].per_node:
            ranks += n * g[role].per_node
            nodes += n
    return ranks, nodes


def one_way(groups: list[tuple[Side, Side]], rows: float, row_bytes: int, intra: Link, inter: Link, call: float,
            transport: str, shared: bool) -> float:
    """Seconds for one exchange from senders to receivers; groups[i] = (senders, receivers) of node class i
    (the same node count on both sides); `shared`: senders are the receivers (colocated)."""
    region = rows * row_bytes
    nodes = sum(s.count for s, _ in groups)
    own = 1 if shared else 0
    if transport == "direct" or nodes <= 1:
        worst = 0.0
        for i, (snd, rcv) in enumerate(groups):
            if snd.per_node:  # one sender of this node class
                remote = _others(groups, i, 1)[0]
                t = max(intra.time((rcv.per_node - own) * region, int(rcv.per_node - own > 0)),
                        inter.time(remote * region, remote))
                worst = max(worst, t)
            if rcv.per_node:  # one receiver
                remote = _others(groups, i, 0)[0]
                t = max(intra.time((snd.per_node - own) * region, int(snd.per_node - own > 0)),
                        inter.time(remote * region, remote))
                worst = max(worst, t)
        return call + worst
    t0 = t1 = t2 = 0.0
    for i, (snd, rcv) in enumerate(groups):
        if snd.per_node:
            remote_ranks, remote_nodes = _others(groups, i, 1)
            s = snd.per_node
            # stage 0: same-node pairs directly, remote rows to the gateways (1/s of them is this rank)
            gather = remote_ranks * region * (s - 1) / s
            t0 = max(t0, intra.time((rcv.per_node - own) * region + gather, int(rcv.per_node - own > 0 or s > 1)))
            # stage 1: this gateway's packets (one per destination node it serves)
            packets = math.ceil(remote_nodes / s)
            t1 = max(t1, inter.time(remote_ranks * region, packets))
        if rcv.per_node:
            remote_ranks, remote_nodes = _others(groups, i, 0)
            r = rcv.per_node
            packets = math.ceil(remote_nodes / r)
            t1 = max(t1, inter.time(remote_ranks * region, packets))
            # stage 2: the entry forwards the rows of the other local receivers
            t2 = max(t2, intra.time(remote_ranks * region * (r - 1) / r, int(r > 1)))
    return 3 * call + t0 + t1 + t2


def rows_per_pair(layout, tokens: int, padded_rows: int, top_k: int, exchange: str) -> float:
    """Rows one (sender, receiver) pair moves: the padded region, or the expected routed rows."""
    if exchange == "padded":
        return padded_rows
    n_e = max(1, layout.num_expert_ranks)
    return tokens * (1.0 - (1.0 - 1.0 / n_e) ** top_k)


def exchange_times(layout, rows: float, shape, intra: Link, inter: Link, call: float, transport: str) -> tuple[float, float]:
    """(dispatch, combine) seconds of one micro-batch, `rows` per (sender, receiver) pair."""
    if layout.kind == "engine":
        return 0.0, 0.0
    shared = layout.kind == "colocated"
    out = [(Side(g.count, g.attention), Side(g.count, g.expert)) for g in layout.groups]
    back = [(e, a) for a, e in out]
    return (one_way(out, rows, shape.dispatch_row_bytes(), intra, inter, call, transport, shared),
            one_way(back, rows, shape.combine_row_bytes(), intra, inter, call, transport, shared))


def exchange_bytes_per_sender(layout, rows: int, shape) -> int:
    """Dispatch bytes one attention rank sends per micro-batch (padded: P rows to every expert rank)."""
    if layout.kind == "engine":
        return 0
    peers = layout.num_expert_ranks - (1 if layout.kind == "colocated" else 0)
    return peers * rows * shape.dispatch_row_bytes()
