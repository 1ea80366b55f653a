"""The control plane: one root's message to every rank, every rank's message back, with deadlines.

The runtime's coordinator broadcasts each engine step's plan and gathers every rank's report over
the CPU gloo control group. Collectives (``broadcast_object_list``, ``gather_object``) cannot say
*which* rank is missing when one dies or stops, so this is point to point: each message is pickled
bytes behind an int64 size header; the root posts one receive per peer and waits on each with what
is left of the deadline. A dead peer (its connection closes) or a silent one (nothing within the
deadline) raises :class:`comm.groups.CommError` naming its global rank and role, with ``.peer`` set
to that rank.

    plane = ControlPlane(ctx.control_group, rank, world_size, root=0, timeout_s=60, role_of=topo.role_of)
    plan = plane.broadcast(plan if rank == 0 else None, what="step plan")   # every rank
    reports = plane.gather(report, what="step report")                     # list on the root, else None

Deadlines: ``timeout_s`` (per call) bounds a step in progress; ``broadcast(..., timeout_s=None)``
waits without one (a follower waiting for the first plan while ranks still load their models, or
for the next plan of an idle coordinator). gloo closes a pair whose wait timed out, so a timeout
is always fatal: it is raised, never retried.

Only the root blames: a gloo send completes when the receiver takes it, so a follower that waited
on its report's send would blame the root for another follower's silence. Followers therefore do
not wait on their sends at once: they are waited on (and freed) after the next plan arrives, when the
root has taken them; the root posts each peer's payload receive as soon as that peer's header is in,
and names the first peer that fails.

Messages use their own tag, so they never match the data path's headers on the same group.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from comm.errors import CommError

TAG = 0x0AF5  # point-to-point tag of control-plane messages (the data path uses 0)
FOREVER_S = 365 * 24 * 3600.0  # "no deadline": gloo needs some timeout on each wait


class ControlPlane:
    """Deadline-bounded broadcast (root -> all) and gather (all -> root) of picklable objects."""

    def __init__(self, group: Any, rank: int, world_size: int, root: int, timeout_s: float,
                 role_of: Callable[[int], str] | None = None):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.root = root
        self.timeout_s = timeout_s
        self.role_of = role_of
        self.peers = [r for r in range(world_size) if r != root]
        self._sending: list = []  # a follower's unfinished sends (work, tensors kept alive), see gather

    # -- the two operations ----------------------------------------------------------------------

    def broadcast(self, obj: Any = None, what: str = "message", timeout_s: float | None | str = "default") -> Any:
        """The root's `obj` on every rank. timeout_s: "default" = self.timeout_s, None = no deadline."""
        limit = self._limit(timeout_s)
        start = time.monotonic()
        if self.rank == self.root:
            payload = _encode(obj)
            works = []
            for q in self.peers:
                works += [(self._isend(payload[0], q), q), (self._isend(payload[1], q), q)]
            for work, q in works:
                self._wait(work, q, "send", what, start, limit)
            return obj
        obj = self._recv_from(self.root, what, start, limit)
        self._drain(what, start, limit)  # the root had all reports before this plan: those sends are done
        return obj

    def gather(self, obj: Any, what: str = "message", timeout_s: float | None | str = "default") -> list | None:
        """Every rank's `obj`, in rank order, on the root (None elsewhere)."""
        limit = self._limit(timeout_s)
        start = time.monotonic()
        if self.rank != self.root:
            self._drain(what, start, limit)
            for t in _encode(obj):
                self._sending.append((self._isend(t, self.root), t))
            return None
        headers = {q: torch.zeros(1, dtype=torch.int64) for q in self.peers}
        pending = {q: self._irecv(headers[q], q) for q in self.peers}
        bodies, body_works = {}, {}
        for q in self.peers:  # every header receive is posted: the first one that fails names its rank
            self._wait(pending[q], q, "recv", what, start, limit)
            bodies[q] = torch.empty(int(headers[q]), dtype=torch.uint8)
            body_works[q] = self._irecv(bodies[q], q)  # now, so that q's send completes
        out: list = [None] * self.world_size
        out[self.root] = obj
        for q in self.peers:
            self._wait(body_works[q], q, "recv", what, start, limit)
            out[q] = _decode(bodies[q])
        return out

    # -- internals ---------------------------------------------------------------------------------

    def _limit(self, timeout_s) -> float:
        if timeout_s == "default":
            return self.timeout_s
        return FOREVER_S if timeout_s is None else float(timeout_s)

    def _drain(self, what: str, start: float, limit: float) -> None:
        """Retire a follower's earlier sends (gloo marks a send completed only once it is waited on)."""
        for work, _ in self._sending:
            self._wait(work, self.root, "send", what, start, limit)
        self._sending = []

    def _recv_from(self, q: int, what: str, start: float, limit: float) -> Any:
        header = torch.zeros(1, dtype=torch.int64)
        self._wait(self._irecv(header, q), q, "recv", what, start, limit)
        body = torch.empty(int(header), dtype=torch.uint8)
        self._wait(self._irecv(body, q), q, "recv", what, start, limit)
        return _decode(body)

    def _isend(self, t: torch.Tensor, q: int):
        try:
            return dist.isend(t, q, group=self.group, tag=TAG)
        except RuntimeError as e:  # the pair to q is already closed
            raise self._error(q, "send", "", e) from None

    def _irecv(self, t: torch.Tensor, q: int):
        try:
            return dist.irecv(t, q, group=self.group, tag=TAG)
        except RuntimeError as e:
            raise self._error(q, "recv", "", e) from None

    def _wait(self, work, q: int, kind: str, what: str, start: float, limit: float) -> None:
        left = max(limit - (time.monotonic() - start), 1e-3)
        try:
            ok = work.wait(timeout=timedelta(seconds=left))
        except RuntimeError as e:
            raise self._error(q, kind, what, e, limit) from None
        if ok is False:
            raise self._error(q, kind, what, None, limit)

    def _name(self, q: int) -> str:
        return f"rank {q} ({self.role_of(q)})" if self.role_of else f"rank {q}"

    def _error(self, q: int, kind: str, what: str, e: Exception | None, limit: float = 0.0) -> CommError:
        text = str(e).strip() if e is not None else "timed out"
        low = text.lower()
        head = f"{what}: " if what else ""
        if e is None or "timed out" in low or "timeout" in low and "closure" not in low:
            verb = "no answer from" if kind == "recv" else "could not deliver to"
            msg = f"{head}{verb} {self._name(q)} within {limit:g} s (rank {self.rank} waiting)"
        elif "closed" in low or "reset" in low or "broken pipe" in low or "closure" in low:
            msg = f"{head}{self._name(q)} is gone (connection lost; rank {self.rank} was " \
                  f"{'waiting for' if kind == 'recv' else 'sending to'} it)"
        else:
            first = text.splitlines()[0] if text else type(e).__name__
            msg = f"{head}{'receiving from' if kind == 'recv' else 'sending to'} {self._name(q)} failed on rank " \
                  f"{self.rank}: {first}"
        err = CommError(msg)
        err.peer = q
        return err


def _encode(obj: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    body = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return torch.tensor([len(data)], dtype=torch.int64), body


def _decode(body: torch.Tensor) -> Any:
    return pickle.loads(body.numpy().tobytes())
