"""A channel: one micro-batch's own buffers, CUDA stream and process groups.

Every micro-batch u of a step goes through channel u, so the exchanges of different micro-batches
never share a communicator, a stream or a buffer: micro-batch u's combine and u + 1's dispatch are
in flight together while the attention side computes u + 1 and the expert side computes u. Within
a channel every rank issues the same calls in the same order (dispatch, combine, next layer's
dispatch, ...), which is all the collectives need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from comm.layout import RowBuffer


@dataclass
class Channel:
    index: int
    data_group: Any  # NCCL (GPU) or gloo (CPU) group of all ranks carrying this channel's rows
    attention_group: Any = None  # the attention ranks (replica choice needs their token counts)
    header_group: Any = None  # CPU gloo group for exact-count headers (metadata: counts)
    stream: torch.cuda.Stream | None = None
    buffers: dict = field(default_factory=dict)
    pending_sends: list = field(default_factory=list)  # gloo sends in flight from this channel's buffers
    node_group: Any = None  # gloo group of this rank's node (symmetric memory: rendezvous, CPU stand-in's barrier)
    window: Any = None  # symmetric-memory window holding the receive buffers (comm/movers/symm_mem.py)
    symmetric: dict = field(default_factory=dict)  # buffer name -> its bytes in the window

    def buffer(self, name: str, cap: int, hidden: int, top_k: int, dtype, device, meta: bool) -> RowBuffer:
        """A named buffer, allocated once at its full capacity (a CUDA graph keeps its address); buffers
        peers write into sit at fixed places of the channel's window when it has one."""
        buf = self.buffers.get(name)
        if buf is None or buf.cap < cap:
            storage = self.symmetric.get(name)
            if storage is not None and buf is not None:
                raise RuntimeError(f"channel {self.index}: symmetric buffer {name} cannot grow ({buf.cap} -> {cap} rows)")
            buf = self.buffers[name] = RowBuffer(cap, hidden, top_k, dtype, device, meta, storage)
        return buf

    def use_window(self, window, regions: dict[str, tuple[int, int]]) -> None:
        """Place the named buffers at their (offset, bytes) in `window` (zeroed, the same on every rank)."""
        self.window = window
        self.symmetric = {name: window.local[off:off + size] for name, (off, size) in regions.items()}


_GROUPS: dict[tuple, Any] = {}  # (world's data group, channel, kind) -> group, reused by later exchanges


def make_channels(ctx, n: int, attention_groups: bool, header_groups: bool) -> list[Channel]:
    """n channels (collective: every rank creates the same groups in the same order).

    Channel 0 uses the context's data group; each further one gets a new group of all ranks (on
    NCCL its own communicator). Groups are made once per world and reused by exchanges built
    later over it (one exchange at a time uses them). With one rank there is nothing to create.
    """
    import torch.distributed as dist

    channels = []
    for i in range(n):
        if ctx.world_size == 1:
            channels.append(Channel(i, None))
            continue
        data = ctx.data_group if i == 0 else _group(ctx, i, "data", lambda: dist.new_group(backend=ctx.backend))
        att = _group(ctx, i, f"attention{ctx.topology.attention_ranks}",
                     lambda: dist.new_group(list(ctx.topology.attention_ranks))) if attention_groups else None
        hdr = _group(ctx, i, "header", lambda: dist.new_group(backend="gloo")) if header_groups else None
        stream = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None
        channels.append(Channel(i, data, att, hdr, stream))
    return channels


def _group(ctx, i: int, kind: str, make):
    key = (ctx.data_group, i, kind)  # holding the group keeps its identity unique
    if key not in _GROUPS:
        _GROUPS[key] = make()
    return _GROUPS[key]


def add_node_groups(ctx, channels: list[Channel]) -> None:
    """Give every channel a gloo group of this rank's node, if the node has >= 2 ranks (collective: every
    rank makes every node's group, in node order)."""
    import torch.distributed as dist

    topo = ctx.topology
    for ch in channels:
        for n in range(topo.num_nodes):
            ranks = list(topo.ranks_on_node(n))
            if len(ranks) < 2:
                continue
            g = _group(ctx, ch.index, f"node{ranks}", lambda: dist.new_group(ranks, backend="gloo"))
            if ctx.rank in ranks:
                ch.node_group = g
