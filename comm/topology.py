"""Cluster topology: which rank sits on which node and plays which role.

Ranks are numbered node by node, as torchrun numbers them (node k's ranks come after node k-1's);
inside a node the attention ranks come first, then the expert ranks. In colocated mode every rank
is both an attention rank (data-parallel attention) and an expert rank (expert parallelism).

    nodes:                       rank  node  local  role
      - {attention: 2}      ->    0     0     0     attention
      - {expert: 2}               1     0     1     attention
                                  2     1     0     expert
                                  3     1     1     expert
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from comm.errors import ConfigError

ATTENTION = "attention"
EXPERT = "expert"
COLOCATED = "colocated"


@dataclass(frozen=True)
class NodeSpec:
    """How many ranks of each role one node runs."""

    attention: int = 0
    expert: int = 0
    colocated: int = 0

    @property
    def nprocs(self) -> int:
        return self.attention + self.expert + self.colocated


@dataclass(frozen=True)
class RankInfo:
    rank: int
    node: int
    local_rank: int
    role: str  # ATTENTION, EXPERT or COLOCATED

    @property
    def is_attention(self) -> bool:
        return self.role in (ATTENTION, COLOCATED)

    @property
    def is_expert(self) -> bool:
        return self.role in (EXPERT, COLOCATED)


@dataclass(frozen=True)
class Topology:
    """The resolved rank -> (node, local rank, role) map of a cluster."""

    nodes: tuple[NodeSpec, ...]

    @cached_property
    def ranks(self) -> tuple[RankInfo, ...]:
        out = []
        for node, spec in enumerate(self.nodes):
            roles = [ATTENTION] * spec.attention + [EXPERT] * spec.expert + [COLOCATED] * spec.colocated
            for local_rank, role in enumerate(roles):
                out.append(RankInfo(len(out), node, local_rank, role))
        return tuple(out)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def colocated(self) -> bool:
        return any(spec.colocated for spec in self.nodes)

    @cached_property
    def attention_ranks(self) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if r.is_attention)

    @cached_property
    def expert_ranks(self) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if r.is_expert)

    def node_of(self, rank: int) -> int:
        return self.ranks[rank].node

    def ranks_on_node(self, node: int) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if r.node == node)

    def role_of(self, rank: int) -> str:
        return self.ranks[rank].role

    def attention_index(self, rank: int) -> int:
        """Position of `rank` among the attention ranks (its data-parallel index)."""
        return self.attention_ranks.index(rank)

    def expert_index(self, rank: int) -> int:
        """Position of `rank` among the expert ranks (its expert-parallel index)."""
        return self.expert_ranks.index(rank)

    def without(self, dead) -> tuple["Topology", list[int]]:
        """The cluster that remains when the ranks `dead` are gone: (its topology, the ranks kept in their
        old numbering, in order -- kept[i] is new rank i). Order and roles are kept; emptied nodes vanish."""
        dead = set(dead)
        kept = [r.rank for r in self.ranks if r.rank not in dead]
        nodes = []
        for n in range(self.num_nodes):
            alive = [self.ranks[r] for r in self.ranks_on_node(n) if r not in dead]
            if alive:
                roles = [r.role for r in alive]
                nodes.append(NodeSpec(roles.count(ATTENTION), roles.count(EXPERT), roles.count(COLOCATED)))
        return Topology(tuple(nodes)), kept

    def arithmetic(self) -> str:
        """How the rank count adds up, for messages: '2 attention + 2 expert ranks = 4'."""
        if self.colocated:
            return f"{self.world_size} colocated ranks"
        return f"{len(self.attention_ranks)} attention + {len(self.expert_ranks)} expert ranks = {self.world_size}"

    def check_world_size(self, world_size: int, where: str = "") -> None:
        """Raise ConfigError with the arithmetic when the launched processes do not match the topology."""
        if world_size == self.world_size:
            return
        per_node = " + ".join(str(n.nprocs) for n in self.nodes)
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}topology: {self.arithmetic()} != {world_size} processes (WORLD_SIZE); launch {per_node} "
            f"processes on the {self.num_nodes} node(s) (torchrun --nproc-per-node per node)")

    def describe(self) -> str:
        """A table of the rank -> node/role map, as printed by `afsplit check-config`."""
        lines = ["rank  node  local_rank  role"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4}  {r.node:>4}  {r.local_rank:>10}  {r.role}")
        return "\n".join(lines)
