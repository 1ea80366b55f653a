"""Movers: how one stage's rows cross the links between ranks.

A stage is a list of segments ``(peer, row offset, rows)`` to send from one uint8 row buffer and
to receive into another (both in peer order, contiguous). A mover moves them:

* ``nccl.py``: one ``all_to_all_single`` over the channel's NCCL group, enqueued on the channel's
  stream (no host sync; a CUDA graph captures it);
* ``gloo.py``: per-peer isend/irecv over a gloo group, receives waited on with the deadline (so
  the error names the dead peer), sends left in flight until the buffer is reused;
* ``symm_mem.py``: intra-node segments written straight into the peers' receive buffers in torch
  symmetric memory, then one device barrier of the node; the inter-node segments of the same stage
  over NCCL (``comm.intra_node``: auto | nccl | symm_mem, chosen by :func:`select_mover`);
* segments to this rank itself are a device copy in all of them.

Every mover has ``move(channel, send, send_segs, recv, recv_segs, layer, what, start, stage)``
(`stage` = (route plan, stage index, P, backward): what the symmetric-memory mover needs to know
where its rows land in the peers' layouts) returning the works still in flight (gloo sends), and
``settle(channel, layer, start)`` / ``clear()`` for what it keeps in flight itself; the NCCL and
gloo movers also move a part of a stage (``move_subset``: the inter-node rows of a
symmetric-memory stage).
"""

from __future__ import annotations

from comm.movers.gloo import GlooMover
from comm.movers.nccl import NcclMover
from comm.movers.symm_mem import INTRA_NODE, SymmMemMover, attach

__all__ = ["GlooMover", "NcclMover", "SymmMemMover", "INTRA_NODE", "make_mover", "select_mover"]


def make_mover(backend: str, watch, world: int, rank: int, collective: bool | None = None):
    """The mover for a data-group backend. `collective` forces (or forbids) the one-collective form on
    gloo (tests use it to check the NCCL code path's layout on CPU)."""
    if backend == "nccl":
        return NcclMover(watch, world, rank)
    return GlooMover(watch, world, rank, collective=bool(collective))


def select_mover(ctx, watch, intra_node: str, metadata: str, channels: list, buffers: list, collective=None):
    """The exchange's mover (collective over all ranks): the backend's, or symmetric memory for intra-node
    links where `intra_node` asks for it and the machine allows (see symm_mem.attach: falls back, logged).
    `buffers`: [(name, rows, bytes per row)] of the channel buffers peers write into."""
    base = make_mover(ctx.backend, watch, ctx.world_size, ctx.rank, collective)
    return attach(ctx, base, intra_node, metadata, channels, buffers, watch)
