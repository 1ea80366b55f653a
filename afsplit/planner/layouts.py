"""Deployment layouts: which ranks play which role on which nodes, as classes of identical nodes.

* ``engine``: one GPU running the single-process engine (every expert local, no exchange).
* ``colocated``: every rank is attention and expert (DP attention + EP), `c` ranks per node.
* ``af``: attention and expert ranks; per node (every node ``{attention: a, expert: e}``) or across
  nodes (``na`` nodes of attention ranks, ``ne`` nodes of expert ranks), or any mix of node classes.

One layout is one *instance*; a cluster of N GPUs runs N / gpus of them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from afsplit.errors import ConfigError


@dataclass(frozen=True)
class NodeGroup:
    """`count` identical nodes, each with `attention` and `expert` ranks (colocated: both the same ranks)."""

    count: int
    attention: int
    expert: int


@dataclass(frozen=True)
class Layout:
    kind: str  # engine | colocated | af
    groups: tuple[NodeGroup, ...]

    def __hash__(self) -> int:  # layouts key the step model's caches: hash once
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash((self.kind, self.groups))

    @cached_property
    def num_nodes(self) -> int:
        return sum(g.count for g in self.groups)

    @cached_property
    def num_attention_ranks(self) -> int:
        return sum(g.count * g.attention for g in self.groups)

    @cached_property
    def num_expert_ranks(self) -> int:
        return sum(g.count * g.expert for g in self.groups)

    @cached_property
    def gpus(self) -> int:
        if self.kind == "af":
            return self.num_attention_ranks + self.num_expert_ranks
        return self.num_attention_ranks

    @property
    def max_gpus_per_node(self) -> int:
        return max((g.attention + g.expert if self.kind == "af" else g.attention) for g in self.groups)

    def label(self) -> str:
        if self.kind == "engine":
            return "single GPU (engine)"
        if self.kind == "colocated":
            return "colocated " + " + ".join(f"{g.attention}/node x {g.count}" for g in self.groups)
        parts = []
        for g in self.groups:
            roles = "+".join(f"{n}{r}" for n, r in ((g.attention, "A"), (g.expert, "E")) if n)
            parts.append(f"{roles} x {g.count}")
        return "AF " + ", ".join(parts)

    def topology_nodes(self) -> list[dict]:
        """topology.nodes of a config for this layout."""
        out = []
        for g in self.groups:
            if self.kind == "af":
                node = {k: v for k, v in (("attention", g.attention), ("expert", g.expert)) if v}
            else:
                node = {"colocated": g.attention}
            out += [dict(node) for _ in range(g.count)]
        return out


def engine_layout() -> Layout:
    return Layout("engine", (NodeGroup(1, 1, 1),))


def colocated(per_node: int, nodes: int) -> Layout:
    return Layout("colocated", (NodeGroup(nodes, per_node, per_node),))


def af_per_node(attention: int, expert: int, nodes: int) -> Layout:
    return Layout("af", (NodeGroup(nodes, attention, expert),))


def af_across_nodes(attention_nodes: int, expert_nodes: int, per_node: int) -> Layout:
    return Layout("af", (NodeGroup(attention_nodes, per_node, 0), NodeGroup(expert_nodes, 0, per_node)))


def layout_from_topology(topology, engine: bool = False) -> Layout:
    """The layout of a config's topology (consecutive identical nodes become one node class)."""
    if engine:
        if topology.world_size != 1:
            raise ConfigError(f"the single-process engine runs one rank, the topology has {topology.world_size}")
        return engine_layout()
    kind = "colocated" if topology.colocated else "af"
    groups: list[NodeGroup] = []
    for spec in topology.nodes:
        a, e = (spec.colocated, spec.colocated) if kind == "colocated" else (spec.attention, spec.expert)
        if groups and (groups[-1].attention, groups[-1].expert) == (a, e):
            groups[-1] = NodeGroup(groups[-1].count + 1, a, e)
        else:
            groups.append(NodeGroup(1, a, e))
    merged: dict[tuple[int, int], int] = {}
    for g in groups:  # node order does not change any time in the model
        merged[(g.attention, g.expert)] = merged.get((g.attention, g.expert), 0) + g.count
    return Layout(kind, tuple(NodeGroup(c, a, e) for (a, e), c in merged.items()))
