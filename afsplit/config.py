"""One YAML file -> frozen dataclasses (model, topology, runtime, comm, balancer).

Every error names the file, the key path and the fix, e.g.::

    configs/x.yaml: runtime.block_sise: unknown key (did you mean 'block_size'?)

Overrides use the same key paths: ``--set runtime.max_num_seqs=8``. Values in overrides are parsed
as YAML scalars (``8`` is an int, ``true`` a bool, ``[1, 2]`` a list).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from afsplit.errors import ConfigError
from comm.topology import NodeSpec, Topology

DTYPES = ("float32", "float16", "bfloat16")


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to serve and in what precision."""

    path: str = ""  # Hugging Face directory (config.json + *.safetensors)
    tiny: str = ""  # if set and `path` is missing, write a tiny random checkpoint of this family there
    weights: str = field(default="checkpoint", metadata=_choices("checkpoint", "random"))
    preset: str = ""  # with weights: random and no path: a real-shaped model (see afsplit.models.presets)
    dtype: str = field(default="float32", metadata=_choices(*DTYPES))
    max_model_len: int = 0  # 0: the checkpoint's max_position_embeddings
    seed: int = 0  # seed for random weights
    routing_skew: float = 0.0  # random weights only: Zipf exponent added to router logits (0 = none)


@dataclass(frozen=True)
class TopologyConfig:
    """Nodes and the roles of their ranks (see comm/topology.py)."""

    nodes: tuple[NodeSpec, ...] = (NodeSpec(colocated=1),)
    device: str = field(default="cpu", metadata=_choices("cpu", "cuda"))

    @property
    def topology(self) -> Topology:
        return Topology(self.nodes)


@dataclass(frozen=True)
class RuntimeConfig:
    """Scheduler and KV cache settings (vLLM names where one exists)."""

    block_size: int = 16
    num_kv_blocks: int = 0  # 0: derive from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    micro_batches: str = "1"  # an integer >= 1, or "auto"
    seed: int = 0
    profile: bool = False  # synchronise the device at phase boundaries for an exact time split
    cuda_graphs: bool = True  # decode steps as CUDA graphs (padded to batch buckets); off while profiling
    # with cuda_graphs, prefill and mixed steps of the single-process engine as piecewise CUDA graphs (everything but
    # attention, padded to token buckets up to max_num_batched_tokens; afsplit/piecewise_prefill.py)
    prefill_graphs: bool = True
    # the single-process engine launches the next decode step before reading this one's tokens, so the host's
    # sampling, bookkeeping and scheduling overlap the GPU (vLLM's async scheduling; afsplit/step_ahead.py)
    async_scheduling: bool = True
    # the single-process engine captures every decode bucket and prefill token bucket before its first request
    # (compiles and captures at start, not in the first requests' TTFT; afsplit/warm_start.py); off: lazily
    capture_at_start: bool = True


@dataclass(frozen=True)
class CommConfig:
    """How MoE tokens travel between attention and expert ranks."""

    transport: str = field(default="direct", metadata=_choices("direct", "two_phase", "adaptive"))
    timeout_s: float = 120.0
    # failover: when a rank dies or goes silent the survivors agree on who is left, rebuild their groups and go on
    # (afsplit/runtime/failover.py); a rank whose heartbeat has not moved for peer_timeout_s counts as gone
    failover: bool = True
    peer_timeout_s: float = 10.0
    backend: str = field(default="auto", metadata=_choices("auto", "nccl", "gloo"))
    # padded: fixed regions sized by one token-count vote per step, no headers, captured in CUDA graphs;
    # counts: exact-sized payloads after a row-count header per stage (fewer bytes, a host sync per layer)
    metadata: str = field(default="padded", metadata=_choices("padded", "counts"))
    # intra-node links: nccl (the default until the symmetric-memory mover has run on >= 2 GPUs), auto (symmetric
    # memory when NCCL, the torch build and >= 2 ranks on a node allow; else NCCL, logged), or symm_mem (falls
    # back to NCCL when unavailable, logged; needs metadata: padded)
    intra_node: str = field(default="nccl", metadata=_choices("auto", "nccl", "symm_mem"))


@dataclass(frozen=True)
class BalancerConfig:
    """Expert replicas and least-loaded replica selection."""

    replicas: str = "none"  # none | auto | path to a placement YAML
    spare_slots_per_rank: int = 0  # with replicas: auto
    replicas_on_distinct_nodes: bool = False
    stats_path: str = ""  # if set, append per-layer expert activation counts here (JSON lines)
    stats_every_steps: int = 0  # with stats_path: also append (and reset) the counts every N engine steps


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    topology: TopologyConfig = TopologyConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    comm: CommConfig = CommConfig()
    balancer: BalancerConfig = BalancerConfig()
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate and return it."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read config file ({e.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(data).__name__}")
    _resolve_relative_paths(data, path.parent)
    for item in overrides:
        _apply_override(data, item, where)
    return config_from_dict(data, where)


def _resolve_relative_paths(data: dict, base: Path) -> None:
    """Paths written in a config file are relative to that file (overrides stay relative to the cwd)."""
    for section, key in (("model", "path"), ("balancer", "replicas"), ("balancer", "stats_path")):
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and value not in ("none", "auto"):
            value = os.path.expanduser(value)
            data[section][key] = value if os.path.isabs(value) else os.path.normpath(base / value)


def config_from_dict(data: dict, where: str = "<dict>") -> Config:
    config = _build(Config, data, "", where)
    config = dataclasses.replace(config, source=where)
    validate(config)
    return config


