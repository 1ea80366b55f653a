"""M2N MoE dispatch/combine between attention ranks and expert ranks.

Every rank of the topology calls ``dispatch`` then ``combine`` once per MoE layer, in the same
order (they are collectives over the data group)::

    comm = MoECommunicator(ctx, hidden=2048, top_k=8, dtype=torch.bfloat16, max_tokens_per_rank=512,
                           transport=config.comm.transport, timeout_s=config.comm.timeout_s)
    # attention rank (AF): x_TD [T, D], dest_TK = expert-rank index, slot_TK = local slot there
    comm.dispatch(x_TD, dest_TK, slot_TK, weight_TK, layer)      # -> None (attention-only rank)
    out_TD = comm.combine(None, layer)                            # -> [T, D] sum of expert partials
    # expert rank (AF)
    batch = comm.dispatch(None, None, None, None, layer)          # -> ExpertBatch
    y_ND = fused_moe(batch.x, w13, w2, batch.topk_ids, batch.topk_weights)
    comm.combine(y_ND, layer)                                     # -> None
    # colocated rank: both at once (its own tokens' share is a local copy)

How it works (see comm/transports/plan.py): rows travel as *segments* (attention rank a, expert
rank e) = a's tokens with at least one top-k slot on e, each token once, packed as one byte row
``[x (D * itemsize) | topk_ids (K int32) | topk_weights (K float32)]``. A transport is a path for
every segment through up to 3 stages; in each stage a rank first sends each peer a header (one
int64 row count per segment of the packet, over the CPU gloo control group, so the receiver can
post exactly-sized receives), then the packet itself over the data group. Combine reverses the
stages with the sizes already known (no headers). The attention rank sums the partials in expert
rank order, so every transport yields bit-identical results.

Capacity rule (buffers are allocated once at their maximum and reused): with T <= max_tokens_per_rank
tokens per attention rank, a rank that sees segments of n expert ranks from source a needs
max_tokens_per_rank * min(top_k, n) rows for that source (see RoutePlan.capacity); e.g. an expert
rank holds at most (#attention ranks) * max_tokens_per_rank rows. Exceeding max_tokens_per_rank
raises ValueError. Two buffer sets alternate between consecutive dispatches so that an
ExpertBatch stays valid until the dispatch after next (tensors in it are views into comm buffers).

Metadata: ``metadata="counts"`` (default) is the header scheme above. ``metadata="padded"`` (direct
transport only) gives every (attention, expert) pair a fixed region of P rows, P = tokens_hint (the
step's max T over attention ranks) or max_tokens_per_rank: no header round and no host sync on the
data path, at the price of padding bytes; the ExpertBatch then has N = #attention ranks * P rows and
padding rows have all topk_ids == -1 (and weight 0), which fused MoE kernels skip anyway.
Measured trade-off: docs/benchmarks/comm-*.md. On NCCL a padded call is one ``all_to_all_single``
over the data group with split sizes fixed by P (one C++ group call instead of a Python list of
P2P ops, and the shape a CUDA graph can capture); nothing on that path waits for the GPU, so the
async calls run inline on the communicator's CUDA stream instead of on a worker thread, and their
completion is checked lazily (see Faults).

Faults: every wait has a deadline of timeout_s from the start of the call. On gloo each receive is
waited on with that timeout, so a dead or silent peer raises CommError naming the rank and layer,
e.g. ``layer 3 dispatch: no data from rank 2 (expert) within 10.0 s``. On NCCL the headers still
travel over gloo (same check); the data transfers are polled (``is_completed``) until the deadline,
and a timeout names the peers of the unfinished transfer. Padded calls on NCCL are not polled one by
one (that would make the host wait for the GPU every call): each records a CUDA event; finished
ones are retired cheaply at the next call, the oldest unfinished one past its deadline raises, and
``drain()`` -- which the runtime calls once per step, before it reads anything back from the GPU --
waits for all of them with the same deadline.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from comm.groups import CommError, DistContext
from comm.transports.adaptive import CostModel, LinkModel, calibrate
from comm.transports.plan import TRANSPORTS, Key, RoutePlan, build_plan

log = logging.getLogger(__name__)

NUM_BUFFER_SETS = 2
MAX_INFLIGHT = 4096  # padded NCCL calls in flight before the host waits for the oldest (bounds the event queue)


@dataclass
class ExpertBatch:
    """What an expert rank receives for one layer (tensors are views into comm buffers).

    Rows come grouped by source; combine expects y_ND in the same row order. In padded mode some
    rows are padding (all topk_ids == -1); their y rows are ignored by combine.
    """

    x: torch.Tensor  # [N, D] unique tokens
    topk_ids: torch.Tensor  # [N, K] int32 local expert slot on this rank, -1 where not on this rank
    topk_weights: torch.Tensor  # [N, K] float32, 0 where topk_ids == -1
    layer: int = -1
    src_counts: dict[int, int] = field(default_factory=dict)  # attention rank -> rows from it (info)


class _Rows:
    """A preallocated [cap, rowbytes] uint8 buffer with typed views of its columns."""

    def __init__(self, cap: int, hidden: int, top_k: int, dtype: torch.dtype, device: torch.device, meta: bool):
        xb = hidden * torch.empty((), dtype=dtype).element_size()
        rowbytes = xb + (8 * top_k if meta else 0)
        self.cap = cap
        self.raw = torch.empty(max(cap, 1), rowbytes, dtype=torch.uint8, device=device)
        self.x = self.raw[:, :xb].view(dtype)
        if meta:
            self.ids = self.raw[:, xb:xb + 4 * top_k].view(torch.int32)
            self.w = self.raw[:, xb + 4 * top_k:].view(torch.float32)


@dataclass
class _Stage:
    """What one dispatch stage did on this rank, kept for the mirrored combine stage."""

    s: int
    send_by_peer: list[tuple[int, int, int]]  # (peer, offset, rows) in the send buffer
    recv_by_peer: list[tuple[int, int, int]]  # (peer, offset, rows) in the receive buffer
    perm: torch.Tensor | None  # send rows = held rows [perm]; None when held order == send order
    held_rows: int
    send_rows: int
    recv_rows: int


@dataclass
class _Call:
    layer: int
    plan: RoutePlan
    set_idx: int
    stages: list[_Stage]
    T: int  # tokens of this rank as a source (0 if not an attention rank)
    src_rows: torch.Tensor | None  # [rows] token index of each packed row (source side)
    src_layout: list[tuple[Key, int, int]]  # (key, offset, rows) in the packed buffer, by expert rank
    n_expert_rows: int  # N on this rank as an expert
    pad: int = -1  # padded mode: rows per (attention, expert) region; -1 in counts mode


class Handle:
    """Result of dispatch_async/combine_async; .wait() returns what the sync call returns."""

    def __init__(self, future: Future, done_event=None):
        self._future, self._event = future, done_event

    def wait(self):
        result = self._future.result()
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        return result

    def done(self) -> bool:
        return self._future.done()


class MoECommunicator:
    """Dispatch tokens from attention ranks to expert ranks and combine the partial outputs back."""

    def __init__(self, ctx: DistContext, hidden: int, top_k: int, dtype: torch.dtype, max_tokens_per_rank: int,
                 transport: str = "direct", timeout_s: float = 120.0, link_model: LinkModel | None = None,
                 metadata: str = "counts", collective: bool | None = None):
        """metadata: "counts" (row counts travel as headers, payloads are exact-sized) or "padded"
        (direct transport only: every (attention, expert) pair exchanges a fixed region of P rows,
        P = tokens_hint or max_tokens_per_rank, with topk_ids = -1 marking padding rows: no headers,
        no host sync on the data path, more bytes). link_model: skip the start-up calibration (adaptive).
        collective: padded calls as one all_to_all_single (default: on NCCL; gloo keeps per-peer P2P,
        whose waits name a dead peer -- tests force the collective there to check it on CPU)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"comm.transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if metadata not in ("counts", "padded"):
            raise ValueError(f"metadata: {metadata!r} is not one of counts, padded")
        if metadata == "padded" and transport != "direct":
            raise ValueError("metadata='padded' supports transport='direct' only")
        self.metadata = metadata
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (hidden * itemsize) % 4:
            raise ValueError(f"hidden * itemsize = {hidden * itemsize} bytes must be a multiple of 4")
        self.ctx, self.hidden, self.top_k, self.dtype = ctx, hidden, top_k, dtype
        self.max_tokens = max_tokens_per_rank
        self.transport, self.timeout_s = transport, timeout_s
        self.rank, self.device, self.topo = ctx.rank, ctx.device, ctx.topology
        self.is_attention, self.is_expert = ctx.is_attention, ctx.is_expert
        self.n_experts = len(self.topo.expert_ranks)
        self.nccl = ctx.backend == "nccl"
        self.plans = {name: build_plan(self.topo, name) for name in ("direct", "two_phase")}
        self.row_bytes = hidden * itemsize + 8 * top_k
        self.link_model: LinkModel | None = None
        self.cost: dict[str, CostModel] = {}
        if transport == "adaptive":
            self.link_model = link_model or calibrate(ctx)
            self.cost = {n: CostModel(p, self.link_model, top_k, self.row_bytes, hidden * itemsize)
                         for n, p in self.plans.items()}
        self._bufs: dict[tuple, _Rows] = {}
        self._pending: collections.deque[_Call] = collections.deque()
        self._calls = 0
        self._choice_cache: dict[int, str] = {}
        self.last_transport = transport
        # per source: order of expert indices in the packed buffer, for each plan
        self._pack_order: dict[str, torch.Tensor] = {}
        if self.is_attention:
            for name, plan in self.plans.items():
                order = [self.topo.expert_index(k[1]) for _q, keys in plan.sends[0][self.rank] for k in keys]
                self._pack_order[name] = torch.tensor(order, dtype=torch.long, device=self.device)
        self._executor: ThreadPoolExecutor | None = None
        self._nccl_works: list = []
        # counters for benchmarks: bytes this rank sent per link kind, seconds spent in header exchange
        self.bytes_sent = {"intra": 0, "inter": 0}
        self.header_time_s = 0.0
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.collective = metadata == "padded" and (self.nccl if collective is None else collective)
        # padded + NCCL: no host sync anywhere on the data path, so async calls need no worker thread
        self.inline = self.collective and self.nccl
        self._inflight: collections.deque[tuple] = collections.deque()  # (event, layer, what, start, peers)
        self._splits: dict[int, tuple[list[int], list[int]]] = {}
        self._empty = torch.empty(0, self.row_bytes, dtype=torch.uint8, device=self.device)

    # ------------------------------------------------------------------------------------------
    # public API

    def dispatch(self, x_TD: torch.Tensor | None, dest_TK: torch.Tensor | None, slot_TK: torch.Tensor | None,
                 weight_TK: torch.Tensor | None, layer: int, tokens_hint: int | None = None) -> ExpertBatch | None:
        """Send each attention rank's tokens to the expert ranks of their top-k slots (collective).

        Attention ranks pass x_TD [T, D] (T may be 0), dest_TK [T, K] expert-rank index
        (into topology.expert_ranks), slot_TK [T, K] local slot on that rank, weight_TK [T, K].
        Expert-only ranks pass None. Returns the ExpertBatch on expert ranks, None otherwise.

        tokens_hint: the largest T over all attention ranks, equal on every rank (e.g. from
        ``agree_tokens`` once per engine step). Used by the adaptive transport (without it, adaptive
        runs a tiny control-group all-reduce in every call so that all ranks pick the same plan) and
        as the region size in padded mode (without it: max_tokens_per_rank). Ignored otherwise.
        """
        start = time.monotonic()
        if self.is_attention:
            if x_TD is None or dest_TK is None or slot_TK is None or weight_TK is None:
                raise ValueError(f"layer {layer} dispatch: rank {self.rank} is an attention rank and must pass "
                                 "x_TD, dest_TK, slot_TK and weight_TK (use T=0 tensors when it has no tokens)")
            T = x_TD.shape[0]
            if T > self.max_tokens:
                raise ValueError(f"layer {layer} dispatch: {T} tokens on rank {self.rank} > max_tokens_per_rank="
                                 f"{self.max_tokens}; raise max_tokens_per_rank (buffers are sized from it) or "
                                 "split the batch")
            if x_TD.shape[1:] != (self.hidden,) or dest_TK.shape != (T, self.top_k):
                raise ValueError(f"layer {layer} dispatch: expected x_TD [T, {self.hidden}] and dest_TK [T, "
                                 f"{self.top_k}], got {tuple(x_TD.shape)} and {tuple(dest_TK.shape)}")
        else:
            T = 0
        if self.metadata == "padded":
            return self._dispatch_padded(x_TD, dest_TK, slot_TK, weight_TK, T, layer, tokens_hint, start)
        name = self._choose(T, layer, tokens_hint)
        self.last_transport = name
        plan = self.plans[name]
        set_idx = self._calls % NUM_BUFFER_SETS
        self._calls += 1

        # ---- stage 0 input: pack this rank's segments, ordered (next hop, expert rank)
        held_layout: list[tuple[Key, int, int]] = []
        held: _Rows | None = None
        src_rows = None
        if self.is_attention:
            held = self._buf(set_idx, "pack", self.max_tokens * min(self.top_k, self.n_experts), meta=True)
            held_layout, src_rows = self._pack(plan, name, held, x_TD, dest_TK, slot_TK, weight_TK)
        src_layout = list(held_layout)

        stages: list[_Stage] = []
        for s in plan.active_stages:
            held, held_layout, st = self._dispatch_stage(plan, s, set_idx, held, held_layout, layer, start)
            stages.append(st)
        self._finish(layer, "dispatch", start)

        N = sum(n for _k, _o, n in held_layout)
        call = _Call(layer, plan, set_idx, stages, T, src_rows, src_layout, N)
        self._pending.append(call)
        if not self.is_expert:
            return None
        if held is None:  # an expert rank that received nothing and held nothing
            held = self._buf(set_idx, "empty", 0, meta=True)
        src_counts: dict[int, int] = {}
        for (a, _e), _o, n in held_layout:
            src_counts[a] = src_counts.get(a, 0) + n
        return ExpertBatch(held.x[:N], held.ids[:N], held.w[:N], layer, src_counts)

    def combine(self, y_ND: torch.Tensor | None, layer: int) -> torch.Tensor | None:
        """Send expert partial outputs back and sum them per token (collective; mirrors dispatch).

        Expert ranks pass y_ND [N, D] (rows in ExpertBatch.x order); attention-only ranks pass None.
        Returns [T, D] on attention ranks (in the order of their dispatched x_TD), None otherwise.
        """
        start = time.monotonic()
        if not self._pending:
            raise RuntimeError(f"layer {layer} combine: no dispatch is pending on rank {self.rank}")
        call = self._pending.popleft()
        if call.layer != layer:
            raise RuntimeError(f"layer {layer} combine: the oldest pending dispatch on rank {self.rank} is layer "
                               f"{call.layer}; call combine in dispatch order")
        if self.is_expert:
            if y_ND is None:
                raise ValueError(f"layer {layer} combine: rank {self.rank} is an expert rank and must pass y_ND")
            if tuple(y_ND.shape) != (call.n_expert_rows, self.hidden):
                raise ValueError(f"layer {layer} combine: y_ND must be [{call.n_expert_rows}, {self.hidden}] "
                                 f"(the ExpertBatch rows), got {tuple(y_ND.shape)}")
            y = y_ND.to(self.dtype).contiguous()
        else:
            y = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        if call.pad >= 0:
            return self._combine_padded(call, y, layer, start)
        for st in reversed(call.stages):
            y = self._combine_stage(call, st, y, layer, start)
        self._finish(layer, "combine", start)
        if not self.is_attention:
            return None
        out = torch.zeros(call.T, self.hidden, dtype=self.dtype, device=self.device)
        # sum partials in expert-rank order: the same float additions whatever the transport
        for (_a, _e), off, n in sorted(call.src_layout, key=lambda t: t[0]):
            if n:
                out.index_add_(0, call.src_rows[off:off + n], y[off:off + n])
        return out

    def dispatch_async(self, x_TD, dest_TK, slot_TK, weight_TK, layer: int, tokens_hint: int | None = None) -> Handle:
        """Like dispatch, run on the communicator's worker thread (and CUDA stream); .wait() for the result.

        Calls still happen in submission order on every rank (one worker thread); don't issue other
        collectives on the same groups from another thread while one is in flight.
        """
        return self._submit(self.dispatch, (x_TD, dest_TK, slot_TK, weight_TK, layer, tokens_hint),
                            [t for t in (x_TD, dest_TK, slot_TK, weight_TK) if t is not None])

    def combine_async(self, y_ND, layer: int) -> Handle:
        return self._submit(self.combine, (y_ND, layer), [y_ND] if y_ND is not None else [])

    def close(self) -> None:
        self._inflight.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------------------------------
    # padded mode (direct only): fixed regions, no headers, no host sync on the data path

    def _dispatch_padded(self, x_TD, dest_TK, slot_TK, weight_TK, T: int, layer: int, hint: int | None,
                         start: float) -> ExpertBatch | None:
        P = self.max_tokens if hint is None else hint
        if T > P or P > self.max_tokens:
            raise ValueError(f"layer {layer} dispatch: padded mode needs T={T} <= tokens_hint={P} <= "
                             f"max_tokens_per_rank={self.max_tokens}")
        set_idx = self._calls % NUM_BUFFER_SETS
        self._calls += 1
        E, A, D, K = self.n_experts, len(self.topo.attention_ranks), self.hidden, self.top_k
        recv = self._buf(set_idx, "pad_recv", A * self.max_tokens, meta=True) if self.is_expert else None
        rows_TE = None
        if self.is_attention and P:
            send = self._buf(set_idx, "pad_send", E * self.max_tokens + 1, meta=True)
            scratch = E * P  # rows of (token, expert rank) pairs that don't exist land here and are never sent
            send.ids[:scratch + 1].fill_(-1)
            send.w[:scratch + 1].zero_()
            dest = dest_TK.to(device=self.device, dtype=torch.long)
            e_ar = torch.arange(E, device=self.device)
            match_TEK = dest[:, None, :] == e_ar[None, :, None]  # [T, E, K]
            hit_TE = match_TEK.any(2)
            pos_TE = hit_TE.to(torch.long).cumsum(0) - 1  # row of token t within expert rank e's region
            rows_TE = torch.where(hit_TE, e_ar[None, :] * P + pos_TE, scratch)  # [T, E]
            flat = rows_TE.reshape(-1)
            send.x.index_copy_(0, flat, x_TD.to(self.dtype)[:, None, :].expand(T, E, D).reshape(T * E, D))
            slot = slot_TK.to(device=self.device, dtype=torch.int32)[:, None, :].expand(T, E, K)
            send.ids.index_copy_(0, flat, torch.where(match_TEK, slot, -1).reshape(T * E, K))
            wgt = weight_TK.to(device=self.device, dtype=torch.float32)[:, None, :].expand(T, E, K)
            send.w.index_copy_(0, flat, torch.where(match_TEK, wgt, 0.0).reshape(T * E, K))
        if P:
            self._exchange_regions(send.raw if self.is_attention else None, recv.raw if self.is_expert else None, P,
                                   forward=True, layer=layer, what="dispatch", start=start)
        N = A * P if self.is_expert else 0
        self._pending.append(_Call(layer, self.plans["direct"], set_idx, [], T, rows_TE, [], N, pad=P))
        if not self.is_expert:
            return None
        return ExpertBatch(recv.x[:N], recv.ids[:N], recv.w[:N], layer, {a: P for a in self.topo.attention_ranks})

    def _combine_padded(self, call: _Call, y: torch.Tensor, layer: int, start: float) -> torch.Tensor | None:
        P, E = call.pad, self.n_experts
        ys = self._buf(call.set_idx, "pad_ys", E * self.max_tokens, meta=False) if self.is_attention else None
        if P:
            src = y.view(torch.uint8) if self.is_expert else None
            self._exchange_regions(src, ys.raw if self.is_attention else None, P, forward=False, layer=layer,
                                   what="combine", start=start)
        if not self.is_attention:
            return None
        out = torch.zeros(call.T, self.hidden, dtype=self.dtype, device=self.device)
        if call.T and P:
            scratch = E * P
            ysv = ys.x[:scratch]
            for e in range(E):  # expert-rank order, as in counts mode: bit-identical sums
                rows = call.src_rows[:, e]
                hit = rows != scratch
                out = torch.where(hit[:, None], out + ysv[rows.clamp(max=scratch - 1)], out)
        return out

    def _exchange_regions(self, src: torch.Tensor | None, dst: torch.Tensor | None, P: int, forward: bool, layer: int,
                          what: str, start: float) -> None:
        """Move P-row regions of uint8 row buffers between the two sides (None where this rank is not on one).

        forward (dispatch): attention rank a's region e -> expert rank e's region a; backward (combine):
        expert rank e's region a -> attention rank a's region e. In both, a sender's region j goes to its
        j-th receiver and lands in the receiver's region i for the i-th sender.
        """
        if self.collective:
            self._all_to_all(dst[:P * len(self._senders(forward))] if dst is not None else self._empty,
                             src[:P * len(self._senders(not forward))] if src is not None else self._empty,
                             P, forward, layer, what, start)
            return
        senders, receivers = self._senders(forward), self._senders(not forward)
        ops, peers = [], []
        if src is not None:
            me = senders.index(self.rank)
            for j, q in enumerate(receivers):
                region = src[j * P:(j + 1) * P]
                if q == self.rank:
                    dst[me * P:(me + 1) * P].copy_(region)
                else:
                    ops.append(dist.P2POp(dist.isend, region, q, group=self.ctx.data_group))
                    peers.append((q, "send"))
                    self._count(q, region.numel())
        if dst is not None:
            for i, q in enumerate(senders):
                if q != self.rank:
                    ops.append(dist.P2POp(dist.irecv, dst[i * P:(i + 1) * P], q, group=self.ctx.data_group))
                    peers.append((q, "recv"))
        self._run_data(ops, peers, layer, what, start)
        self._finish(layer, what, start)

    def _senders(self, forward: bool) -> tuple[int, ...]:
        return self.topo.attention_ranks if forward else self.topo.expert_ranks

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, P: int, forward: bool, layer: int, what: str,
                     start: float) -> None:
        """One padded exchange: P rows to/from every (attention, expert) peer as one all_to_all_single."""
        splits = self._splits.get(P)
        if splits is None:
            att, exp = set(self.topo.attention_ranks), set(self.topo.expert_ranks)
            to_experts = [P if self.is_attention and r in exp else 0 for r in range(self.topo.world_size)]
            from_attention = [P if self.is_expert and r in att else 0 for r in range(self.topo.world_size)]
            splits = self._splits[P] = (to_experts, from_attention)
        send_splits, recv_splits = splits if forward else splits[::-1]
        peers = [r for r, n in enumerate(recv_splits) if n and r != self.rank]
        for r, n in enumerate(send_splits):
            if n and r != self.rank:
                self._count(r, n * inp.shape[1])
        if not self.nccl:  # gloo: a blocking wait with the deadline (peer unknown inside a collective)
            work = dist.all_to_all_single(out, inp, recv_splits, send_splits, group=self.ctx.data_group,
                                          async_op=True)
            try:
                ok = work.wait(timeout=timedelta(seconds=self._deadline_left(start)))
            except RuntimeError as e:
                raise self._silent_peers(layer, what, peers, e) from None
            if ok is False:
                raise self._silent_peers(layer, what, peers, None)
            return
        # NCCL: enqueued, the current stream waits for it, the host goes on (and a CUDA graph can capture it)
        dist.all_to_all_single(out, inp, recv_splits, send_splits, group=self.ctx.data_group)
        if torch.cuda.is_current_stream_capturing():  # a CUDA graph: drain() checks its replays as a whole
            return
        self._track(layer, what, start, peers)

    def _track(self, layer, what: str, start: float, peers: list[int]) -> None:
        done = torch.cuda.Event()
        done.record()
        self._inflight.append((done, layer, what, start, peers))
        self._retire(block=len(self._inflight) > MAX_INFLIGHT)

    def _retire(self, block: bool = False) -> None:
        """Drop finished padded NCCL calls; raise if the oldest unfinished one is past its deadline."""
        while self._inflight:
            done, layer, what, start, peers = self._inflight[0]
            if done.query():
                self._inflight.popleft()
                continue
            if time.monotonic() - start > self.timeout_s:
                raise self._silent_peers(layer, what, peers, None)
            if not block:
                return
            time.sleep(5e-5)

    def drain(self) -> None:
        """Wait (with the deadline) until every padded NCCL call issued so far has finished.

        Call it before the host reads GPU results that depend on them (the runtime does, once per
        step): a dead peer then raises CommError naming it and the layer instead of hanging the read.
        Work this rank queued on the current stream since (e.g. a CUDA graph replay) is covered too.
        """
        if not self.inline:
            return
        peers = [r for r in (self.topo.expert_ranks if self.is_attention else ()) if r != self.rank]
        peers += [r for r in (self.topo.attention_ranks if self.is_expert else ()) if r != self.rank and r not in peers]
        self._track("(this step's last)", "exchange", time.monotonic(), peers)
        while self._inflight:
            self._retire(block=True)

    def _silent_peers(self, layer: int, what: str, peers: list[int], e: Exception | None) -> CommError:
        names = ", ".join(f"rank {q} ({self.topo.role_of(q)})" for q in peers) or "its peers"
        detail = f": {str(e).strip().splitlines()[0]}" if e is not None and str(e).strip() else ""
        return CommError(f"layer {layer} {what}: no data from {names} within {self.timeout_s} s "
                         f"(rank {self.rank} waiting){detail}")

    # ------------------------------------------------------------------------------------------
    # internals

    def _submit(self, fn, args, inputs: list[torch.Tensor]) -> Handle:
        if self.inline:
            return self._run_inline(fn, args, inputs)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afsplit-comm")
        if self._stream is None:
            return Handle(self._executor.submit(fn, *args))
        caller = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event()
        ready.record(caller)
        done = torch.cuda.Event()
        for t in inputs:
            t.record_stream(self._stream)

        def run():
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                result = fn(*args)
                for t in _tensors_of(result):
                    t.record_stream(caller)
                done.record(self._stream)
            return result

        return Handle(self._executor.submit(run), done)

    def _run_inline(self, fn, args, inputs: list[torch.Tensor]) -> Handle:
        """Async call without a thread: enqueue it on the communicator's stream now, return a finished Handle."""
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        for t in inputs:
            t.record_stream(self._stream)
        future: Future = Future()
        with torch.cuda.stream(self._stream):
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 -- surfaces at .wait(), as from the worker thread
                future.set_exception(e)
                return Handle(future)
            for t in _tensors_of(result):
                t.record_stream(caller)
            done = torch.cuda.Event()
            done.record(self._stream)
        future.set_result(result)
        return Handle(future, done)

    def _buf(self, set_idx: int, name: str, cap: int, meta: bool) -> _Rows:
        key = (set_idx, name, meta)
        b = self._bufs.get(key)
        if b is None or b.cap < cap:
            b = _Rows(cap, self.hidden, self.top_k, self.dtype, self.device, meta)
            self._bufs[key] = b
        return b

    def agree_tokens(self, T: int, layer: int = -1) -> int:
        """Collective (control group): the largest T over all ranks; pass it as dispatch's tokens_hint."""
        return self.agree_step(T, True, layer)[0]

    def agree_step(self, T: int, decode_only: bool, layer: int = -1) -> tuple[int, bool]:
        """Collective (control group): (largest T, whether every rank only decodes) over all ranks."""
        t = torch.tensor([T, 0 if decode_only else 1], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.control_group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise CommError(f"layer {layer} dispatch: token-count vote did not complete within {self.timeout_s} s "
                            f"(a rank is dead or stuck): {e}") from None
        return int(t[0]), not bool(t[1])

    def _choose(self, T: int, layer: int, hint: int | None) -> str:
        if self.transport != "adaptive":
            return self.transport
        if hint is not None:
            if T > hint:
                raise ValueError(f"layer {layer} dispatch: tokens_hint={hint} < this rank's T={T}; the hint must be "
                                 "the max over all attention ranks")
            t_max = hint
        else:  # every rank must pick the same plan: agree on the largest T first
            t_max = self.agree_tokens(T, layer)
        choice = self._choice_cache.get(t_max)
        if choice is None:
            costs = {n: c(t_max) for n, c in self.cost.items()}
            choice = min(costs, key=lambda n: (costs[n], n != "direct"))
            self._choice_cache[t_max] = choice
            if self.rank == 0:
                log.debug("adaptive: %d tokens/rank -> %s (%s)", t_max, choice,
                          ", ".join(f"{n} {c * 1e6:.0f} us" for n, c in costs.items()))
        return choice

    def _pack(self, plan: RoutePlan, name: str, buf: _Rows, x_TD, dest_TK, slot_TK, weight_TK):
        """Write this source's rows into `buf` ordered by (next hop, expert rank); return layout, token index."""
        T = x_TD.shape[0]
        order = self._pack_order[name]  # [P] expert index at each packed position
        keys = [k for _q, ks in plan.sends[0][self.rank] for k in ks]
        dest = dest_TK.to(device=self.device, dtype=torch.long)
        hit_TE = torch.zeros(T, self.n_experts, dtype=torch.bool, device=self.device)
        hit_TE.scatter_(1, dest, True)
        hit_PT = hit_TE[:, order].T  # [P, T]
        counts = hit_PT.sum(1).tolist()  # host sync: sizes are needed to post receives
        p_idx, t_idx = hit_PT.nonzero(as_tuple=True)  # sorted by (packed position, token)
        n = t_idx.numel()
        e_idx = order[p_idx]  # [n]
        match = dest[t_idx] == e_idx[:, None]  # [n, K]
        buf.x[:n].copy_(x_TD.index_select(0, t_idx))
        buf.ids[:n].copy_(torch.where(match, slot_TK.to(self.device)[t_idx].to(torch.int32), -1))
        buf.w[:n].copy_(torch.where(match, weight_TK.to(self.device)[t_idx].to(torch.float32), 0.0))
        layout, off = [], 0
        for k, c in zip(keys, counts):
            layout.append((k, off, c))
            off += c
        return layout, t_idx

    def _dispatch_stage(self, plan: RoutePlan, s: int, set_idx: int, held: _Rows | None,
                        held_layout: list[tuple[Key, int, int]], layer: int, start: float):
        p = self.rank
        where = {k: (off, n) for k, off, n in held_layout}
        sends = plan.sends[s].get(p, [])
        recvs = plan.recvs[s].get(p, [])
        send_keys = [k for _q, ks in sends for k in ks]
        held_rows = sum(n for _k, _o, n in held_layout)

        # send buffer: held rows re-ordered by (destination peer, key)
        if [k for k, _o, _n in held_layout] == send_keys:
            send_buf, perm = held, None
        else:
            starts = torch.tensor([where[k][0] for k in send_keys], dtype=torch.long)
            lens = torch.tensor([where[k][1] for k in send_keys], dtype=torch.long)
            perm = _ranges(starts, lens).to(self.device)
            send_buf = self._buf(set_idx, f"send{s}", plan.capacity(p, s, self.max_tokens, self.top_k), meta=True)
            torch.index_select(held.raw[:max(held_rows, 1)], 0, perm, out=send_buf.raw[:perm.numel()])
        send_by_peer, off = [], 0
        for q, ks in sends:
            n = sum(where[k][1] for k in ks)
            send_by_peer.append((q, off, n))
            off += n
        send_rows = off

        # headers: row counts per key, over the control group
        works = []
        for q, ks in sends:
            if q != p:
                hdr = torch.tensor([where[k][1] for k in ks], dtype=torch.int64)
                works.append((dist.isend(hdr, q, group=self.ctx.control_group), q, "send"))
        hdrs = {}
        for q, ks in recvs:
            if q != p:
                hdrs[q] = torch.empty(len(ks), dtype=torch.int64)
                works.append((dist.irecv(hdrs[q], q, group=self.ctx.control_group), q, "recv"))
        t_hdr = time.perf_counter()
        self._wait_gloo(works, layer, "dispatch", start)
        self.header_time_s += time.perf_counter() - t_hdr

        # receive layout: by source peer, then key
        recv_layout, recv_by_peer, off = [], [], 0
        self_n = {k: where[k][1] for q, ks in sends if q == p for k in ks}
        for q, ks in recvs:
            counts = [self_n[k] for k in ks] if q == p else hdrs[q].tolist()
            start_q = off
            for k, c in zip(ks, counts):
                recv_layout.append((k, off, c))
                off += c
            recv_by_peer.append((q, start_q, off - start_q))
        recv_rows = off
        recv_buf = self._buf(set_idx, f"recv{s}", plan.capacity(p, s + 1, self.max_tokens, self.top_k), meta=True)

        ops, peers = [], []
        for (q, so, sn) in send_by_peer:
            if q == p:
                ro, rn = next((o, n) for qq, o, n in recv_by_peer if qq == p)
                if sn:
                    recv_buf.raw[ro:ro + rn].copy_(send_buf.raw[so:so + sn])
            elif sn:
                ops.append(dist.P2POp(dist.isend, send_buf.raw[so:so + sn], q, group=self.ctx.data_group))
                peers.append((q, "send"))
                self._count(q, sn * send_buf.raw.shape[1])
        for (q, ro, rn) in recv_by_peer:
            if q != p and rn:
                ops.append(dist.P2POp(dist.irecv, recv_buf.raw[ro:ro + rn], q, group=self.ctx.data_group))
                peers.append((q, "recv"))
        self._run_data(ops, peers, layer, "dispatch", start)
        st = _Stage(s, send_by_peer, recv_by_peer, perm, held_rows, send_rows, recv_rows)
        return recv_buf, recv_layout, st

    def _combine_stage(self, call: _Call, st: _Stage, y: torch.Tensor, layer: int, start: float) -> torch.Tensor:
        """Reverse of one dispatch stage: y holds rows in the stage's receive layout."""
        p = self.rank
        cap = call.plan.capacity(p, st.s, self.max_tokens, self.top_k)
        ys_buf = self._buf(call.set_idx, f"ysend{st.s}", cap, meta=False)
        y_raw = y.view(torch.uint8)
        ops, peers = [], []
        for (q, ro, rn) in st.recv_by_peer:
            if q == p:
                so, sn = next((o, n) for qq, o, n in st.send_by_peer if qq == p)
                if rn:
                    ys_buf.raw[so:so + sn].copy_(y_raw[ro:ro + rn])
            elif rn:
                ops.append(dist.P2POp(dist.isend, y_raw[ro:ro + rn], q, group=self.ctx.data_group))
                peers.append((q, "send"))
                self._count(q, rn * y_raw.shape[1])
        for (q, so, sn) in st.send_by_peer:
            if q != p and sn:
                ops.append(dist.P2POp(dist.irecv, ys_buf.raw[so:so + sn], q, group=self.ctx.data_group))
                peers.append((q, "recv"))
        self._run_data(ops, peers, layer, "combine", start)
        ys = ys_buf.x[:st.send_rows]
        if st.perm is None:
            return ys
        yh = self._buf(call.set_idx, f"yheld{st.s}", cap, meta=False)
        out = yh.x[:st.held_rows]
        out.index_copy_(0, st.perm, ys)
        return out

    def _count(self, q: int, nbytes: int) -> None:
        kind = "intra" if self.topo.node_of(q) == self.topo.node_of(self.rank) else "inter"
        self.bytes_sent[kind] += nbytes

    # ---- waiting with a deadline, naming the peer

    def _deadline_left(self, start: float) -> float:
        return max(self.timeout_s - (time.monotonic() - start), 1e-3)

    def _wait_gloo(self, works, layer: int, what: str, start: float) -> None:
        # receives first: a missing receive names the peer that is dead or stuck
        for work, q, kind in sorted(works, key=lambda w: w[2] != "recv"):
            try:
                ok = work.wait(timeout=timedelta(seconds=self._deadline_left(start)))
            except RuntimeError as e:
                raise self._peer_error(layer, what, q, kind, e) from None
            if ok is False:
                raise self._peer_error(layer, what, q, kind, None)

    def _peer_error(self, layer: int, what: str, q: int, kind: str, e: Exception | None) -> CommError:
        msg = str(e) if e is not None else "timed out"
        low = msg.lower()
        role = self.topo.role_of(q)
        first = msg.strip().splitlines()[0] if msg.strip() else msg
        if e is None or "timeout" in low or "timed out" in low:
            if kind == "recv":
                return CommError(f"layer {layer} {what}: no data from rank {q} ({role}) within {self.timeout_s} s "
                                 f"(rank {self.rank} waiting)")
            return CommError(f"layer {layer} {what}: rank {q} ({role}) did not take its data within "
                             f"{self.timeout_s} s (rank {self.rank} sending)")
        if "closed" in low or "reset" in low or "broken pipe" in low:
            return CommError(f"layer {layer} {what}: rank {q} ({role}) is gone (connection lost; rank {self.rank} "
                             f"was {'receiving from' if kind == 'recv' else 'sending to'} it): {first}")
        verb = "receive from" if kind == "recv" else "send to"
        return CommError(f"layer {layer} {what}: {verb} rank {q} ({role}) failed on rank {self.rank}: {first}")

    def _run_data(self, ops, peers, layer: int, what: str, start: float) -> None:
        if not ops:
            return
        if not self.nccl:
            works = [(op.op(op.tensor, op.peer, group=op.group), q, kind) for op, (q, kind) in zip(ops, peers)]
            self._wait_gloo(works, layer, what, start)
            return
        works = dist.batch_isend_irecv(ops)
        for w in works:
            w.wait()  # stream-ordered: later stages and the caller see the data; CPU does not block
        self._nccl_works.append((works, sorted({q for q, k in peers if k == "recv"} or {q for q, _ in peers})))

    def _finish(self, layer: int, what: str, start: float) -> None:
        """On NCCL, poll the call's data transfers until done or the deadline; name the silent peers."""
        if not self.nccl:
            return
        pending, self._nccl_works = self._nccl_works, []
        for works, qs in pending:
            spin_until = time.monotonic() + 2e-3
            while not all(w.is_completed() for w in works):
                now = time.monotonic()
                if now - start > self.timeout_s:
                    names = ", ".join(f"rank {q} ({self.topo.role_of(q)})" for q in qs)
                    raise CommError(f"layer {layer} {what}: no data from {names} within {self.timeout_s} s "
                                    f"(rank {self.rank} waiting)")
                time.sleep(0 if now < spin_until else 5e-5)  # spin briefly (latency), then back off


def _ranges(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lens.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long)
    ends = torch.cumsum(lens, 0)
    shift = torch.repeat_interleave(starts - (ends - lens), lens)
    return torch.arange(total, dtype=torch.long) + shift


def _tensors_of(result: Any):
    if isinstance(result, torch.Tensor):
        yield result
    elif isinstance(result, ExpertBatch):
        yield from (result.x, result.topk_ids, result.topk_weights)
