"""Expert placement: which logical experts each expert rank holds, per MoE layer (the replica map).

A :class:`Placement` lists, for every MoE layer and every expert rank (by its *expert index* j, its
position in ``Topology.expert_ranks``), the logical experts stored in that rank's local slots::

    placement.slots(layer, j) == (3, 17, 42)   # rank j's stacked weights are experts 3, 17, 42

A logical expert may sit on several ranks: those are its replicas (same weights, so it does not
matter which one serves a token; :mod:`comm.balancer` picks the least-loaded one). Layer indices are
MoE-layer indices (0..num_layers-1, dense layers not counted), the same numbering as in
:mod:`comm.expert_stats` and :mod:`comm.balancer`.

Placement files (YAML, written by ``afsplit plan-experts`` or by hand)::

    format: afsplit-placement/1
    num_experts: 8
    num_expert_ranks: 2          # keys below are expert indices 0..1 (position among expert ranks)
    slots_per_rank: 5            # capacity: no rank holds more slots than this
    default:                     # every layer not listed under `layers`
      0: [0, 1, 2, 3, 7]         # expert index 0 (global rank 2, node 1)
      1: [4, 5, 6, 7]            # expert index 1 (global rank 3, node 1)
    layers:                      # optional: layers that differ from `default`
      3:
        0: [0, 1, 2, 3]
        1: [4, 5, 6, 7, 0]

Either `default` or every layer under `layers` is required. A rank missing from a layer's mapping
holds no experts in that layer. ``Placement.to_file`` writes the most common layer mapping as
`default` (when it occurs more than once) and every other layer explicitly; reading it back gives
an equal ``Placement``.

The planner (:func:`plan_placement`, EPLB-style greedy) turns recorded activation counts into a
placement; see its docstring. ``replicas: auto`` with no recorded statistics plans from uniform
counts: every expert once, and the spare slots filled with second replicas of experts 0, 1, 2, ...
(spread over other ranks / nodes), which lets least-loaded selection absorb per-micro-batch
fluctuations until real statistics exist.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import yaml

from afsplit.errors import ConfigError

FORMAT = "afsplit-placement/1"

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

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_layers: int, num_experts: int, topology,
                  spare_slots_per_rank: int | None = None) -> "Placement":
        """Read and validate a placement YAML (format in the module docstring).

        `topology` gives the number of expert ranks; with `spare_slots_per_rank` the capacity
        ceil(E / n) + spare is enforced too (the file's own `slots_per_rank` always is).
        """
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{where}: cannot read placement file ({e.strerror}); check balancer.replicas") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with `default` and/or `layers`")
        known = {"format", "num_experts", "num_expert_ranks", "num_layers", "slots_per_rank", "default", "layers"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(known))})")
        if data.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{where}: format {data['format']!r} is not {FORMAT!r}")
        n = len(topology.expert_ranks)
        for key, want in (("num_experts", num_experts), ("num_expert_ranks", n), ("num_layers", num_layers)):
            if key in data and data[key] != want:
                raise ConfigError(f"{where}: {key}: file says {data[key]!r}, the model/topology has {want}")

        def parse_layer(mapping, label: str) -> LayerSlots:
            if not isinstance(mapping, dict):
                raise ConfigError(f"{where}: {label}: expected a mapping expert-rank-index -> [experts]")
            slots: list[tuple[int, ...]] = [() for _ in range(n)]
            for j, experts in mapping.items():
                if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < n:
                    ranks = ", ".join(f"{i}=rank {r}" for i, r in enumerate(topology.expert_ranks))
                    raise ConfigError(f"{where}: {label}: expert rank {j!r} does not exist "
                                      f"({n} expert ranks by index: {ranks})")
                if not isinstance(experts, list):
                    raise ConfigError(f"{where}: {label}: expert rank {j}: expected a list of expert ids, got {experts!r}")
                slots[j] = tuple(experts)
            return tuple(slots)

        default = parse_layer(data["default"], "default") if "default" in data else None
        listed = data.get("layers") or {}
        if not isinstance(listed, dict):
            raise ConfigError(f"{where}: layers: expected a mapping layer -> {{expert rank index: [experts]}}")
        layers: list[LayerSlots | None] = [default] * num_layers
        for l, mapping in listed.items():
            if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < num_layers:
                raise ConfigError(f"{where}: layers: layer {l!r} does not exist (the model has {num_layers} MoE layers: 0-{num_layers - 1})")
            layers[l] = parse_layer(mapping, f"layer {l}")
        for l, layer in enumerate(layers):
            if layer is None:
                raise ConfigError(f"{where}: layer {l}: not listed under `layers` and no `default` mapping")
        placement = cls(num_experts, tuple(layers))  # type: ignore[arg-type]
        # Structure first (ids, duplicates, missing experts), then the capacities.
        placement.validate(where=where)
        if "slots_per_rank" in data:
            placement.validate(capacity=int(data["slots_per_rank"]), where=where,
                               capacity_note=" (the file's slots_per_rank)")
        if spare_slots_per_rank is not None:
            cap = default_capacity(num_experts, n, spare_slots_per_rank)
            placement.validate(capacity=cap, where=where, capacity_note=(
                f" = ceil({num_experts} / {n}) + {spare_slots_per_rank} spare (balancer.spare_slots_per_rank)"))
        return placement

    def to_file(self, path: str | os.PathLike, topology=None, header: str = "") -> None:
        """Write the YAML format above; `topology` only adds comments naming global ranks/nodes."""
        n = self.num_expert_ranks
        freq = Counter(self.layers)
        common, count = freq.most_common(1)[0]
        default = common if count > 1 else None

        def comment(j: int) -> str:
            if topology is None:
                return ""
            r = topology.expert_ranks[j]
            return f"  # global rank {r}, node {topology.node_of(r)}"

        def block(layer: LayerSlots, indent: str) -> list[str]:
            return [f"{indent}{j}: [{', '.join(map(str, layer[j]))}]{comment(j)}" for j in range(n)]

        lines = [f"# {h}" for h in header.splitlines()] if header else []
        lines += [
            "# afsplit expert placement: per MoE layer, the logical experts in each expert rank's slots.",
            "# Keys are expert indices (position among the topology's expert ranks); see comm/placement.py.",
            f"format: {FORMAT}",
            f"num_experts: {self.num_experts}",
            f"num_expert_ranks: {n}",
            f"num_layers: {self.num_layers}",
            f"slots_per_rank: {self.slots_per_rank}",
        ]
        if default is not None:
            lines.append("default:")
            lines += block(default, "  ")
        rest = [l for l, layer in enumerate(self.layers) if layer != default]
        if rest:
            lines.append("layers:")
            for l in rest:
                lines.append(f"  {l}:")
                lines += block(self.layers[l], "    ")
        Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Planner


def _as_rows(counts_LE) -> list[list[float]]:
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
    rows = _as_rows(counts_LE)
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


def resolve_placement(balancer_cfg, num_layers: int, num_experts: int, topology) -> Placement:
    """The placement a BalancerConfig asks for.

    none: round robin, no replicas. auto: planned from ``stats_path`` if that file has data, else
    :func:`uniform_placement`. Otherwise a placement YAML path, validated against the capacity
    ceil(E / n) + spare_slots_per_rank.
    """
    n = len(topology.expert_ranks)
    spare = balancer_cfg.spare_slots_per_rank
    if balancer_cfg.replicas == "none":
        return Placement.round_robin(num_layers, num_experts, n)
    if balancer_cfg.replicas == "auto":
        path = balancer_cfg.stats_path
        if path and os.path.exists(path) and os.path.getsize(path) > 0:
            from comm.expert_stats import load_stats

            counts = load_stats(path, num_layers=num_layers, num_experts=num_experts)
            return plan_placement(counts, topology, spare, balancer_cfg.replicas_on_distinct_nodes)
        return uniform_placement(num_layers, num_experts, topology, spare, balancer_cfg.replicas_on_distinct_nodes)
    return Placement.from_file(balancer_cfg.replicas, num_layers, num_experts, topology, spare)


# ----------------------------------------------------------------------------------------------
# Predicted load


def predicted_rank_loads(placement: Placement, counts_LE, balance: str = "even") -> list[list[float]]:
    """Per layer, per expert rank: the tokens it would serve for the given expert counts.

    balance="even": each replica gets c_e / n_e (the planner's model). balance="least_loaded": the
    per-replica quotas :class:`comm.balancer.LeastLoadedBalancer` would compute (counts rounded).
    """
    rows = _as_rows(counts_LE)
    n = placement.num_expert_ranks
    if balance == "least_loaded":
        import torch

        from comm.balancer import LeastLoadedBalancer

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


# ----------------------------------------------------------------------------------------------
# CLI: afsplit plan-experts


def plan_experts_main(argv: list[str]) -> int:
    """``afsplit plan-experts --stats S.jsonl --topology CONFIG.yaml --out P.yaml [--spare-slots N]
    [--distinct-nodes]``: plan a placement from recorded statistics, write it, print the predicted
    max/mean expert-rank load per layer before (round robin, no replicas) and after."""
    from afsplit.config import load_config
    from comm.expert_stats import load_stats

    p = argparse.ArgumentParser(prog="afsplit plan-experts", description=plan_experts_main.__doc__.split("\n")[0])
    p.add_argument("--stats", required=True, help="JSON lines written by the expert statistics recorder")
    p.add_argument("--topology", required=True, help="afsplit config YAML (its topology and balancer sections)")
    p.add_argument("--out", required=True, help="placement YAML to write")
    p.add_argument("--spare-slots", type=int, default=None,
                   help="spare slots per expert rank (default: balancer.spare_slots_per_rank)")
    p.add_argument("--distinct-nodes", action="store_true", default=None,
                   help="put replicas of one expert on different nodes where possible "
                        "(default: balancer.replicas_on_distinct_nodes)")
    args = p.parse_args(argv)
    cfg = load_config(args.topology)
    topo = cfg.topology.topology
    spare = cfg.balancer.spare_slots_per_rank if args.spare_slots is None else args.spare_slots
    if spare < 0:
        raise ConfigError(f"--spare-slots: must be >= 0, got {spare}")
    distinct = cfg.balancer.replicas_on_distinct_nodes if args.distinct_nodes is None else True
    counts = load_stats(args.stats)
    rows = _as_rows(counts)
    L, E = len(rows), len(rows[0])
    n = len(topo.expert_ranks)
    placement = plan_placement(rows, topo, spare, distinct)
    placement.to_file(args.out, topology=topo, header=(
        f"planned by `afsplit plan-experts` from {args.stats} ({sum(map(sum, rows)):.0f} expert activations)\n"
        f"topology {args.topology}: {n} expert ranks, {spare} spare slots per rank, distinct nodes: {distinct}"))
    rr = Placement.round_robin(L, E, n)
    before = predicted_imbalance(rr, rows)
    after = predicted_imbalance(placement, rows)
    after_ll = predicted_imbalance(placement, rows, "least_loaded")
    print(f"placement: {L} layers x {E} experts on {n} expert ranks, capacity "
          f"{default_capacity(E, n, spare)} slots/rank ({spare} spare) -> {args.out}")
    print("max/mean expert-rank load (predicted from the statistics)")
    print("layer  round-robin  planned(even)  planned(least-loaded)")
    for l in range(L):
        print(f"{l:>5}  {before[l]:>11.3f}  {after[l]:>13.3f}  {after_ll[l]:>21.3f}")
    if L > 1:
        print(f"{'worst':>5}  {max(before):>11.3f}  {max(after):>13.3f}  {max(after_ll):>21.3f}")
    return 0
