"""Routing plans: the path every (attention rank a, expert rank e) segment takes through 3 stages.

A *segment* is the set of a's tokens that route to at least one expert on e (each token once).
Its positions after stages 0, 1, 2 are ``pos = (p0=a, p1, p2, p3=e)``:

* ``direct``:    ``(a, e, e, e)``: one hop, straight across the network when nodes differ.
* ``two_phase`` (Janus): same node: ``(a, e, e, e)``; otherwise ``(a, g, x, e)`` where the gateway
  ``g = gateway(node(a), node(e))`` is a rank on a's node and the entry ``x = entry(node(a), node(e))``
  a rank on e's node. Stage 0 gathers a node's rows bound for node m onto g (intra-node), stage 1
  sends ONE packet per node pair over the network, stage 2 spreads it on the receiving node.
  Gateways are spread over the sending node's attention ranks by destination node, entries over
  the receiving node's expert ranks by source node, so a source that is its own gateway (or a
  destination that is its own entry) saves a hop: with one rank per node two_phase == direct.

Combine runs the same stages backwards. A stage in which no segment moves is skipped.
Inside a stage, a packet from p to q holds the segments with ``pos[s] == p`` and ``pos[s+1] == q``
in sorted key order; both ends derive that key list from the topology alone, so only the row
counts (one int64 per key) travel as a header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from afsplit.topology import Topology

TRANSPORTS = ("direct", "two_phase", "adaptive")
NUM_STAGES = 3

Key = tuple[int, int]  # (attention rank, expert rank), global ranks


def _spread(topo: Topology, node: int, peer_node: int, prefer_attention: bool) -> int:
    """The rank on `node` that handles traffic with `peer_node`: peers are spread round-robin over the
    node's ranks of the preferred role (any rank if it has none)."""
    local = topo.ranks_on_node(node)
    cands = [r for r in local if (topo.ranks[r].is_attention if prefer_attention else topo.ranks[r].is_expert)]
    cands = cands or list(local)
    others = [n for n in range(topo.num_nodes) if n != node]
    return cands[others.index(peer_node) % len(cands)]


def gateway(topo: Topology, src_node: int, dst_node: int) -> int:
    """Rank on `src_node` that gathers the rows of src_node bound for dst_node."""
    return _spread(topo, src_node, dst_node, prefer_attention=True)


def entry(topo: Topology, src_node: int, dst_node: int) -> int:
    """Rank on `dst_node` that receives node src_node's packet and forwards it locally."""
    return _spread(topo, dst_node, src_node, prefer_attention=False)


@dataclass
class RoutePlan:
    """Static routing of all segments for one transport (identical on every rank)."""

    name: str
    topology: Topology
    pos: dict[Key, tuple[int, int, int, int]]
    # sends[s][p] = [(q, [keys...]), ...] sorted by q (q == p: stays on p); recvs likewise by source
    sends: list[dict[int, list[tuple[int, list[Key]]]]] = field(default_factory=list)
    recvs: list[dict[int, list[tuple[int, list[Key]]]]] = field(default_factory=list)
    active_stages: tuple[int, ...] = ()

    def holds(self, rank: int, s: int) -> list[Key]:
        """Keys held by `rank` before stage s (s = NUM_STAGES: at the end)."""
        return sorted(k for k, p in self.pos.items() if p[s] == rank)

    def capacity(self, rank: int, s: int, max_tokens: int, top_k: int) -> int:
        """Rows `rank` can hold before stage s, with at most max_tokens tokens per attention rank.

        A token goes to at most min(top_k, n) of the n expert ranks a source reaches through
        `rank`, and at most once to each, so the bound is sum over sources of max_tokens*min(top_k, n).
        """
        per_src: dict[int, int] = {}
        for (a, _e), p in self.pos.items():
            if p[s] == rank:
                per_src[a] = per_src.get(a, 0) + 1
        return sum(max_tokens * min(top_k, n) for n in per_src.values())


def build_plan(topo: Topology, name: str) -> RoutePlan:
    if name not in ("direct", "two_phase"):
        raise ValueError(f"unknown transport {name!r}; valid: direct, two_phase (adaptive picks one of them)")
    pos: dict[Key, tuple[int, int, int, int]] = {}
    for a in topo.attention_ranks:
        for e in topo.expert_ranks:
            n, m = topo.node_of(a), topo.node_of(e)
            if name == "direct" or n == m:
                pos[(a, e)] = (a, e, e, e)
            else:
                g, x = gateway(topo, n, m), entry(topo, n, m)
                pos[(a, e)] = (a, g, x, e)
    plan = RoutePlan(name, topo, pos)
    active = []
    for s in range(NUM_STAGES):
        sends: dict[int, dict[int, list[Key]]] = {}
        recvs: dict[int, dict[int, list[Key]]] = {}
        moved = False
        for k in sorted(pos):
            p, q = pos[k][s], pos[k][s + 1]
            moved |= p != q
            sends.setdefault(p, {}).setdefault(q, []).append(k)
            recvs.setdefault(q, {}).setdefault(p, []).append(k)
        plan.sends.append({p: sorted(d.items()) for p, d in sends.items()})
        plan.recvs.append({q: sorted(d.items()) for q, d in recvs.items()})
        if moved:
            active.append(s)
    plan.active_stages = tuple(active)
    return plan
