"""Who is alive: heartbeats through the rendezvous store, and cutting the process groups loose from the dead.

Every rank bumps a counter ``hb/<rank>`` in the job's TCP store (the one torchrun's node-0 agent
hosts) every ``peer_timeout_s / 5``, from a daemon thread with its own store connection. The
coordinator's thread reads every counter (one ``multi_get``): a counter that has not moved for
``peer_timeout_s`` on its clock (no cross-host clock is compared) marks its rank *stale* -- dead
(SIGKILL, a lost node) or silent (SIGSTOP, a hung host): either way it no longer answers -- and it
publishes the stale list under ``stale``; every other rank reads only that list and the coordinator's
own counter, so the store serves O(ranks) reads per beat, not O(ranks^2). A node agent that saw its
rank exit says so at once under ``gone/<rank>`` (launch/node_agent.py), which needs no timeout.

Why a thread and the store: the data and control waits are blocking gloo waits or NCCL event
polls, and a gloo wait cannot be woken up -- but it fails at once when the *pair* it waits on is
closed. gloo closes a pair whose own wait timed out, so :func:`close_pairs` posts a receive that
nobody will match on each pair and lets it time out after a millisecond. A rank waiting on that
pair from either end then gets "connection closed" immediately. The watcher does this to the
pairs of a stale peer (so a wait on a SIGSTOPped rank ends after ``peer_timeout_s``, not after
``comm.timeout_s``); a rank that starts a recovery does it to all its pairs (so every peer blocked
on it joins the recovery within milliseconds). NCCL communicators are aborted instead.

    live = Liveness(store, rank=3, ranks=range(8), peer_timeout_s=10, watcher=0, on_stale=lambda r: ...)
    live.start(); ...; live.stale_for(5)    # seconds rank 5's heartbeat has not moved (0 if it has)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

STALE_KEY = "afsplit/stale"  # the watcher's list of stale ranks (JSON)
GONE_PREFIX = "afsplit/gone/"  # gone/<rank>: its node agent saw it exit
POISON_TAG = 0x7ADD  # a tag no message ever uses: the receive posted to close a pair never matches
HEARTBEATS_PER_TIMEOUT = 5


def store_client(timeout_s: float):
    """A new connection to the job's rendezvous store (torchrun's MASTER_ADDR:MASTER_PORT), for one thread."""
    import os

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class Liveness:
    """Heartbeats of this rank and staleness of the others, kept by a daemon thread (module docstring).

    `rank` and `ranks` are launch-time global ranks (stable across recoveries). `on_stale(r)` runs on
    the thread, once per rank, when r's heartbeat has been still for `peer_timeout_s`; `on_tick()`
    runs on every beat (e.g. to notice that another rank started a recovery)."""

    def __init__(self, store, rank: int, ranks: Iterable[int], peer_timeout_s: float, watcher: int,
                 on_stale: Callable[[int], None] | None = None, on_tick: Callable[[], None] | None = None,
                 prefix: str = "afsplit/hb/"):
        """`watcher`: the rank that reads every heartbeat and publishes the stale list (the coordinator)."""
        self.store, self.rank, self.peer_timeout_s = store, rank, peer_timeout_s
        self.watcher = watcher
        self.prefix = prefix
        self.interval_s = peer_timeout_s / HEARTBEATS_PER_TIMEOUT
        self.on_stale, self.on_tick = on_stale, on_tick
        self._lock = threading.Lock()
        self._watched = [r for r in ranks if r != rank]
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last moved, monotonic)
        self._reported: set[int] = set()
        self._created: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._beat_and_look()
        self._thread = threading.Thread(target=self._run, name="afsplit-liveness", daemon=True)
        self._thread.start()

    def stop(self, join_timeout_s: float = 5.0) -> None:
        """End the heartbeat thread and wait for it (bounded by `join_timeout_s` and two beats): a daemon thread
        still inside a store call when the interpreter shuts down can abort the process (SIGABRT, "terminate
        called without an active exception"). From the thread itself (an on_stale callback) it only signals."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=min(join_timeout_s, 2 * self.interval_s + 1.0))

    def watch_only(self, ranks: Iterable[int]) -> None:
        """Stop watching ranks outside `ranks` (the dead, after a recovery)."""
        with self._lock:
            self._watched = [r for r in ranks if r != self.rank]

    def stale_for(self, rank: int) -> float:
        """Seconds since `rank`'s heartbeat last moved, as seen here; 0.0 while it moves (or is unseen)."""
        with self._lock:
            seen = self._seen.get(rank)
        if seen is None:
            return 0.0
        still = time.monotonic() - seen[1]
        return still if still > 1.5 * self.interval_s else 0.0

    def last_alive(self, rank: int) -> float | None:
        """time.monotonic() when `rank`'s heartbeat last moved here (None: never seen)."""
        with self._lock:
            seen = self._seen.get(rank)
        return None if seen is None else seen[1]

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat_and_look()
            except Exception as e:  # noqa: BLE001 -- the store host is gone: nobody can recover anyway
                log.warning("rank %d: heartbeat store unreachable (%s); liveness stops", self.rank, e)
                return

    def _read(self, keys: list[str]) -> list[int]:
        """Counter values (0 for a rank that has not beaten yet), in one round trip where the store can."""
        if len(keys) < 2 or not hasattr(self.store, "multi_get"):
            return [int(self.store.add(k, 0)) for k in keys]  # add 0: read without waiting
        for k in keys:
            if k not in self._created:  # multi_get would wait for a key nobody wrote yet
                self.store.add(k, 0)
                self._created.add(k)
        return [int(v) for v in self.store.multi_get(keys)]

    def gone(self, rank: int) -> bool:
        """Whether `rank`'s node agent reported it exited (no waiting for its heartbeat to go still)."""
        return self.store.check([f"{GONE_PREFIX}{rank}"])

    def _beat_and_look(self) -> None:
        self.store.add(f"{self.prefix}{self.rank}", 1)
        now = time.monotonic()
        with self._lock:
            watched = list(self._watched) if self.rank == self.watcher else [self.watcher]
        watched = [r for r in watched if r != self.rank]
        stale = []
        values = self._read([f"{self.prefix}{r}" for r in watched])
        for r, value in zip(watched, values):
            with self._lock:
                old = self._seen.get(r)
                if old is None or old[0] != value:
                    self._seen[r] = (value, now)
                elif value and now - old[1] >= self.peer_timeout_s and r not in self._reported:
                    self._reported.add(r)
                    stale.append(r)
        if self.rank == self.watcher:
            if stale:
                self.store.set(STALE_KEY, json.dumps(sorted(self._reported)))
        elif self.store.check([STALE_KEY]):
            listed = json.loads(self.store.get(STALE_KEY).decode())
            with self._lock:
                stale += [r for r in listed if r not in self._reported and r in self._watched]
                self._reported.update(listed)
        for r in stale:
            log.warning("rank %d: no heartbeat from rank %d for %.1f s", self.rank, r, self.peer_timeout_s)
            if self.on_stale is not None:
                self.on_stale(r)
        if self.on_tick is not None:
            self.on_tick()


