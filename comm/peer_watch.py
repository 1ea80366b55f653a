"""Deadlines for every wait of the exchange, and the one error that names the rank.

Every call has a deadline of ``timeout_s`` from its start. Two kinds of waits:

* gloo (CPU) transfers are waited on with that timeout, receives first, so a dead or silent peer
  raises ``CommError`` naming the rank it waited for, e.g.
  ``layer 3 dispatch: no data from rank 2 (expert) within 10.0 s (rank 0 waiting)``;
* NCCL transfers are stream-ordered and never make the host wait: each call records a CUDA event
  (:meth:`PeerWatch.track`); finished events are retired cheaply at the next call, the oldest
  unfinished one past its deadline raises, and :meth:`PeerWatch.drain` -- which the runtime calls
  once per step, before the host reads anything the step computed -- waits for all of them with
  the same deadline. Work captured in a CUDA graph is covered by the drain after its replay.
"""

from __future__ import annotations

import collections
import time
from datetime import timedelta

import torch

from comm.errors import CommError
from comm.topology import Topology

MAX_INFLIGHT = 4096  # tracked NCCL calls before the host waits for the oldest (bounds the event queue)
RECV, SEND = "recv", "send"


class PeerWatch:
    def __init__(self, topo: Topology, rank: int, timeout_s: float):
        self.topo, self.rank, self.timeout_s = topo, rank, timeout_s
        self._inflight: collections.deque = collections.deque()  # (event, layer, what, start, peers)

    def left(self, start: float) -> float:
        """Seconds left before the deadline of a call that started at `start` (time.monotonic())."""
        return max(self.timeout_s - (time.monotonic() - start), 1e-3)

    # -- gloo: wait with the deadline ------------------------------------------------------------

    def wait(self, works: list[tuple], layer, what: str, start: float) -> None:
        """Wait for gloo works [(work, peer, RECV|SEND)], receives first; raise naming the peer."""
        for work, peer, kind in sorted(works, key=lambda w: w[2] != RECV):
            try:
                ok = work.wait(timeout=timedelta(seconds=self.left(start)))
            except RuntimeError as e:
                raise self.peer_error(layer, what, peer, kind, e) from None
            if ok is False:
                raise self.peer_error(layer, what, peer, kind, None)

    def wait_collective(self, work, layer, what: str, start: float, peers: list[int]) -> None:
        """Wait for one gloo collective; a failure names every peer it involved (which one is silent is unknown)."""
        try:
            ok = work.wait(timeout=timedelta(seconds=self.left(start)))
        except RuntimeError as e:
            raise self.silent_peers(layer, what, peers, e) from None
        if ok is False:
            raise self.silent_peers(layer, what, peers, None)

    def name(self, rank: int) -> str:
        return f"rank {rank} ({self.topo.role_of(rank)}, node {self.topo.node_of(rank)})"

    def peer_error(self, layer, what: str, peer: int, kind: str, e: Exception | None) -> CommError:
        msg = str(e) if e is not None else "timed out"
        low = msg.lower()
        first = msg.strip().splitlines()[0] if msg.strip() else msg
        who = self.name(peer)
        if e is None or "timeout" in low or "timed out" in low:
            if kind == RECV:
                return CommError(f"layer {layer} {what}: no data from {who} within {self.timeout_s} s "
                                 f"(rank {self.rank} waiting)", peer)
            return CommError(f"layer {layer} {what}: {who} did not take its data within {self.timeout_s} s "
                             f"(rank {self.rank} sending)", peer)
        if "closed" in low or "reset" in low or "broken pipe" in low:
            return CommError(f"layer {layer} {what}: {who} is gone (connection lost; rank {self.rank} was "
                             f"{'receiving from' if kind == RECV else 'sending to'} it): {first}", peer)
        verb = "receive from" if kind == RECV else "send to"
        return CommError(f"layer {layer} {what}: {verb} {who} failed on rank {self.rank}: {first}", peer)

    def silent_peers(self, layer, what: str, peers: list[int], e: Exception | None) -> CommError:
        names = ", ".join(self.name(q) for q in peers) or "its peers"
        detail = f": {str(e).strip().splitlines()[0]}" if e is not None and str(e).strip() else ""
        return CommError(f"layer {layer} {what}: no data from {names} within {self.timeout_s} s "
                         f"(rank {self.rank} waiting){detail}", peers[0] if len(peers) == 1 else None)

    # -- NCCL: events checked lazily, drained once per step -------------------------------------

    def track(self, layer, what: str, start: float, peers: list[int]) -> None:
        """Record an event on the current stream for the NCCL work just enqueued on it."""
        if torch.cuda.is_current_stream_capturing():  # a CUDA graph: drain() checks its replays as a whole
            return
        done = torch.cuda.Event()
        done.record()
        self._inflight.append((done, layer, what, start, peers))
        self.retire(block=len(self._inflight) > MAX_INFLIGHT)

    def retire(self, block: bool = False) -> None:
        """Drop finished calls; raise if the oldest unfinished one is past its deadline."""
        while self._inflight:
            done, layer, what, start, peers = self._inflight[0]
            if done.query():
                self._inflight.popleft()
                continue
            if time.monotonic() - start > self.timeout_s:
                raise self.silent_peers(layer, what, peers, None)
            if not block:
                return
            time.sleep(5e-5)

    def drain(self, streams: list, peers: list[int]) -> None:
        """Wait (with the deadline) for every tracked call and for all work queued so far on `streams`."""
        start = time.monotonic()
        for stream in streams:
            with torch.cuda.stream(stream):
                self.track("(this step's last)", "exchange", start, peers)
        while self._inflight:
            self.retire(block=True)

    def clear(self) -> None:
        self._inflight.clear()
