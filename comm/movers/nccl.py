"""One stage over NCCL, enqueued on the current (channel) stream: no host sync, a CUDA graph captures it."""

from __future__ import annotations

import torch.distributed as dist


def _tiles(segs) -> bool:
    """Whether the segments (peer order) lie back to back from row 0, as all_to_all_single needs."""
    off = 0
    for _q, o, n in segs:
        if n:
            if o != off:
                return False
            off += n
    return True


class NcclMover:
    name = "nccl"

    def __init__(self, watch, world: int, rank: int):
        self.watch, self.world, self.rank = watch, world, rank
        self._splits: dict = {}

    def settle(self, ch, layer, start: float) -> None:
        """Nothing of its own left in flight (stream-ordered)."""

    def clear(self) -> None:
        pass

    def move(self, ch, send, send_segs, recv, recv_segs, layer, what: str, start: float, stage=None) -> list:
        """Move send[off:off+n] to each peer's recv segment (a whole stage: the segments tile both buffers in
        peer order) as one all_to_all_single; returns no works (stream-ordered)."""
        if not (_tiles(send_segs) and _tiles(recv_segs)):
            raise ValueError("NcclMover.move needs a whole stage's segments; use move_subset for a part of them")
        s_in, s_out, n_in, n_out, peers = self._splits_of(send_segs, recv_segs)
        # every rank calls every stage (even with nothing to move): the group's calls stay in one order
        dist.all_to_all_single(recv[:n_out], send[:n_in], s_out, s_in, group=ch.data_group)
        self.watch.track(layer, what, start, peers)
        return []

    def move_subset(self, ch, send, send_segs, recv, recv_segs, layer, what: str, start: float) -> list:
        """Some of a stage's segments (the inter-node part when symmetric memory moves the intra-node one):
        one all_to_all over per-peer views, zero-sized for the other peers. Every rank of the group calls it."""
        peers = self._splits_of(send_segs, recv_segs)[4]
        ins, outs = [send[:0]] * self.world, [recv[:0]] * self.world
        for q, o, n in send_segs:
            ins[q] = send[o:o + n]
        for q, o, n in recv_segs:
            outs[q] = recv[o:o + n]
        dist.all_to_all(outs, ins, group=ch.data_group)
        self.watch.track(layer, what, start, peers)
        return []

    def _splits_of(self, send_segs, recv_segs):
        key = (tuple(send_segs), tuple(recv_segs))
        splits = self._splits.get(key)
        if splits is None:
            s_in, s_out = [0] * self.world, [0] * self.world
            for q, _o, n in send_segs:
                s_in[q] = n
            for q, _o, n in recv_segs:
                s_out[q] = n
            peers = sorted({q for q, _o, n in recv_segs if n and q != self.rank})
            splits = self._splits[key] = (s_in, s_out, sum(s_in), sum(s_out), peers)
        return splits