def close_pairs(groups: Iterable, peers: Iterable[int], rank: int) -> None:
    """Make every wait on this rank's links to `peers` in `groups` fail now, on both ends (module
    docstring). Groups are torch ProcessGroups (or None); `peers` are global ranks. Best effort:
    pairs already closed and ranks outside a group are skipped."""
    import torch.distributed as dist

    peers = [q for q in peers if q != rank]
    for group in groups:
        if group is None:
            continue
        try:
            backend = dist.get_backend(group)
            members = set(dist.get_process_group_ranks(group))
        except Exception:  # noqa: BLE001 -- destroyed or never ours
            continue
        if backend == "nccl":
            _abort_nccl(group)
            continue
        for q in peers:
            if q not in members:
                continue
            try:
                work = dist.irecv(torch.zeros(1), q, group=group, tag=POISON_TAG)
                work.wait(timeout=timedelta(milliseconds=1))
            except Exception:  # noqa: BLE001 -- the timeout that closes the pair, or it was closed already
                pass


def _abort_nccl(group) -> None:
    abort = getattr(group, "abort", None)
    try:
        if abort is not None:
            abort()
        else:
            import torch.distributed as dist

            dist.distributed_c10d._abort_process_group(group)
    except Exception as e:  # noqa: BLE001
        log.warning("aborting an NCCL communicator failed: %s", e)
