"""Routing plans: the path every (attention rank a, expert rank e) *key* takes through 3 stages.

A key's rows are a's tokens with at least one top-k slot on e (each token once). Their positions
after stages 0, 1, 2 are ``pos = (p0=a, p1, p2, p3=e)``; a transport (direct.py, two_phase.py)
is the function that picks them. Combine runs the same stages backwards; a stage in which no key
moves is skipped. Inside a stage, a packet from p to q holds the keys with ``pos[s] == p`` and
``pos[s+1] == q`` in sorted key order; both ends derive that list from the topology alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from comm.topology import Topology

NUM_STAGES = 3

Key = tuple[int, int]  # (attention rank, expert rank), global ranks
Hops = Callable[[Topology, int, int], tuple[int, int, int, int]]


@dataclass
class RoutePlan:
    """Static routing of all keys for one transport (identical on every rank)."""

    name: str
    topology: Topology
    pos: dict[Key, tuple[int, int, int, int]]
    # sends[s][p] = [(q, [keys...]), ...] sorted by q (q == p: stays on p); recvs[s][q] likewise by source
    sends: list[dict[int, list[tuple[int, list[Key]]]]] = field(default_factory=list)
    recvs: list[dict[int, list[tuple[int, list[Key]]]]] = field(default_factory=list)
    active_stages: tuple[int, ...] = ()

    def first_hop_keys(self, rank: int) -> list[Key]:
        """The keys an attention rank packs, in its stage-0 send order (by next hop, then key)."""
        return [k for _q, keys in self.sends[0].get(rank, []) for k in keys]

    def stage_peers(self, rank: int, s: int) -> tuple[list[tuple[int, list[Key]]], list[tuple[int, list[Key]]]]:
        """(sends, recvs) of `rank` in stage s: [(peer, keys)] with the peer's keys in packet order."""
        return self.sends[s].get(rank, []), self.recvs[s].get(rank, [])

    def held_after(self, rank: int, s: int) -> list[Key]:
        """Keys `rank` holds after stage s, in its receive order (by source, then key)."""
        return [k for _p, keys in self.recvs[s].get(rank, []) for k in keys]


def build_route(topo: Topology, name: str, hops: Hops) -> RoutePlan:
    pos = {(a, e): hops(topo, a, e) for a in topo.attention_ranks for e in topo.expert_ranks}
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
