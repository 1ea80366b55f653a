"""The M2N exchange between attention ranks and expert ranks: dispatch returns a handle, combine consumes it.

    ex = MoEExchange(ctx, hidden=2048, top_k=8, dtype=torch.bfloat16, max_tokens_per_rank=512,
                     transport="direct", metadata="padded", channels=2)
    ex.begin_step(P)                     # once per step: rows per (attention, expert) region
    # attention rank: x_TD [T, D], dest_TK = expert index (position in topology.expert_ranks),
    # slot_TK = local slot there (-1: nowhere), weight_TK [T, K]
    h = ex.dispatch(x_TD, dest_TK, slot_TK, weight_TK, layer, channel=u)
    # expert rank (same call with None inputs): h.batch is what it serves, y rows in h.batch order
    y_ND = fused_moe(h.batch.x, w13, w2, h.batch.topk_ids, h.batch.topk_weights)
    out_TD = ex.combine(y_ND, h)         # attention rank: [T, D] sum of partials; expert rank: None
    ex.drain()                           # once per step, before the host reads results

A colocated rank is both at once. Micro-batch u goes through channel u (comm/channel.py): its own
buffers, stream and groups, so different micro-batches' exchanges overlap; within a channel every
rank issues the same calls in the same order.

Rows: a token goes once to each expert rank holding one of its top-k slots (its row carries all K
slot ids, -1 elsewhere: comm/pack.py). Every (attention rank, expert rank) pair is a *key*; a
transport (comm/transports/) routes every key through up to 3 stages (direct: one hop; two_phase:
node gateway -> network -> entry rank), and a mover (comm/movers/) moves each stage's segments: NCCL or
gloo for every link, or (``intra_node``) torch symmetric memory for intra-node links, NCCL across nodes.

Metadata:

* ``padded`` (default): every key is a region of P rows (P from :meth:`begin_step`, the step's
  largest micro-batch), padding rows carrying ids -1 (the expert kernels skip them). Every size
  is known on every rank, so there are no headers, no host sync inside a layer, and a CUDA graph
  captures the whole exchange, whatever the transport, replicas and statistics.
* ``counts``: exact-sized keys; the row counts are read on the host and travel as headers over
  a gloo group before each stage. Fewer bytes (at many expert ranks a token hits only some of
  them), one host sync per layer: eager only.

With one rank in all (a colocated rank alone) nothing moves: the expert batch is the caller's own
tokens and the combine returns the partial sums directly.

Faults: every wait has a deadline of ``timeout_s`` (comm/peer_watch.py); a dead or silent peer
raises ``CommError`` naming the rank.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from comm.channel import Channel, make_channels
from comm.layout import Held, RowBuffer, StageLayout, capacity, plan_stage
from comm.movers import select_mover
from comm.pack import pack, route_rows, sum_partials
from comm.peer_watch import RECV, SEND, PeerWatch
from comm.transports import ROUTES, TRANSPORTS, build_plan
from comm.transports.adaptive import CostModel, LinkModel, calibrate
from comm.transports.route import RoutePlan

log = logging.getLogger(__name__)

METADATA = ("padded", "counts")


@dataclass
class ExpertBatch:
    """What an expert rank serves for one layer and micro-batch (views into the channel's buffers).

    Padding rows (padded metadata) have every topk_id == -1; combine ignores their outputs.
    """

    x: torch.Tensor  # [N, D]
    topk_ids: torch.Tensor  # [N, K] int32 local expert slot on this rank, -1 where not on this rank
    topk_weights: torch.Tensor  # [N, K] float32, 0 where topk_ids == -1


@dataclass
class Handle:
    """One dispatch, consumed by its combine (DeepEP-style): where every row went and came from."""

    layer: int
    channel: int
    route: str
    T: int  # tokens of this rank as a source (0 if not an attention rank)
    P: int  # rows per key (padded), -1 with exact counts
    rows_TJ: torch.Tensor | None  # source side: packed row of each (token, expert rank), scratch if none
    stages: list[StageLayout] = field(default_factory=list)
    batch: ExpertBatch | None = None
    start: float = 0.0


class MoEExchange:
    """Dispatch tokens from attention ranks to expert ranks and combine the partial outputs back."""

    def __init__(self, ctx, hidden: int, top_k: int, dtype: torch.dtype, max_tokens_per_rank: int,
                 transport: str = "direct", metadata: str = "padded", timeout_s: float = 120.0, channels: int = 1,
                 link_model: LinkModel | None = None, attention_groups: bool = False, collective: bool | None = None,
                 intra_node: str = "nccl"):
        """channels: micro-batches that may be in flight at once. attention_groups: give every channel a
        group of the attention ranks (replica choice exchanges token counts over it). link_model: skip the
        start-up calibration (adaptive). collective: on gloo, move padded stages as one all_to_all_single
        like NCCL does (tests check that path's layout on CPU). intra_node: auto | nccl | symm_mem, how
        intra-node links move (comm/movers/symm_mem.py; falls back to the backend's mover, logged)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"comm.transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if metadata not in METADATA:
            raise ValueError(f"comm.metadata: {metadata!r} is not one of {', '.join(METADATA)}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (hidden * itemsize) % 4:
            raise ValueError(f"hidden * itemsize = {hidden * itemsize} bytes must be a multiple of 4")
        self.ctx, self.hidden, self.top_k, self.dtype = ctx, hidden, top_k, dtype
        self.max_tokens, self.transport, self.metadata, self.timeout_s = max_tokens_per_rank, transport, metadata, timeout_s
        self.rank, self.device, self.topo = ctx.rank, ctx.device, ctx.topology
        self.world = ctx.world_size
        self.is_attention, self.is_expert = ctx.is_attention, ctx.is_expert
        self.n_experts = len(self.topo.expert_ranks)
        self.nccl = ctx.backend == "nccl"
        self.watch = PeerWatch(self.topo, self.rank, timeout_s)
        self.plans = {name: build_plan(self.topo, name) for name in ROUTES}
        self.channels: list[Channel] = make_channels(ctx, channels, attention_groups, metadata == "counts")
        self.row_bytes = hidden * itemsize + 8 * top_k
        # the backend's mover, or symmetric memory for intra-node links (then the receive buffers live in it)
        self.mover = select_mover(ctx, self.watch, intra_node, metadata, self.channels,
                                  self._receive_buffers(hidden * itemsize), collective)
        self.link_model: LinkModel | None = None
        self.cost: dict[str, CostModel] = {}
        if transport == "adaptive":  # intra-node links are timed through the mover in use
            link = self.mover.link(self.channels[0]) if hasattr(self.mover, "link") else None
            self.link_model = link_model or calibrate(ctx, intra_link=link)
            self.cost = {n: CostModel(p, self.link_model, top_k, self.row_bytes, hidden * itemsize,
                                      exact=metadata == "counts") for n, p in self.plans.items()}
        self._choice: dict[int, str] = {}
        self._layouts: dict[tuple, object] = {}  # padded stage layouts and region offsets by (route, P)
        # where an attention rank packs each expert rank's rows: its stage-0 send order, per route
        self._region_of: dict[str, list[int]] = {}
        if self.is_attention:
            for name, plan in self.plans.items():
                order = [self.topo.expert_index(e) for _a, e in plan.first_hop_keys(self.rank)]
                self._region_of[name] = [order.index(j) for j in range(self.n_experts)]
        self.P = max_tokens_per_rank
        self.route = transport if transport != "adaptive" else self._choose(max_tokens_per_rank)
        self.bytes_sent = {"intra": 0, "inter": 0}  # eager calls only (benchmarks)

    # ------------------------------------------------------------------------------------------
    # per step

    @property
    def graph_safe(self) -> bool:
        """Whether a forward through this exchange can be captured in a CUDA graph (no host syncs)."""
        return self.metadata == "padded"

    @property
    def needs_vote(self) -> bool:
        """Padded regions and the adaptive choice need every rank's largest micro-batch, once per step."""
        return self.world > 1 and (self.metadata == "padded" or self.transport == "adaptive")

    def agree_step(self, T: int, decode_only: bool) -> tuple[int, bool]:
        """(largest micro-batch T, whether every rank only decodes) over all ranks (control group vote)."""
        if not self.needs_vote:
            return T, decode_only
        t = torch.tensor([T, 0 if decode_only else 1], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.control_group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self.watch.silent_peers("(step vote)", "dispatch", [r for r in range(self.world) if r != self.rank],
                                          e) from None
        return int(t[0]), not bool(t[1])

    def begin_step(self, P: int) -> None:
        """Rows per key for this step's padded regions (the same on every rank), and the route for it."""
        if not 0 <= P <= self.max_tokens:
            raise ValueError(f"region size P={P} must be in [0, max_tokens_per_rank={self.max_tokens}]")
        self.P = P
        if self.transport == "adaptive":
            self.route = self._choose(P)

    def join(self) -> None:
        """Make the caller's stream wait for every channel's stream: the end of a captured step must rejoin
        the streams it forked (an expert rank's last combine leaves work on its channel streams)."""
        for ch in self.channels:
            if ch.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(ch.stream)

    def drain(self) -> None:
        """Wait (with the deadline) until everything this rank's exchanges enqueued has finished; gloo sends
        still in flight are waited on too. Call before the host reads results of the step."""
        for ch in self.channels:
            self._wait_sends(ch, "(end of step)", time.monotonic())
        if self.nccl:
            peers = [r for r in range(self.world) if r != self.rank]
            self.watch.drain([ch.stream for ch in self.channels if ch.stream is not None], peers)

    def close(self) -> None:
        self.watch.clear()
        self.mover.clear()
        for ch in self.channels:
            ch.pending_sends.clear()

    # ------------------------------------------------------------------------------------------
    # dispatch / combine

    def dispatch(self, x_TD: torch.Tensor | None, dest_TK: torch.Tensor | None, slot_TK: torch.Tensor | None,
                 weight_TK: torch.Tensor | None, layer: int, channel: int = 0) -> Handle:
        """Send this attention rank's tokens to the expert ranks of their top-k slots (collective within
        the channel). Attention ranks pass [T, ...] tensors (T may be 0); expert-only ranks pass None.
        On expert ranks the returned handle's ``batch`` holds the rows to serve."""
        start = time.monotonic()
        ch = self._channel(channel, layer)
        T = self._check_inputs(x_TD, dest_TK, layer)
        plan = self.plans[self.route]
        if self.world == 1:  # nothing moves: the expert batch is the caller's own tokens
            h = Handle(layer, channel, plan.name, T, self.P, None, start=start)
            h.batch = ExpertBatch(x_TD, slot_TK.to(torch.int32), weight_TK.to(torch.float32))
            return h
        exact = self.metadata == "counts"
        self._wait_sends(ch, layer, start)
        held: Held = []
        rows_TJ = None
        J, cap = self.n_experts, self.n_experts * self.max_tokens
        if self.is_attention:
            buf = ch.buffer("pack", cap, self.hidden, self.top_k, self.dtype, self.device, meta=True)
            regions = self._region_of[plan.name]
            keys = plan.first_hop_keys(self.rank)
            if exact:
                rows_TJ, held = self._pack_exact(buf, regions, keys, x_TD, dest_TK, slot_TK, weight_TK, T)
            else:
                rows_TJ, _hit, match = route_rows(dest_TK, self._offsets(plan.name), J, buf.scratch)
                pack(buf, rows_TJ, match, x_TD, slot_TK, weight_TK, J * self.P)
                held = [(k, r * self.P, self.P) for r, k in enumerate(keys)]
            src = buf
        else:
            src = None
        h = Handle(layer, channel, plan.name, T, -1 if exact else self.P, rows_TJ, start=start)
        with self._on(ch):
            for s in plan.active_stages:
                if exact:
                    sizes = self._exchange_headers(ch, plan, s, held, layer, start)
                    stage, held = plan_stage(plan, self.rank, s, held, sizes.__getitem__, self.device)
                else:
                    stage, held = self._padded_stage(plan, s)
                src = self._run_stage(ch, plan, stage, src, layer, start)
                h.stages.append(stage)
        if self.is_expert:
            N = sum(n for _k, _o, n in held)
            if src is None:  # an expert-only rank that received nothing
                src = ch.buffer("empty", 0, self.hidden, self.top_k, self.dtype, self.device, meta=True)
            h.batch = ExpertBatch(src.x[:N], src.ids[:N], src.w[:N])
            if ch.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(ch.stream)
        return h

    def combine(self, y_ND: torch.Tensor | None, h: Handle) -> torch.Tensor | None:
        """Send expert partial outputs back (rows in h.batch order) and sum them per token (collective within
        the channel). Returns [T, D] on attention ranks (in the order of their dispatched x_TD), else None."""
        start = time.monotonic()
        layer, ch = h.layer, self._channel(h.channel, h.layer)
        if self.is_expert:
            if y_ND is None:
                raise ValueError(f"layer {layer} combine: rank {self.rank} is an expert rank and must pass y_ND")
            if tuple(y_ND.shape) != (h.batch.x.shape[0], self.hidden):
                raise ValueError(f"layer {layer} combine: y_ND must be [{h.batch.x.shape[0]}, {self.hidden}] "
                                 f"(the ExpertBatch rows), got {tuple(y_ND.shape)}")
        if self.world == 1:
            return y_ND.to(self.dtype)
        self._wait_sends(ch, layer, start)
        y = y_ND.to(self.dtype).contiguous().view(torch.uint8) if self.is_expert else None
        back = None
        with self._on(ch):
            if y is not None and ch.stream is not None:
                y.record_stream(ch.stream)  # produced on the caller's stream, sent from the channel's
            for stage in reversed(h.stages):
                back = self._run_stage_back(ch, h, stage, y, layer, start)
                y = back.raw
        if not self.is_attention:
            return None  # the sends stay on the channel stream; the step ends with join() (a capture needs it)
        if ch.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(ch.stream)
        # y is back in the packed order (nothing moved before the first stage); its scratch row is zero
        return sum_partials(back.x, h.rows_TJ, self.dtype)

    # ------------------------------------------------------------------------------------------
    # stages

    def _padded_stage(self, plan: RoutePlan, s: int) -> tuple[StageLayout, Held]:
        """The cached layout of stage s for this step's P (every key has P rows)."""
        key = (plan.name, self.P)
        stages = self._layouts.get(key)
        if stages is None:
            held: Held = []
            if self.is_attention:
                held = [(k, r * self.P, self.P) for r, k in enumerate(plan.first_hop_keys(self.rank))]
            stages = {}
            for st in plan.active_stages:
                layout, held = plan_stage(plan, self.rank, st, held, lambda _k: self.P, self.device)
                stages[st] = (layout, held)
            self._layouts[key] = stages
        return stages[s]

    def _run_stage(self, ch: Channel, plan: RoutePlan, stage: StageLayout, held_buf: RowBuffer | None,
                   layer, start: float) -> RowBuffer:
        """Reorder what this rank holds into send order, move the stage; returns the receive buffer."""
        s = stage.s
        send = held_buf
        if stage.perm is not None:
            send = self._buf(ch, plan, f"send{s}", s, meta=True)
            torch.index_select(held_buf.raw[:max(stage.held_rows, 1)], 0, stage.perm, out=send.raw[:stage.send_rows])
        recv = self._buf(ch, plan, f"recv{s}", s + 1, meta=True)
        send_raw = send.raw if send is not None else recv.raw[:0]
        self._count(stage.send, send_raw.shape[1] if send is not None else 0)
        ch.pending_sends += self.mover.move(ch, send_raw, stage.send, recv.raw, stage.recv, layer, "dispatch", start,
                                            (plan, s, self.P, False))
        return recv

    def _run_stage_back(self, ch: Channel, h: Handle, stage: StageLayout, y_raw: torch.Tensor | None,
                        layer, start: float) -> RowBuffer:
        """Combine through one stage backwards: y_raw holds rows in the stage's receive layout; returns the
        buffer holding them in the layout before the stage."""
        s = stage.s
        plan = self.plans[h.route]
        back = self._buf(ch, plan, f"ysend{s}", s, meta=False)
        if y_raw is None:
            y_raw = back.raw[:0]
        self._count(stage.recv, back.raw.shape[1])
        ch.pending_sends += self.mover.move(ch, y_raw, stage.recv, back.raw, stage.send, layer, "combine", start,
                                            (plan, s, h.P, True))
        if stage.perm is None:
            return back
        held = self._buf(ch, plan, f"yheld{s}", s, meta=False)
        held.raw[:stage.held_rows].index_copy_(0, stage.perm, back.raw[:stage.send_rows])
        return held

    def _offsets(self, route: str) -> torch.Tensor:
        """First packed row of each expert rank's region (padded: region r starts at r * P), cached."""
        key = (route, "offsets", self.P)
        t = self._layouts.get(key)
        if t is None:  # built eagerly before any capture of this P (a graph cannot copy from the host)
            t = self._layouts[key] = torch.tensor([r * self.P for r in self._region_of[route]], device=self.device)
        return t

    def _receive_buffers(self, x_bytes: int) -> list[tuple[str, int, int]]:
        """The buffers peers write into, [(name, rows, bytes per row)], each sized for the largest rank (a
        symmetric-memory window lays them out alike on every rank): recv{s} (dispatch) and ysend{s} (combine)
        of every active stage of the routes this exchange may take."""
        routes = list(self.plans) if self.transport == "adaptive" else [self.transport]
        out = []
        for name in routes:
            plan = self.plans[name]
            for s in plan.active_stages:
                for buf, at, row_bytes in ((f"recv{s}", s + 1, self.row_bytes), (f"ysend{s}", s, x_bytes)):
                    rows = max(capacity(plan, q, at, self.max_tokens) for q in range(self.world)) + 1  # + scratch
                    out.append((f"{name}.{buf}", rows, row_bytes))
        return out

    def _buf(self, ch: Channel, plan: RoutePlan, name: str, s: int, meta: bool) -> RowBuffer:
        cap = capacity(plan, self.rank, s, self.max_tokens)
        return ch.buffer(f"{plan.name}.{name}", cap, self.hidden, self.top_k, self.dtype, self.device, meta)

    # ------------------------------------------------------------------------------------------
    # exact counts (metadata: counts)

    def _pack_exact(self, buf, regions, keys, x_TD, dest_TK, slot_TK, weight_TK, T):
        """Pack with each key exactly as large as its token count (read on the host: the one sync)."""
        J = self.n_experts
        zero = torch.zeros(J, dtype=torch.long, device=self.device)
        _rows, hit_TJ, _m = route_rows(dest_TK, zero, J, buf.scratch)
        counts = hit_TJ.sum(0).tolist() if T else [0] * J
        offs, off = [0] * J, 0
        held = []
        for r, k in enumerate(keys):
            j = regions.index(r)
            offs[j] = off
            held.append((k, off, counts[j]))
            off += counts[j]
        rows_TJ, _hit, match = route_rows(dest_TK, torch.tensor(offs, device=self.device), J, buf.scratch)
        pack(buf, rows_TJ, match, x_TD, slot_TK, weight_TK, off)
        return rows_TJ, held

    def _exchange_headers(self, ch: Channel, plan: RoutePlan, s: int, held: Held, layer, start: float) -> dict:
        """Row counts of the keys each peer is about to send this rank in stage s (gloo, with the deadline)."""
        sizes = {k: n for k, _o, n in held}
        sends, recvs = plan.stage_peers(self.rank, s)
        works, boxes = [], {}
        for q, ks in sends:
            if q != self.rank:
                hdr = torch.tensor([sizes[k] for k in ks], dtype=torch.int64)
                works.append((dist.isend(hdr, q, group=ch.header_group), q, SEND))
        for q, ks in recvs:
            if q != self.rank:
                boxes[q] = torch.empty(len(ks), dtype=torch.int64)
                works.append((dist.irecv(boxes[q], q, group=ch.header_group), q, RECV))
        self.watch.wait(works, layer, "dispatch", start)
        out = {}
        for q, ks in recvs:
            if q != self.rank:
                out.update(zip(ks, boxes[q].tolist()))
        return out

    # ------------------------------------------------------------------------------------------
    # helpers

    def _channel(self, channel: int, layer) -> Channel:
        if not 0 <= channel < len(self.channels):
            raise ValueError(f"layer {layer}: channel {channel} does not exist; the exchange was made with "
                             f"{len(self.channels)} channel(s) (one per micro-batch)")
        return self.channels[channel]

    def _check_inputs(self, x_TD, dest_TK, layer) -> int:
        if not self.is_attention:
            return 0
        if x_TD is None or dest_TK is None:
            raise ValueError(f"layer {layer} dispatch: rank {self.rank} is an attention rank and must pass x_TD, "
                             "dest_TK, slot_TK and weight_TK (use T=0 tensors when it has no tokens)")
        T = x_TD.shape[0]
        limit = self.P if self.metadata == "padded" else self.max_tokens
        if T > limit:
            what = f"this step's region size P={self.P}" if self.metadata == "padded" else "max_tokens_per_rank"
            raise ValueError(f"layer {layer} dispatch: {T} tokens on rank {self.rank} > {what} (max_tokens_per_rank="
                             f"{self.max_tokens}); call begin_step with the step's largest micro-batch")
        if x_TD.shape[1:] != (self.hidden,) or dest_TK.shape != (T, self.top_k):
            raise ValueError(f"layer {layer} dispatch: expected x_TD [T, {self.hidden}] and dest_TK [T, {self.top_k}], "
                             f"got {tuple(x_TD.shape)} and {tuple(dest_TK.shape)}")
        return T

    @contextmanager
    def _on(self, ch: Channel):
        """Run on the channel's stream, after the work the caller queued so far."""
        if ch.stream is None:
            yield
            return
        ch.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(ch.stream):
            yield

    def _wait_sends(self, ch: Channel, layer, start: float) -> None:
        """gloo: the sends from this channel's buffers must be complete before the buffers are written again
        (and whatever else the mover left in flight on the channel: host-side barriers, CPU tests)."""
        if ch.pending_sends:
            works, ch.pending_sends = ch.pending_sends, []
            self.watch.wait(works, layer, "exchange", start)
        self.mover.settle(ch, layer, start)

    def _choose(self, P: int) -> str:
        choice = self._choice.get(P)
        if choice is None:
            costs = {n: c(P) for n, c in self.cost.items()}
            choice = self._choice[P] = min(costs, key=lambda n: (costs[n], n != "direct"))
            if self.rank == 0:
                log.info("adaptive: %d rows per key -> %s (%s)", P, choice,
                         ", ".join(f"{n} {c * 1e6:.0f} us" for n, c in costs.items()))
        return choice

    def _count(self, segments, row_bytes: int) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        me = self.topo.node_of(self.rank)
        for q, _o, n in segments:
            if n and q != self.rank:
                self.bytes_sent["intra" if self.topo.node_of(q) == me else "inter"] += n * row_bytes
