"""Surviving the loss of a rank: one rank's side of detection, agreement and the rebuild.

An AF cluster's expert ranks hold no request state, and with replicas every hot expert lives on
more than one rank, so the job can go on without a dead expert rank:

* detection: heartbeats through the rendezvous store (comm/liveness.py); a rank whose heartbeat is
  still for ``comm.peer_timeout_s`` is stale, and this rank's pairs to it are closed, so no wait on
  it lasts longer than that. Any comm failure in a step (a closed pair, a deadline) starts a recovery;
  entering one closes all this rank's pairs, so every peer blocked on it follows within milliseconds.
* agreement: the coordinator decides the survivor set from check-ins and heartbeats, through the
  store (comm/failover.py), and every survivor joins a new world over the survivors.
* rebuild (RankRuntime.rebuild): the topology without the dead, the placement remapped to the
  surviving replicas (an expert with none is loaded from the checkpoint into a survivor's spare slot
  or over a slot whose expert has another replica; if none fits the job stops with one line naming
  the lost experts), a new exchange and router, and the coordinator's books renumbered.
* replay: attention ranks keep their KV caches and tokens; a step that failed before sampling left
  only idempotent state behind (KV writes of the same tokens, block allocations), so running it again
  gives the same tokens. The coordinator asks every attention rank what it has of the failed step
  (afsplit/runtime/coordinator.py: the sync plan) and applies each result exactly once.

Attention ranks other than the coordinator may die too: their requests fail with an error record and
the others go on. The coordinator's death (or that of node 0, whose torchrun agent hosts the store)
ends the job with the usual one line.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

from comm.errors import CommError
from comm.failover import FinalError, SurvivorAgreement, bury, rejoin_world
from comm.groups import DistContext
from comm.liveness import Liveness, close_pairs, store_client

log = logging.getLogger("afsplit.runtime")

MAX_ATTEMPTS = 4  # recoveries in a row (a failure during a recovery starts the next one)


class ExpertsLost(CommError):
    """Dead expert ranks took the only replicas of some experts and no survivor has room for them: the job
    stops (the launcher adds this to its line about the rank that died)."""

    explains_peer_death = True


def is_comm_failure(e: BaseException) -> bool:
    """Whether `e` is a lost peer (what failover handles) rather than a bug or bad input on this rank."""
    if isinstance(e, CommError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe", "timed out",
                                   "gloo", "nccl", "socket"))


class Failover:
    """Owned by a RankRuntime (`rt`) when comm.failover is on and there is more than one rank."""

    def __init__(self, rt):
        cfg = rt.config.comm
        self.rt = rt
        self.orig = rt.rank  # launch-time rank: this rank's name in the store, across recoveries
        self.world = list(range(rt.ctx.world_size))  # launch-time ranks of the current world, by current rank
        self.peer_timeout_s, self.timeout_s = cfg.peer_timeout_s, cfg.timeout_s
        self.lock = threading.Lock()
        self.recovering = False
        self.store = store_client(cfg.timeout_s)
        self.live = Liveness(store_client(cfg.timeout_s), self.orig, self.world, cfg.peer_timeout_s,
                             watcher=rt.coordinator, on_stale=self._on_stale, on_tick=self._on_tick)
        self.agreement = SurvivorAgreement(self.store, self.orig, rt.coordinator, self.live, cfg.peer_timeout_s,
                                           cfg.timeout_s)
        self.records: list[dict] = []  # coordinator: one per failover (stats JSON, /metrics)
        self.live.start()

    # -- the watcher thread's hooks ---------------------------------------------------------------

    def _on_stale(self, orig: int) -> None:
        """A silent peer: close this rank's pairs to it, so a wait on it fails now."""
        with self.lock:
            if self.recovering or orig not in self.world:
                return
            close_pairs(self.rt.comm_groups(), [self.world.index(orig)], self.rt.rank)

    def _on_tick(self) -> None:
        """Another rank started a recovery: make sure this rank's waits end and it joins."""
        if self.recovering or not self.agreement.next_started(self.live.store):
            return
        with self.lock:
            if not self.recovering:
                close_pairs(self.rt.comm_groups(), range(len(self.world)), self.rt.rank)

    # -- recovery ----------------------------------------------------------------------------------

    def recover(self, exc: BaseException) -> dict:
        """Agree on the survivors, join their new world and rebuild this rank; returns the record of it.
        A failure during a recovery starts the next one (at most MAX_ATTEMPTS in a row)."""
        start = time.monotonic()
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self._recover_once(exc, start)
            except BaseException as e:  # noqa: BLE001 -- a second loss while recovering: go again
                if isinstance(e, (ExpertsLost, FinalError)) or not is_comm_failure(e) or attempt == MAX_ATTEMPTS - 1:
                    raise
                log.warning("rank %d: recovery failed (%s); starting another", self.orig, e)
                exc = e
        raise AssertionError("unreachable")

    def _recover_once(self, exc: BaseException, start: float) -> dict:
        rt = self.rt
        with self.lock:
            self.recovering = True
            close_pairs(rt.comm_groups(), range(len(self.world)), rt.rank)
        try:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first.split(": [/")[0]  # without the transport's own text (source path, advice)
            log.warning("rank %d: %s -- recovering", self.orig, first)
            try:
                decision = self.agreement.agree(self.world, {"error": first[:300]})
            except (dist.DistNetworkError, dist.DistStoreError) as e:  # node 0's agent (the store's host) is gone
                raise FinalError(f"recovery impossible: the job's rendezvous store (node 0's torchrun agent) is "
                                 f"unreachable ({str(e).strip().splitlines()[0][:120]}); the job ends") from None
            bury(*rt.comm_groups())
            old = rt.ctx
            rank, size, data, control = rejoin_world(self.store, decision.epoch, decision.survivors, self.orig,
                                                     old.backend, old.device, self.timeout_s)
            dead_now = [self.world.index(r) for r in decision.dead]
            topo, kept = old.topology.without(dead_now)
            dead_roles = {r: old.topology.role_of(self.world.index(r)) for r in decision.dead}
            self.world = list(decision.survivors)
            ctx = DistContext(rank, size, old.local_rank, old.device, topo, old.backend, data, control, old.timeout_s)
            reloaded = rt.rebuild(ctx, kept, decision.dead)
            self.live.watch_only(self.world)
        finally:
            with self.lock:
                self.recovering = False
        record = {"epoch": decision.epoch, "dead_ranks": decision.dead,
                  "dead_roles": [dead_roles[r] for r in decision.dead], "detection_s": round(decision.detected_s, 3),
                  "recovery_s": round(time.monotonic() - start, 3), "reloaded_experts": reloaded,
                  "world_size": size}
        log.warning("rank %d: recovery %d done: ranks %s gone, %d left, %d expert(s) reloaded", self.orig,
                    decision.epoch, decision.dead, size, reloaded)
        return record

    def stop(self) -> None:
        self.live.stop()