def _apply_override(data: dict, item: str, where: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. runtime.max_num_seqs=8")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: key must be section.key, e.g. runtime.max_num_seqs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p} is not a section")
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str, where: str):
    """Build dataclass `cls` from mapping `data`, rejecting unknown keys and wrong types."""
    label = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}: {path}: unknown key ({hint})")
        kwargs[key] = _convert(hints[key], fields[key], value, path, where)
    return cls(**kwargs)


def _convert(tp, f: dataclasses.Field, value: Any, path: str, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, where)
    if typing.get_origin(tp) is tuple:  # tuple[NodeSpec, ...]
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: {path}: expected a non-empty list, got {value!r}")
        return tuple(_build(item_tp, v, f"{path}[{i}]", where) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {path}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: {path}: expected a string, got {value!r}")
        value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {path}: {value!r} is not one of {', '.join(choices)}")
    return value


# ----------------------------------------------------------------------------------------------
# Validation (no model files, no GPU, no process group)


def validate(config: Config, world_size: int | None = None) -> None:
    """Check cross-field rules; `world_size` (from torchrun) is checked against the topology."""
    where = config.source
    m, t, r = config.model, config.topology, config.runtime
    if m.weights == "checkpoint" and not m.path:
        raise ConfigError(f"{where}: model.path: required with model.weights: checkpoint")
    if m.weights == "random" and not (m.path or m.preset):
        raise ConfigError(f"{where}: model.preset: weights: random needs a preset or a path to a config.json")
    if m.tiny:
        from afsplit.models.tiny import TINY_FAMILIES

        if m.tiny not in TINY_FAMILIES:
            raise ConfigError(f"{where}: model.tiny: {m.tiny!r} is not one of {', '.join(TINY_FAMILIES)}")
    if m.preset:
        from afsplit.models.presets import PRESETS

        if m.preset not in PRESETS:
            raise ConfigError(f"{where}: model.preset: {m.preset!r} is not one of {', '.join(PRESETS)}")
    if m.max_model_len < 0:
        raise ConfigError(f"{where}: model.max_model_len: must be >= 1, or 0 for the checkpoint's "
                          f"max_position_embeddings, got {m.max_model_len}")
    if not math.isfinite(m.routing_skew) or m.routing_skew < 0:
        raise ConfigError(f"{where}: model.routing_skew: must be a finite number >= 0 (0 = none), got {m.routing_skew}")
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(r, name) < 1:
            raise ConfigError(f"{where}: runtime.{name}: must be >= 1, got {getattr(r, name)}")
    if r.num_kv_blocks < 0:
        raise ConfigError(f"{where}: runtime.num_kv_blocks: must be >= 0 (0 = derive from memory)")
    if not math.isfinite(r.kv_cache_memory_gb) or r.kv_cache_memory_gb <= 0:
        raise ConfigError(f"{where}: runtime.kv_cache_memory_gb: must be a finite number > 0, "
                          f"got {r.kv_cache_memory_gb}")
    if r.micro_batches != "auto" and not (r.micro_batches.isdigit() and int(r.micro_batches) >= 1):
        raise ConfigError(f"{where}: runtime.micro_batches: expected an integer >= 1 or 'auto', got {r.micro_batches!r}")
    if not math.isfinite(config.comm.timeout_s) or config.comm.timeout_s <= 0:
        raise ConfigError(f"{where}: comm.timeout_s: must be a finite number of seconds > 0, got {config.comm.timeout_s}")
    if not math.isfinite(config.comm.peer_timeout_s) or config.comm.peer_timeout_s <= 0:
        raise ConfigError(f"{where}: comm.peer_timeout_s: must be a finite number of seconds > 0, "
                          f"got {config.comm.peer_timeout_s}")
    if config.comm.intra_node == "symm_mem" and config.comm.metadata != "padded":
        raise ConfigError(f"{where}: comm.intra_node: symm_mem needs comm.metadata: padded (exact counts are known "
                          "only at run time); set comm.metadata: padded or comm.intra_node: auto")
    _validate_topology(t, where, world_size)
    b = config.balancer
    if b.replicas not in ("none", "auto") and not b.replicas.endswith((".yaml", ".yml")):
        raise ConfigError(f"{where}: balancer.replicas: expected none, auto or a placement .yaml path, got {b.replicas!r}")
    if b.spare_slots_per_rank < 0:
        raise ConfigError(f"{where}: balancer.spare_slots_per_rank: must be >= 0")
    if b.stats_every_steps < 0:
        raise ConfigError(f"{where}: balancer.stats_every_steps: must be >= 0 (0: only at the end of a run)")


def _validate_topology(t: TopologyConfig, where: str, world_size: int | None) -> None:
    for i, spec in enumerate(t.nodes):
        for role in ("attention", "expert", "colocated"):
            if getattr(spec, role) < 0:
                raise ConfigError(f"{where}: topology.nodes[{i}].{role}: must be >= 0")
        if spec.nprocs == 0:
            raise ConfigError(f"{where}: topology.nodes[{i}]: a node needs at least one rank (attention, expert or colocated)")
    topo = t.topology
    n_col = sum(s.colocated for s in t.nodes)
    n_att = sum(s.attention for s in t.nodes)
    n_exp = sum(s.expert for s in t.nodes)
    if n_col and (n_att or n_exp):
        raise ConfigError(
            f"{where}: topology.nodes: colocated ranks ({n_col}) cannot be mixed with attention ({n_att}) "
            f"or expert ({n_exp}) ranks; use either colocated or attention + expert")
    if not n_col and (n_att == 0 or n_exp == 0):
        raise ConfigError(
            f"{where}: topology.nodes: AF mode needs at least one attention and one expert rank, "
            f"got {n_att} attention + {n_exp} expert")
    if world_size is not None:
        topo.check_world_size(world_size, where)
