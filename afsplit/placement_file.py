"""Placement files (YAML), and the placement a config's ``balancer`` section asks for.

Format (written by ``afsplit plan-experts`` or by hand)::

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
holds no experts in that layer. :func:`write_placement` writes the most common layer mapping as
`default` (when it occurs more than once) and every other layer explicitly; reading it back gives
an equal ``Placement``.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import yaml

from afsplit.errors import ConfigError
from comm.placement import LayerSlots, Placement, default_capacity
from comm.expert_stats import load_stats
from comm.replica_planner import as_rows, plan_placement, predicted_imbalance, uniform_placement

FORMAT = "afsplit-placement/1"


def read_placement(path: str | os.PathLike, num_layers: int, num_experts: int, topology,
                   spare_slots_per_rank: int | None = None) -> Placement:
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
    placement = Placement(num_experts, tuple(layers))  # type: ignore[arg-type]
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


def write_placement(placement: Placement, path: str | os.PathLike, topology=None, header: str = "") -> None:
    """Write the YAML format above; `topology` only adds comments naming global ranks/nodes."""
    n = placement.num_expert_ranks
    freq = Counter(placement.layers)
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
        f"num_experts: {placement.num_experts}",
        f"num_expert_ranks: {n}",
        f"num_layers: {placement.num_layers}",
        f"slots_per_rank: {placement.slots_per_rank}",
    ]
    if default is not None:
        lines.append("default:")
        lines += block(default, "  ")
    rest = [l for l, layer in enumerate(placement.layers) if layer != default]
    if rest:
        lines.append("layers:")
        for l in rest:
            lines.append(f"  {l}:")
            lines += block(placement.layers[l], "    ")
    Path(path).write_text("\n".join(lines) + "\n")


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
            counts = load_stats(path, num_layers=num_layers, num_experts=num_experts)
            return plan_placement(counts, topology, spare, balancer_cfg.replicas_on_distinct_nodes)
        return uniform_placement(num_layers, num_experts, topology, spare, balancer_cfg.replicas_on_distinct_nodes)
    return read_placement(balancer_cfg.replicas, num_layers, num_experts, topology, spare)


# ----------------------------------------------------------------------------------------------
# CLI: afsplit plan-experts


def plan_experts_main(argv: list[str]) -> int:
    """``afsplit plan-experts --stats S.jsonl --topology CONFIG.yaml --out P.yaml [--spare-slots N]
    [--distinct-nodes]``: plan a placement from recorded statistics, write it, print the predicted
    max/mean expert-rank load per layer before (round robin, no replicas) and after."""
    from afsplit.config import load_config

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
    rows = as_rows(counts)
    L, E = len(rows), len(rows[0])
    n = len(topo.expert_ranks)
    placement = plan_placement(rows, topo, spare, distinct)
    write_placement(placement, args.out, topology=topo, header=(
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
