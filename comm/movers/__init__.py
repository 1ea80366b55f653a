"""Movers: how one stage's rows cross the links between ranks.

A stage is a list of segments ``(peer, row offset, rows)`` to send from one uint8 row buffer and
to receive into another (both in peer order, contiguous). A mover moves them:

* ``nccl.py``: one ``all_to_all_single`` over the channel's NCCL group, enqueued on the channel's
  stream (no host sync; a CUDA graph captures it);
* ``gloo.py``: per-peer isend/irecv over a gloo group, receives waited on with the deadline (so
  the error names the dead peer), sends left in flight until the buffer is reused;
* segments to this rank itself are a device copy in both.

An intra-node mover on symmetric memory plugs in here as one more file, chosen per link kind.
"""

from __future__ import annotations

from comm.movers.gloo import GlooMover
from comm.movers.nccl import NcclMover

__all__ = ["GlooMover", "NcclMover", "make_mover"]


def make_mover(backend: str, watch, collective: bool | None = None):
    """The mover for a data-group backend. `collective` forces (or forbids) the one-collective form on
    gloo (tests use it to check the NCCL code path's layout on CPU)."""
    if backend == "nccl":
        return NcclMover(watch)
    return GlooMover(watch, collective=bool(collective))
