"""After a rank is lost: one agreed survivor set, and a fresh world over the survivors.

No collective of the old world can be used (it needs every rank, the dead one too), so the
agreement goes through the job's TCP store, which lives in torchrun's node-0 agent and outlives
any other node:

1. every rank that enters recovery epoch k closes all its pairs (comm/liveness.py: peers blocked
   on it fail at once and enter too), sets ``fo/<k>/started`` and checks in under ``fo/<k>/in/<rank>``;
2. the coordinator (the first attention rank, which must survive: attention-rank death of the
   coordinator ends the job) waits until every rank of the current world has either checked in or
   been stale for ``peer_timeout_s`` (no heartbeat) or reported gone by its node agent, then writes
   the decision ``fo/<k>/decision``:
   the survivors (checked in) and the dead (the rest; after ``timeout_s`` a rank that neither checks
   in nor goes stale counts as dead too);
3. every survivor reads the decision and joins a new default process group on the store prefix
   ``world<k>/`` with its new rank (its position among the survivors); a rank not in the decision
   learns that it was declared dead and exits. The old groups are kept, never destroyed: a
   destroy may wait on work that will never finish.

Ranks are named by their launch-time global rank (``orig``) in the store, so a second failure after
the first is epoch k + 1 over the survivors of epoch k.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from comm.errors import CommError

log = logging.getLogger(__name__)

POLL_S = 0.02
PREFIX = "afsplit/fo/"
_GRAVEYARD: list = []  # process groups of earlier worlds: kept alive so that nothing waits on their teardown


class FinalError(CommError):
    """A recovery that cannot succeed by trying again (this rank was declared dead, the coordinator is gone)."""


@dataclass
class Decision:
    epoch: int
    survivors: list[int]  # launch-time ranks, in rank order: position = new rank
    dead: list[int]
    detected_s: float = 0.0  # coordinator: from the dead rank's last heartbeat seen to this recovery's start


class SurvivorAgreement:
    """Steps 1-2 of the module docstring for one rank (store: a connection of this thread)."""

    def __init__(self, store, orig: int, coordinator_orig: int, liveness, peer_timeout_s: float, timeout_s: float):
        self.store, self.orig, self.coordinator = store, orig, coordinator_orig
        self.liveness, self.peer_timeout_s, self.timeout_s = liveness, peer_timeout_s, timeout_s
        self.epoch = 0

    def next_started(self, store=None) -> bool:
        """Whether some rank has started the next recovery (epoch + 1), from the store (another thread: its own
        connection)."""
        return (store or self.store).check([f"{PREFIX}{self.epoch + 1}/started"])

    def agree(self, world: list[int], note: dict) -> Decision:
        """Check in for the next epoch and return the coordinator's decision (collective over the living)."""
        k = self.epoch + 1
        self.store.set(f"{PREFIX}{k}/started", "1")
        self.store.set(f"{PREFIX}{k}/in/{self.orig}", json.dumps(note))
        decision = self._decide(k, world) if self.orig == self.coordinator else self._await(k)
        self.epoch = k
        if self.orig not in decision.survivors:
            raise FinalError(f"rank {self.orig} was declared dead by the coordinator in recovery {k} (it did not "
                            f"answer within comm.peer_timeout_s = {self.peer_timeout_s:g} s); exiting")
        return decision

    def _decide(self, k: int, world: list[int]) -> Decision:
        start = time.monotonic()
        deadline = start + self.timeout_s
        while True:
            checked = [r for r in world if self.store.check([f"{PREFIX}{k}/in/{r}"])]
            pending = [r for r in world if r not in checked]
            gone = [r for r in pending if self.liveness.stale_for(r) >= self.peer_timeout_s or self.liveness.gone(r)]
            waiting = [r for r in pending if r not in gone]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if waiting:
            log.warning("recovery %d: ranks %s neither checked in nor went silent within %g s: counted dead",
                        k, waiting, self.timeout_s)
        dead = sorted(gone + waiting)
        seen = [self.liveness.last_alive(r) for r in dead]
        detected = max(0.0, start - min(s for s in seen if s is not None)) if any(s is not None for s in seen) else 0.0
        decision = Decision(k, checked, dead, detected)
        self.store.set(f"{PREFIX}{k}/decision", json.dumps({"survivors": checked, "dead": dead}))
        return decision

    def _await(self, k: int) -> Decision:
        key = f"{PREFIX}{k}/decision"
        deadline = time.monotonic() + 2 * self.timeout_s
        while not self.store.check([key]):
            if self.liveness.stale_for(self.coordinator) >= self.peer_timeout_s:
                raise FinalError(f"recovery {k}: the coordinator rank {self.coordinator} is gone (no heartbeat for "
                                f"{self.peer_timeout_s:g} s); without it the job cannot go on")
            if time.monotonic() > deadline:
                raise CommError(f"recovery {k}: no decision from the coordinator rank {self.coordinator} within "
                                f"{2 * self.timeout_s:g} s (rank {self.orig} waiting)")
            time.sleep(POLL_S)
        d = json.loads(self.store.get(key).decode())
        return Decision(k, d["survivors"], d["dead"])


def rejoin_world(store, epoch: int, survivors: list[int], orig: int, backend: str, device, timeout_s: float):
    """Step 3: a new default process group over the survivors (new rank = position in `survivors`) and
    a gloo control group; returns (rank, world size, data group, control group)."""
    from torch.distributed import distributed_c10d as c10d

    if c10d.GroupMember.WORLD is not None:
        _GRAVEYARD.append(c10d._world.default_pg)
        c10d._world.default_pg = None  # the old world stays referenced (never torn down) but is no longer the default
    rank, size = survivors.index(orig), len(survivors)
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"afsplit/world{epoch}/", store), rank=rank,
                            world_size=size, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return rank, size, dist.group.WORLD, control


def bury(*groups) -> None:
    """Keep groups of a world being left alive (see rejoin_world)."""
    _GRAVEYARD.extend(g for g in groups if g is not None)
