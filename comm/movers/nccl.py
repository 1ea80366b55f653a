"""One stage as one NCCL ``all_to_all_single``, enqueued on the current (channel) stream."""

from __future__ import annotations

import torch.distributed as dist


class NcclMover:
    def __init__(self, watch):
        self.watch = watch
        self._splits: dict = {}

    def move(self, group, world: int, rank: int, send, send_segs, recv, recv_segs, layer, what: str,
             start: float) -> list:
        """Move send[off:off+n] to each peer's recv segment; returns no works (stream-ordered)."""
        key = (world, tuple(send_segs), tuple(recv_segs))
        splits = self._splits.get(key)
        if splits is None:
            s_in, s_out = [0] * world, [0] * world
            for q, _o, n in send_segs:
                s_in[q] = n
            for q, _o, n in recv_segs:
                s_out[q] = n
            splits = self._splits[key] = (s_in, s_out, sum(s_in), sum(s_out),
                                          sorted({q for q, _o, n in recv_segs if n and q != rank}))
        s_in, s_out, n_in, n_out, peers = splits
        # every rank calls every stage (even with nothing to move): the group's calls stay in one order
        dist.all_to_all_single(recv[:n_out], send[:n_in], s_out, s_in, group=group)
        self.watch.track(layer, what, start, peers)
        return []
