"""Region layout: who sends how many rows where, in which buffer rows, for one stage of a route.

Rows travel in preallocated uint8 row buffers (:class:`RowBuffer`): a dispatch row is
``[x (D * itemsize) | topk_ids (K int32) | topk_weights (K float32)]``, a combine row is ``[y]``.
A rank *holds* its keys' rows in some order before each stage (a list of ``(key, offset, rows)``);
a stage sends them grouped by destination peer (peer order, then key) and receives them grouped by
source peer (then key), which is the order held before the next stage. Where the held order is not
the send order, one row gather (``perm``) reorders them. Combine runs the stages backwards with
the same layouts: what a rank received it sends back, and un-permutes what comes back.

With padded metadata every key has the same size P (the step's region size), so a layout depends
only on (route, rank, P) and is built once and cached; with exact counts the sizes come from the
senders' headers, call by call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from comm.transports.route import Key, RoutePlan

Segment = tuple[int, int, int]  # (peer, row offset, rows)
Held = list[tuple[Key, int, int]]  # (key, row offset, rows) in buffer order


class RowBuffer:
    """A preallocated ``[cap + 1, rowbytes]`` uint8 buffer with typed views of its columns.

    Row ``cap`` is a scratch row: packing writes rows that do not exist there, and it stays zero in
    combine buffers, so gathering it reads a zero partial. ``storage``: lay the buffer over these
    (already zeroed) flat uint8 bytes instead of allocating (a symmetric-memory window).
    """

    def __init__(self, cap: int, hidden: int, top_k: int, dtype: torch.dtype, device, meta: bool,
                 storage: torch.Tensor | None = None):
        xb = hidden * torch.empty((), dtype=dtype).element_size()
        self.cap, self.scratch = cap, cap
        row_bytes = xb + (8 * top_k if meta else 0)
        if storage is None:
            self.raw = torch.zeros(cap + 1, row_bytes, dtype=torch.uint8, device=device)
        else:
            self.raw = storage[:(cap + 1) * row_bytes].view(cap + 1, row_bytes)
        self.x = self.raw[:, :xb].view(dtype)
        if meta:
            self.ids = self.raw[:, xb:xb + 4 * top_k].view(torch.int32)
            self.w = self.raw[:, xb + 4 * top_k:].view(torch.float32)


@dataclass(frozen=True)
class StageLayout:
    """One stage on one rank: segments to send and receive, and the reorder before sending."""

    s: int
    send: tuple[Segment, ...]  # from the send buffer, in peer order
    recv: tuple[Segment, ...]  # into the receive buffer, in peer order
    perm: torch.Tensor | None  # send rows = held rows[perm]; None when the held order is the send order
    held_rows: int
    send_rows: int
    recv_rows: int


def plan_stage(plan: RoutePlan, rank: int, s: int, held: Held, size_of: Callable[[Key], int],
               device) -> tuple[StageLayout, Held]:
    """Layout of stage s on `rank`, given what it holds; returns it and what it holds afterwards.

    `size_of(key)` gives the rows of a key this rank receives from another rank (padded: P; exact:
    from the sender's header); keys a rank keeps keep their own size.
    """
    where = {k: (off, n) for k, off, n in held}
    sends, recvs = plan.stage_peers(rank, s)
    send_keys = [k for _q, ks in sends for k in ks]
    perm = None
    if [k for k, _o, _n in held] != send_keys:
        idx = [torch.arange(where[k][0], where[k][0] + where[k][1]) for k in send_keys]
        perm = (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)).to(device)
    send_segs, off = [], 0
    for q, ks in sends:
        n = sum(where[k][1] for k in ks)
        send_segs.append((q, off, n))
        off += n
    send_rows = off
    new_held: Held = []
    recv_segs, off = [], 0
    for q, ks in recvs:
        start = off
        for k in ks:
            n = where[k][1] if q == rank else size_of(k)
            new_held.append((k, off, n))
            off += n
        recv_segs.append((q, start, off - start))
    held_rows = sum(n for _k, _o, n in held)
    layout = StageLayout(s, tuple(send_segs), tuple(recv_segs), perm, held_rows, send_rows, off)
    return layout, new_held


def capacity(plan: RoutePlan, rank: int, s: int, max_rows_per_key: int) -> int:
    """Rows `rank` can hold before stage s (s = 3: at the end) with at most max_rows_per_key per key."""
    return max_rows_per_key * sum(1 for p in plan.pos.values() if p[s] == rank)
