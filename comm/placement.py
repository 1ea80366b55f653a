"""Expert placement: which logical experts each expert rank holds, per MoE layer (the replica map).

A :class:`Placement` lists, for every MoE layer and every expert rank (by its *expert index* j, its
position in ``Topology.expert_ranks``), the logical experts stored in that rank's local slots::

    placement.slots(layer, j) == (3, 17, 42)   # rank j's stacked weights are experts 3, 17, 42

A logical expert may sit on several ranks: those are its replicas (same weights, so it does not
matter which one serves a token; :mod:`comm.balancer` picks the least-loaded one). Layer indices are
MoE-layer indices (0..num_layers-1, dense layers not counted), the same numbering as in
:mod:`comm.expert_stats` and :mod:`comm.balancer`. Placements are planned by
:mod:`comm.replica_planner` and read from / written to YAML files by ``afsplit/placement_file.py``.
"""


from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from comm.errors import ConfigError

LayerSlots = tuple[tuple[int, ...], ...]  # [j] -> logical experts in rank j's slots


def default_capacity(num_experts: int, num_expert_ranks: int, spare_slots_per_rank: int = 0) -> int:
    """Slots per expert rank: ceil(E / n) for one copy of every expert, plus the spare slots."""
    return math.ceil(num_experts / num_expert_ranks) + spare_slots_per_rank


@dataclass(frozen=True)
class Placement:
    """Per layer, per expert index j: the logical experts in rank j's local slots."""

    num_experts: int
    layers: tuple[LayerSlots, ...]  # [L][j][slot] -> logical expert id

    # -- shape ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_expert_ranks(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def slots(self, layer: int, expert_index: int) -> tuple[int, ...]:
        """Logical experts held by expert rank `expert_index` in `layer`, in local-slot order."""
        return self.layers[layer][expert_index]

    @property
    def slots_per_rank(self) -> int:
        """The largest number of slots any rank holds in any layer (the stacked weights' size)."""
        return max((len(s) for layer in self.layers for s in layer), default=0)

    # -- derived replica map -------------------------------------------------------------------

    @cached_property
    def _replicas(self) -> tuple[tuple[tuple[tuple[int, int], ...], ...], ...]:
        out = []
        for layer in self.layers:
            reps: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
            for j, slots in enumerate(layer):
                for s, e in enumerate(slots):
                    if 0 <= e < self.num_experts:
                        reps[e].append((j, s))
            out.append(tuple(tuple(r) for r in reps))  # (j, slot) ascending: j-major
        return tuple(out)

    def replicas(self, layer: int, expert: int) -> tuple[tuple[int, int], ...]:
        """The (expert index, local slot) of every replica of logical `expert`, by expert index."""
        return self._replicas[layer][expert]

    def num_replicas(self, layer: int) -> list[int]:
        return [len(r) for r in self._replicas[layer]]

    def has_replicas(self, layer: int | None = None) -> bool:
        layers = range(self.num_layers) if layer is None else (layer,)
        return any(n > 1 for l in layers for n in self.num_replicas(l))

    # -- validation ----------------------------------------------------------------------------

    def validate(self, capacity: int | None = None, where: str = "placement",
                 capacity_note: str = "") -> None:
        """Raise ConfigError (naming layer, expert and rank) if the placement cannot be served.

        Checks: every layer has the same number of expert ranks, expert ids are in [0, E), no rank
        holds one expert twice, every logical expert has a replica, no rank exceeds `capacity`.
        """
        E, n = self.num_experts, self.num_expert_ranks
        if not self.layers:
            raise ConfigError(f"{where}: no layers")
        for l, layer in enumerate(self.layers):
            if len(layer) != n:
                raise ConfigError(f"{where}: layer {l}: {len(layer)} expert ranks, layer 0 has {n}")
            seen = [False] * E
            for j, slots in enumerate(layer):
                for s, e in enumerate(slots):
                    if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < E:
                        raise ConfigError(
                            f"{where}: layer {l}: expert rank {j} slot {s}: unknown expert id {e!r} "
                            f"(the model has {E} experts: 0-{E - 1})")
                dup = [e for e, c in Counter(slots).items() if c > 1]
                if dup:
                    raise ConfigError(
                        f"{where}: layer {l}: expert rank {j} holds expert {dup[0]} twice "
                        "(replicas of one expert must be on different ranks)")
                if capacity is not None and len(slots) > capacity:
                    raise ConfigError(
                        f"{where}: layer {l}: expert rank {j} holds {len(slots)} experts > capacity "
                        f"{capacity}{capacity_note}")
                for e in slots:
                    seen[e] = True
            missing = [e for e in range(E) if not seen[e]]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ConfigError(f"{where}: layer {l}: expert {missing[0]}{more} has no replica on any expert rank")

    # -- after a loss ----------------------------------------------------------------------------

    def after_loss(self, kept: list[int], capacity: int) -> tuple["Placement", dict, list[tuple[int, int]]]:
        """The placement over the expert ranks that survive (`kept`: their old expert indices, in order;
        new index = position), with every slot a survivor holds kept where it is.

        An expert whose every replica was lost goes to a spare slot (a rank holding fewer than
        `capacity` experts, the fewest first), else over a slot whose expert still has another
        replica (the most-replicated first). Returns (placement, reloads {new index: {layer:
        [(slot, expert)]}}: what each survivor must load, lost [(layer, expert)]: what fit nowhere).
        Deterministic: every rank computes the same result."""
        layers, reloads, lost = [], {}, []
        for l, layer in enumerate(self.layers):
            slots = [list(layer[j]) for j in kept]
            copies = Counter(e for s in slots for e in s)
            for e in (x for x in range(self.num_experts) if not copies[x]):
                free = [i for i in range(len(slots)) if len(slots[i]) < capacity]
                if free:
                    i = min(free, key=lambda q: (len(slots[q]), q))
                    slots[i].append(e)
                    s = len(slots[i]) - 1
                else:
                    spare = [(copies[x], -i, -s, i, s) for i, row in enumerate(slots) for s, x in enumerate(row)
                             if copies[x] >= 2]
                    if not spare:
                        lost.append((l, e))
                        continue
                    *_, i, s = max(spare)
                    copies[slots[i][s]] -= 1
                    slots[i][s] = e
                copies[e] += 1
                reloads.setdefault(i, {}).setdefault(l, []).append((s, e))
            layers.append(tuple(tuple(s) for s in slots))
        return Placement(self.num_experts, tuple(layers)), reloads, lost

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_expert_ranks: int) -> "Placement":
        """No replicas: contiguous blocks of experts per rank (the first E % n ranks get one more)."""
        if num_expert_ranks < 1 or num_experts < 1 or num_layers < 1:
            raise ConfigError(f"round_robin: need >= 1 layer, expert and expert rank, got "
                              f"{num_layers}, {num_experts}, {num_expert_ranks}")
        base, extra = divmod(num_experts, num_expert_ranks)
        layer, start = [], 0
        for j in range(num_expert_ranks):
            size = base + (j < extra)
            layer.append(tuple(range(start, start + size)))
            start += size
        return cls(num_experts, (tuple(layer),) * num_layers)
