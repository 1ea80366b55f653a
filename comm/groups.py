"""Process groups for afsplit: one data group (NCCL on GPU, gloo on CPU) and one CPU gloo control group.

Ranks are started by torchrun (one per node; see launch/local_cluster.py for the single-host
simulation) and read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the
environment. Nothing here hard-codes an address.

    ctx = init_distributed(config.topology.topology, backend=config.comm.backend,
                           timeout_s=config.comm.timeout_s, config_fingerprint=config.to_dict())
    ...
    ctx.shutdown()

Checks made before any collective: WORLD_SIZE equals the topology's rank count (with the
arithmetic in the message) and LOCAL_RANK matches the topology's node layout. The first
collective (over the control group) verifies that every rank was started with the same topology
and config; a mismatch names the ranks that disagree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from comm.errors import ConfigError
from comm.topology import Topology

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistContext:
    """Everything a rank knows about the process groups it belongs to."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    topology: Topology
    backend: str  # backend of the data group: "nccl" or "gloo"
    data_group: Any  # ProcessGroup carrying token payloads
    control_group: Any  # CPU gloo ProcessGroup for counts, headers and checks
    timeout_s: float = 120.0
    owns_process_group: bool = field(default=True, repr=False)

    @property
    def node(self) -> int:
        return self.topology.node_of(self.rank)

    @property
    def is_attention(self) -> bool:
        return self.topology.ranks[self.rank].is_attention

    @property
    def is_expert(self) -> bool:
        return self.topology.ranks[self.rank].is_expert

    def with_topology(self, topology: Topology) -> "DistContext":
        """The same process groups seen through another topology of the same world size (tests)."""
        if topology.world_size != self.world_size:
            raise ConfigError(
                f"topology has {topology.world_size} ranks but the process group has {self.world_size}")
        return DistContext(self.rank, self.world_size, self.local_rank, self.device, topology, self.backend,
                           self.data_group, self.control_group, self.timeout_s, owns_process_group=False)

    def barrier(self) -> None:
        """A CPU barrier over the control group (with the context's timeout)."""
        dist.barrier(self.control_group)

    def shutdown(self, abort: bool = False) -> None:
        """Tear down the process groups (idempotent). `abort=True` after a failure: don't wait for peers."""
        if not self.owns_process_group or not dist.is_initialized():
            return
        if abort and self.backend == "nccl":
            abort_fn = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort_fn is not None:
                try:
                    abort_fn()
                    return
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001
            log.warning("destroy_process_group failed: %s", e)


def leave_process(rc: int) -> NoReturn:
    """End this rank's process with exit status `rc` now: flush stdio and logging, then ``os._exit``.

    Call it once the rank's work is written and its groups are shut down. Why not a normal exit: the
    interpreter's teardown then runs the C++ destructors of torch.distributed's objects (process groups
    of earlier runtimes, store clients, transport threads) in no fixed order, and one still holding a
    joinable thread aborts the process ("terminate called without an active exception", SIGABRT) -- a
    job that finished would be reported as a dead rank. Seen about once in a few hundred rank exits."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a closed pipe: nothing more to say
            pass
    logging.shutdown()
    os._exit(rc)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(
            f"{name} is not set: start afsplit ranks with torchrun (or python -m launch.local_cluster), "
            "which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def fingerprint(topology: Topology, extra: Any = None) -> str:
    """A short hash of the topology and (optionally) a JSON-able config, equal on ranks that agree."""
    payload = {"nodes": [[n.attention, n.expert, n.colocated] for n in topology.nodes], "extra": extra}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify_same_config(ctx: DistContext, digest: str) -> None:
    """Collective over the control group: every rank must pass the same digest."""
    digests: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(digests, digest, group=ctx.control_group)
    groups: dict[str, list[int]] = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    if len(groups) > 1:
        majority = max(groups.values(), key=len)
        odd = sorted(r for d, ranks in groups.items() if ranks is not majority for r in ranks)
        detail = "; ".join(f"ranks {ranks} have {d}" for d, ranks in groups.items())
        raise ConfigError(
            f"ranks {odd} were started with a different topology/config than ranks {majority} ({detail}); "
            "start every node with the same config file and overrides")


def init_distributed(
    topology: Topology,
    backend: str = "auto",
    timeout_s: float = 120.0,
    device: str | None = None,
    config_fingerprint: Any = None,
) -> DistContext:
    """Join the cluster described by `topology` (collective over all ranks).

    backend: "auto" picks NCCL when CUDA is available (and `device` is not "cpu"), else gloo.
    device: "cpu" or "cuda"; None follows the backend. On CUDA the rank uses cuda:LOCAL_RANK
    (torchrun / local_cluster give each node its own CUDA_VISIBLE_DEVICES, so LOCAL_RANK indexes it).
    config_fingerprint: any JSON-able value (e.g. Config.to_dict()) that must be equal on all ranks.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"comm.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"{name} is not set: start afsplit ranks with torchrun (it sets the rendezvous address)")
    topology.check_world_size(world_size)
    expected_local = topology.ranks[rank].local_rank
    if local_rank != expected_local:
        raise ConfigError(
            f"rank {rank}: LOCAL_RANK={local_rank} but the topology puts it on node {topology.node_of(rank)} "
            f"as local rank {expected_local}; the per-node process counts (--nproc-per-node) do not match "
            f"topology.nodes ({', '.join(str(n.nprocs) for n in topology.nodes)})")

    if backend == "auto":
        backend = "nccl" if (torch.cuda.is_available() and device != "cpu") else "gloo"
    if device is None:
        device = "cuda" if backend == "nccl" else "cpu"
    if backend == "nccl" and device != "cuda":
        raise ConfigError("comm.backend: nccl needs topology.device: cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("topology.device: cuda but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank}: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    timeout = timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev  # eager NCCL communicator init: P2P ops then need no prior collective
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timeout, **kwargs)
    try:
        control = dist.new_group(backend="gloo", timeout=timeout)
        data = dist.group.WORLD
        ctx = DistContext(rank, world_size, local_rank, dev, topology, backend, data, control, timeout_s)
        verify_same_config(ctx, fingerprint(topology, config_fingerprint))
        if backend == "nccl":
            # Warm the data communicator with one collective over all ranks (the first P2P batch
            # on a fresh NCCL group must otherwise involve every rank).
            t = torch.ones(1, device=dev)
            dist.all_reduce(t, group=data)
            torch.cuda.synchronize(dev)
    except BaseException:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        raise
    log.info("rank %d/%d (node %d, local %d, %s) on %s, data backend %s", rank, world_size,
             topology.node_of(rank), local_rank, topology.role_of(rank), dev, backend)
    return ctx
