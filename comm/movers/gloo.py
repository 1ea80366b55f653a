"""One stage over gloo: per-peer isend/irecv (the wait names a dead peer), or one collective (tests)."""

from __future__ import annotations

import torch.distributed as dist

from comm.peer_watch import RECV, SEND


class GlooMover:
    name = "gloo"

    def __init__(self, watch, world: int, rank: int, collective: bool = False):
        self.watch, self.world, self.rank = watch, world, rank
        self.collective = collective

    def settle(self, ch, layer, start: float) -> None:
        """Its sends in flight are the channel's pending_sends (waited by the exchange)."""

    def clear(self) -> None:
        pass

    def move(self, ch, send, send_segs, recv, recv_segs, layer, what: str, start: float, stage=None) -> list:
        """Receives are complete when this returns; the pending sends are returned as works
        [(work, peer, SEND)] to be waited on before `send` is written again."""
        if self.collective:
            return self._collective(ch.data_group, send, send_segs, recv, recv_segs, layer, what, start)
        return self.move_subset(ch, send, send_segs, recv, recv_segs, layer, what, start)

    def move_subset(self, ch, send, send_segs, recv, recv_segs, layer, what: str, start: float) -> list:
        """Any of a stage's segments, per-peer P2P."""
        group, rank = ch.data_group, self.rank
        works = []
        for q, off, n in recv_segs:
            if n and q != rank:
                works.append((dist.irecv(recv[off:off + n], q, group=group), q, RECV))
        sends = []
        for q, off, n in send_segs:
            if not n:
                continue
            if q == rank:
                r_off = next(o for p, o, _n in recv_segs if p == rank)
                recv[r_off:r_off + n].copy_(send[off:off + n])
            else:
                sends.append((dist.isend(send[off:off + n], q, group=group), q, SEND))
        self.watch.wait(works, layer, what, start)
        return sends

    def _collective(self, group, send, send_segs, recv, recv_segs, layer, what, start) -> list:
        s_in, s_out = [0] * self.world, [0] * self.world
        for q, _o, n in send_segs:
            s_in[q] = n
        for q, _o, n in recv_segs:
            s_out[q] = n
        work = dist.all_to_all_single(recv[:sum(s_out)], send[:sum(s_in)], s_out, s_in, group=group, async_op=True)
        peers = sorted({q for q, _o, n in recv_segs + send_segs if n and q != self.rank})
        self.watch.wait_collective(work, layer, what, start, peers)
        return []
