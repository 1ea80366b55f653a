"""Replica planning: recorded expert activation counts -> a Placement, and the load it predicts.

The planner (:func:`plan_placement`, EPLB-style greedy) gives the spare slots to the experts with
the highest load per replica and packs the replicas heaviest-first onto the least-loaded rank; see
its docstring. ``replicas: auto`` with no recorded statistics plans from uniform counts
(:func:`uniform_placement`): every expert once, and the spare slots filled with second replicas of
experts 0, 1, 2, ... (spread over other ranks / nodes), which lets least-loaded selection absorb
per-micro-batch fluctuations until real statistics exist.
"""

from __future__ import annotations

import heapq
from typing import Sequence

from comm.balancer import LeastLoadedBalancer
from comm.errors import ConfigError
from comm.placement import LayerSlots, Placement, default_capacity

# ----------------------------------------------------------------------------------------------
# Planner


def as_rows(counts_LE) -> list[list[float]]:
    if hasattr(counts_LE, "tolist"):
        counts_LE = counts_LE.tolist()
    return [[float(x) for x in row] for row in counts_LE]


def plan_placement(counts_LE, topology, spare_slots_per_rank: int = 0,
                   distinct_nodes: bool = False) -> Placement:
    """EPLB-style greedy placement from per-layer expert activation counts ``counts_LE`` [L, E].

    Per layer: (1) start from one replica per expert; give each of the n * spare extra slots, one
    at a time, to the expert with the highest load per replica (ties: lowest expert id; at most one
    replica per rank, so at most n replicas). (2) Place the replicas heaviest-first (load per
    replica, then expert id) onto the expert rank with the least load so far (ties: fewest slots,
    then lowest index) that has a free slot, does not hold this expert and - with
    `distinct_nodes`, when some such rank exists - is on a node holding no replica of it yet.
    Capacity per rank = ceil(E / n) + spare, never exceeded. Slots are sorted by expert id.
    """
    rows = as_rows(counts_LE)
    if not rows:
        raise ConfigError("plan_placement: no layers in the statistics")
    E = len(rows[0])
    ranks = tuple(topology.expert_ranks)
    n = len(ranks)
    if n == 0:
        raise ConfigError("plan_placement: the topology has no expert ranks")
    node = [topology.node_of(r) for r in ranks]
    cap = default_capacity(E, n, spare_slots_per_rank)
    extra = min(n * spare_slots_per_rank, E * (n - 1))
    layers = []
    for l, loads in enumerate(rows):
        if len(loads) != E:
            raise ConfigError(f"plan_placement: layer {l}: {len(loads)} expert counts, layer 0 has {E}")
        layers.append(_plan_layer(loads, n, node, cap, extra, distinct_nodes, l))
    return Placement(E, tuple(layers))


def _plan_layer(loads: list[float], n: int, node: list[int], cap: int, extra: int,
                distinct_nodes: bool, layer: int) -> LayerSlots:
    E = len(loads)
    nrep = [1] * E
    heap = [(-loads[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(extra):
        while heap:
            _, e = heapq.heappop(heap)
            if nrep[e] < n:
                break
        else:
            break
        nrep[e] += 1
        if nrep[e] < n:
            heapq.heappush(heap, (-loads[e] / nrep[e], e))
    items = sorted(((loads[e] / nrep[e], e) for e in range(E) for _ in range(nrep[e])),
                   key=lambda t: (-t[0], t[1]))
    rank_load = [0.0] * n
    slots: list[list[int]] = [[] for _ in range(n)]
    holds: list[set[int]] = [set() for _ in range(n)]
    nodes_of: list[set[int]] = [set() for _ in range(E)]
    for lpr, e in items:
        cands = [j for j in range(n) if len(slots[j]) < cap and e not in holds[j]]
        if distinct_nodes:
            fresh = [j for j in cands if node[j] not in nodes_of[e]]
            cands = fresh or cands
        if not cands:
            j = _make_room(e, slots, holds, cap, loads, nrep, layer)
        else:
            j = min(cands, key=lambda j: (rank_load[j], len(slots[j]), j))
        slots[j].append(e)
        holds[j].add(e)
        nodes_of[e].add(node[j])
        rank_load[j] += lpr
    return tuple(tuple(sorted(s)) for s in slots)


def _make_room(e: int, slots, holds, cap: int, loads, nrep, layer: int) -> int:
    """Every rank with a free slot already holds `e`: move some expert f from a rank k that lacks e
    onto a free rank, and return k for e. Picks the lightest movable f (deterministic)."""
    free = [j for j in range(len(slots)) if len(slots[j]) < cap]
    best = None
    for jf in free:
        for k in range(len(slots)):
            if e in holds[k]:
                continue
            for f in slots[k]:
                if f not in holds[jf]:
                    key = (loads[f] / nrep[f], f, k, jf)
                    if best is None or key < best[0]:
                        best = (key, f, k, jf)
    if best is None:
        raise ConfigError(f"plan_placement: layer {layer}: cannot place a replica of expert {e} "
                          "(every rank with a free slot holds it); use fewer spare slots")
    _, f, k, jf = best
    slots[k].remove(f)
    holds[k].discard(f)
    slots[jf].append(f)
    holds[jf].add(f)
    return k


def uniform_placement(num_layers: int, num_experts: int, topology, spare_slots_per_rank: int = 0,
                      distinct_nodes: bool = False) -> Placement:
    """``replicas: auto`` before statistics exist: the planner on uniform counts (see module doc)."""
    return plan_placement([[1.0] * num_experts] * num_layers, topology, spare_slots_per_rank, distinct_nodes)


# ----------------------------------------------------------------------------------------------
# Predicted load


def predicted_rank_loads(placement: Placement, counts_LE, balance: str = "even") -> list[list[float]]:
    """Per layer, per expert rank: the tokens it would serve for the given expert counts.

    balance="even": each replica gets c_e / n_e (the planner's model). balance="least_loaded": the
    per-replica quotas :class:`comm.balancer.LeastLoadedBalancer` would compute (counts rounded).
    """
    rows = as_rows(counts_LE)
    n = placement.num_expert_ranks
    if balance == "least_loaded":
        import torch

        bal = LeastLoadedBalancer(placement, "cpu")
        out = []
        for l, row in enumerate(rows):
            c = torch.tensor([round(x) for x in row], dtype=torch.int64)[None]
            out.append([float(x) for x in bal.rank_loads(l, c).tolist()])
        return out
    if balance != "even":
        raise ValueError(f"balance must be 'even' or 'least_loaded', got {balance!r}")
    out = []
    for l, row in enumerate(rows):
        rank = [0.0] * n
        for e, c in enumerate(row):
            reps = placement.replicas(l, e)
            for j, _ in reps:
                rank[j] += c / len(reps)
        out.append(rank)
    return out


def max_over_mean(loads: Sequence[float]) -> float:
    """max / mean of per-rank loads (1.0 = perfect balance; 1.0 for an all-zero layer)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def predicted_imbalance(placement: Placement, counts_LE, balance: str = "even") -> list[float]:
    """Per layer: predicted max/mean expert-rank load."""
    return [max_over_mean(r) for r in predicted_rank_loads(placement, counts_LE, balance)]
