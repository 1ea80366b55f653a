"""One stage over gloo: per-peer isend/irecv (the wait names a dead peer), or one collective (tests)."""

from __future__ import annotations

import torch.distributed as dist

from comm.peer_watch import RECV, SEND


class GlooMover:
    def __init__(self, watch, collective: bool = False):
        self.watch = watch
        self.collective = collective

    def move(self, group, world: int, rank: int, send, send_segs, recv, recv_segs, layer, what: str,
             start: float) -> list:
        """Receives are complete when this returns; the pending sends are returned as works
        [(work, peer, SEND)] to be waited on before `send` is written again."""
        if self.collective:
            return self._collective(group, world, rank, send, send_segs, recv, recv_segs, layer, what, start)
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

    def _collective(self, group, world, rank, send, send_segs, recv, recv_segs, layer, what, start) -> list:
        s_in, s_out = [0] * world, [0] * world
        for q, _o, n in send_segs:
            s_in[q] = n
        for q, _o, n in recv_segs:
            s_out[q] = n
        work = dist.all_to_all_single(recv[:sum(s_out)], send[:sum(s_in)], s_out, s_in, group=group, async_op=True)
        peers = sorted({q for q, _o, n in recv_segs + send_segs if n and q != rank})
        self.watch.wait_collective(work, layer, what, start, peers)
        return []
