"""Intra-node links on torch symmetric memory: a stage writes its rows straight into the peers' buffers.

The channel's receive buffers (every ``recv{s}`` a stage lands in, every ``ysend{s}`` a combine
lands in) live in one symmetric-memory *window* per channel, allocated once at full capacity and
carved identically on every rank of a node (each buffer at the same byte offset, sized for the
largest rank), so a buffer's address on a peer is "the peer's window + my offset" and a captured
CUDA graph keeps every address. One stage, on the channel's stream:

1. the inter-node segments go over the base mover (NCCL: one ``all_to_all`` of just those
   segments, joined by every rank whenever any rank of the world sends across nodes in the stage;
   gloo in the CPU tests);
2. each intra-node segment is one device copy from the local send rows into the peer's receive
   buffer, at the row where the peer's own layout puts this rank's rows (:func:`stage_writes`:
   with padded regions every key has P rows, so both ends derive every offset from the route plan
   alone -- no counts round trip, no host sync); the segment to this rank itself is a local copy;
3. one device-side barrier over the node (``SymmetricMemory.barrier``, release/acquire on the
   signal pads) whenever any pair of ranks of this node moves rows in the stage: when it returns,
   every write into this rank's buffers has landed.

Why reusing the buffers needs no further signal. Within a channel every rank issues the same calls
in the same order (dispatch layer L: stages up; combine L: stages down; dispatch L + 1 ...), and
each stage with intra-node rows ends in a barrier of the node. Rank p writes rank q's buffer X
again only in the next use of the same stage s (next layer); q's last read of X happens before q
reaches a barrier that p must pass before that write:

* ``recv{s}`` is read by q in stage s + 1 of the same dispatch (reorder / send onwards) or, after
  the last stage, by the experts (main stream; the combine's stream waits for it). Since p -> q moves
  rows in stage s, the combine's stage s (same pairs, reversed) has a barrier too, and it follows
  those reads on q's stream and precedes p's next dispatch;
* ``ysend{s}`` is read by q in combine stage s - 1 (send onwards) or by the final sum (main stream;
  the next dispatch's stream waits for it); the next dispatch's stage s, whose barrier p and q both
  pass, comes after those reads and before the next combine's stage s writes it.

A stage without intra-node rows on a node writes nothing there, so it needs no barrier. Channels
have their own windows (own signal pads), so micro-batches never order each other.

Faults: the barrier spins on the device. It is given a device timeout of ``comm.timeout_s`` plus a
margin, so the host's deadline (comm/peer_watch.py: every call is tracked and the step's drain waits
with the deadline) fires first and raises ``CommError`` naming the node's peers; the device timeout
only stops a GPU that would otherwise spin forever.

A window whose barrier runs on the host (the CPU stand-in of the tests) returns a work for it. Its
host then is the stream, so it waits only where a stream would make later work wait: at once when
this rank receives intra-node rows in the stage (it reads them next), otherwise before its next call
on the channel (:meth:`SymmMemMover.settle`, which the exchange calls first in every dispatch and
combine and in drain) -- the writes the barrier protects are all in later calls. Without that, the
attention side's interleaved channels (dispatch u + 1 before combine u) would wait for an expert
side that first finishes u. Its failures become the same ``CommError``.

Choice (:func:`attach`): ``comm.intra_node: auto`` uses this mover when the data backend is NCCL,
the torch build has symmetric memory, metadata is padded and some node has >= 2 ranks; otherwise,
or when the rendezvous fails on any rank, the base mover carries every link (logged, never an
error). NVSHMEM ops (``all_to_all_vdev``) are not needed: padded regions make every size static.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from comm.peer_watch import PeerWatch
from comm.transports.route import RoutePlan

log = logging.getLogger(__name__)

INTRA_NODE = ("auto", "nccl", "symm_mem")
DEVICE_MARGIN_S = 5.0  # the device barrier's own timeout = comm.timeout_s + this (the host deadline names the peers first)
ALIGN = 256  # bytes: every buffer in a window starts on this boundary


# ----------------------------------------------------------------------------------------------
# where a stage's rows land in the peers' buffers (pure: the route plan and P)


@dataclass(frozen=True)
class StageWrites:
    """One stage seen from one rank, padded regions of P rows per key."""

    dispatch: dict[int, int]  # peer -> row of the peer's recv{s} where this rank's packet starts
    combine: dict[int, int]  # peer -> row of the peer's ysend{s} where the rows this rank sends back start
    intra: bool  # some pair of distinct ranks of this rank's node moves rows: the node barrier runs
    inter: bool  # some pair of ranks on different nodes moves rows: every rank joins the base mover's call


def _keys_before(entries: list, peer: int) -> int:
    """Keys ahead of `peer`'s packet in a packet list [(peer, keys)] (a layout's peer order)."""
    n = 0
    for q, keys in entries:
        if q == peer:
            return n
        n += len(keys)
    raise KeyError(peer)


def stage_writes(plan: RoutePlan, rank: int, s: int, P: int) -> StageWrites:
    """Where `rank`'s rows go in stage s: a receiver lays its packets out by source (comm/layout.py
    plan_stage: recvs in peer order, P rows per key), a sender its send rows by destination, so the
    offset of this rank's packet in a peer's buffer is P x the keys ahead of it there."""
    topo = plan.topology
    dispatch = {q: P * _keys_before(plan.recvs[s][q], rank) for q, _ks in plan.sends[s].get(rank, []) if q != rank}
    combine = {p: P * _keys_before(plan.sends[s][p], rank) for p, _ks in plan.recvs[s].get(rank, []) if p != rank}
    me, intra, inter = topo.node_of(rank), False, False
    if P:
        for p, dests in plan.sends[s].items():
            for q, _keys in dests:
                if q == p:
                    continue
                if topo.node_of(p) != topo.node_of(q):
                    inter = True
                elif topo.node_of(p) == me:
                    intra = True
    return StageWrites(dispatch, combine, intra, inter)


def split_segments(topo, rank: int, segs) -> tuple[list, list, list]:
    """(to itself, to other ranks of its node, to other nodes) of a list of segments (peer, offset, rows);
    empty segments dropped."""
    me = topo.node_of(rank)
    own = [g for g in segs if g[2] and g[0] == rank]
    intra = [g for g in segs if g[2] and g[0] != rank and topo.node_of(g[0]) == me]
    inter = [g for g in segs if g[2] and topo.node_of(g[0]) != me]
    return own, intra, inter


def carve(buffers: list[tuple[str, int, int]]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Byte layout of a window: [(name, rows, bytes per row)] -> (total bytes, {name: (offset, bytes)})."""
    out, off = {}, 0
    for name, rows, row_bytes in buffers:
        size = rows * row_bytes
        out[name] = (off, size)
        off += -(-size // ALIGN) * ALIGN
    return max(off, ALIGN), out


# ----------------------------------------------------------------------------------------------
# providers: how a window is made (torch symmetric memory; tests install a CPU stand-in)


class TorchWindow:
    """One rank's view of a rendezvoused symmetric-memory allocation: its own bytes, every peer's, a barrier."""

    def __init__(self, local: torch.Tensor, handle):
        self.local, self.handle, self.nbytes = local, handle, local.numel()
        # symm_mem.empty may hand out a slice of a pooled block: address the same slice on the peers
        self._offset = local.data_ptr() - handle.buffer_ptrs[handle.rank]
        self._peers: dict[int, torch.Tensor] = {}

    def peer(self, group_rank: int) -> torch.Tensor:
        """The window of the group's rank `group_rank`, as a flat uint8 tensor this device can write."""
        view = self._peers.get(group_rank)
        if view is None:
            view = self._peers[group_rank] = self.handle.get_buffer(group_rank, (self.nbytes,), torch.uint8,
                                                                    self._offset)
        return view

    def barrier(self, timeout_ms: int) -> None:
        """Enqueue a barrier of the whole group on the current stream (returns at once, nothing to wait for)."""
        self.handle.barrier(channel=0, timeout_ms=timeout_ms)
        return None


class TorchSymmMem:
    """``torch.distributed._symmetric_memory`` (CUDA builds of torch >= 2.5)."""

    name = "torch symmetric memory"

    def unavailable(self, ctx) -> str | None:
        """Why this rank cannot use it (None: it can try; the rendezvous may still fail)."""
        if ctx.backend != "nccl" or ctx.device.type != "cuda":
            return f"the data backend is {ctx.backend} on {ctx.device.type}"
        try:
            import torch.distributed._symmetric_memory as symm_mem
            from torch._C._distributed_c10d import _SymmetricMemory  # noqa: F401
        except ImportError as e:
            return f"this torch build ({torch.__version__}) has no symmetric memory ({e})"
        if not (hasattr(symm_mem, "empty") and hasattr(symm_mem, "rendezvous")):
            return f"torch {torch.__version__} has no symm_mem.empty/rendezvous"
        return None

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm_mem

        return symm_mem.empty(nbytes, dtype=torch.uint8, device=device)

    def rendezvous(self, local: torch.Tensor, group) -> TorchWindow:
        """Collective over `group` (ranks of one node)."""
        import torch.distributed._symmetric_memory as symm_mem

        name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)  # needed before torch 2.9, a no-op since
        enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
        if enable is not None and not (enabled is not None and enabled(name)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(name)
        return TorchWindow(local, symm_mem.rendezvous(local, name))


_PROVIDER = [TorchSymmMem()]


def set_provider(provider) -> None:
    """Replace how windows are made (tests: a CPU stand-in sharing memory between processes)."""
    _PROVIDER[0] = provider if provider is not None else TorchSymmMem()


def provider():
    return _PROVIDER[0]


# ----------------------------------------------------------------------------------------------
# the mover


class SymmMemMover:
    """Moves a stage's intra-node rows through symmetric memory and the rest through `inter` (the backend's
    mover: NCCL, or gloo in the CPU tests)."""

    name = "symm_mem"

    def __init__(self, inter, topo, watch: PeerWatch, world: int, rank: int, window_bytes: int):
        self.inter, self.topo, self.watch, self.world, self.rank = inter, topo, watch, world, rank
        self.window_bytes = window_bytes  # the same on every rank (calibration sizes must agree)
        self.node_ranks = list(topo.ranks_on_node(topo.node_of(rank)))  # the node group's rank order
        self.node_peers = [q for q in self.node_ranks if q != rank]
        self.barrier_ms = int((watch.timeout_s + DEVICE_MARGIN_S) * 1000)
        self._writes: dict[tuple, StageWrites] = {}
        self._plans: dict[tuple, tuple] = {}
        self._deferred: dict[int, list] = {}  # channel -> host-side barrier works not waited for yet

    def writes(self, plan: RoutePlan, s: int, P: int) -> StageWrites:
        key = (plan.name, s, P)
        w = self._writes.get(key)
        if w is None:
            w = self._writes[key] = stage_writes(plan, self.rank, s, P)
        return w

    def move(self, ch, send, send_segs, recv, recv_segs, layer, what: str, start: float, stage=None) -> list:
        """`stage` = (route plan, stage index, P, backward): which offsets the peers' layouts give this
        rank's rows. Returns the base mover's pending works (gloo sends), if any."""
        plan, s, P, backward = stage
        w = self.writes(plan, s, P)
        key = (plan.name, s, P, backward, recv.data_ptr())  # padded: the segments follow from these
        ops = self._plans.get(key)
        if ops is None:
            ops = self._plans[key] = self._ops(ch, w, backward, send_segs, recv, recv_segs)
        inter_send, inter_recv, own, copies, receives = ops
        works = []
        if w.inter:  # every rank joins, even with nothing of its own to send: one order of calls per channel
            works = self.inter.move_subset(ch, send, inter_send, recv, inter_recv, layer, what, start)
        for off, r_off, n in own:
            recv[r_off:r_off + n].copy_(send[off:off + n])
        for off, n, dst in copies:
            dst.copy_(send[off:off + n])
        if w.intra:
            self._barrier(ch, layer, what, start, receives)
        return works

    def _ops(self, ch, w: StageWrites, backward: bool, send_segs, recv, recv_segs):
        """The stage's work, derived once per (layout, buffer): inter-node segments, the copy to itself,
        the peer copies with their destination views."""
        own_s, intra_s, inter_s = split_segments(self.topo, self.rank, send_segs)
        own_r, intra_r, inter_r = split_segments(self.topo, self.rank, recv_segs)
        own = [(off, own_r[0][1], n) for _q, off, n in own_s]
        copies = []
        if intra_s:
            win = ch.window
            base = recv.data_ptr() - win.local.data_ptr()  # this buffer's offset in every rank's window
            if not 0 <= base < win.nbytes:
                raise RuntimeError(f"rank {self.rank}: a receive buffer of channel {ch.index} is not in its "
                                   "symmetric-memory window (buffer names out of step with the exchange's)")
            rb = recv.shape[1]
            rows = w.combine if backward else w.dispatch
            for q, off, n in intra_s:
                lo = base + rows[q] * rb
                peer = win.peer(self.node_ranks.index(q))
                copies.append((off, n, peer[lo:lo + n * rb].view(n, rb)))
        return inter_s, inter_r, own, copies, bool(intra_r)

    def _barrier(self, ch, layer, what: str, start: float, receives: bool) -> None:
        work = ch.window.barrier(self.barrier_ms)
        if work is None:  # enqueued on the channel's stream: tracked like an NCCL call
            if ch.stream is not None:
                self.watch.track(layer, what, start, self.node_peers)
        elif receives:
            self._wait(work, layer, what, start)
        else:
            self._deferred.setdefault(ch.index, []).append((work, layer, what))

    def settle(self, ch, layer, start: float) -> None:
        """Wait for the host-side barriers this rank left in flight on channel `ch` (none on GPUs)."""
        for work, at, what in self._deferred.pop(ch.index, []):
            self._wait(work, at, what, start)

    def _wait(self, work, layer, what: str, start: float) -> None:
        try:
            ok = work.wait(timeout=timedelta(seconds=self.watch.left(start)))
        except RuntimeError as e:
            raise self.watch.silent_peers(layer, what, self.node_peers, e) from None
        if ok is False:
            raise self.watch.silent_peers(layer, what, self.node_peers, None)

    def clear(self) -> None:
        self._deferred.clear()

    def link(self, ch) -> "SymmLink | None":
        """What calibrate() times for intra-node links: this mover's own copy + barrier."""
        return SymmLink(self, ch)


class SymmLink:
    """Ping-pong over the mover's own path (peer copy + node barrier), for the adaptive cost model."""

    def __init__(self, mover: SymmMemMover, ch):
        self.mover, self.ch = mover, ch
        self.max_bytes = mover.window_bytes

    def pingpong(self, ctx, a: int, b: int, nbytes: int, iters: int) -> float:
        """Median one-way time of `nbytes` from a to b (collective over their node; 0 on the others)."""
        m, topo = self.mover, ctx.topology
        if topo.node_of(ctx.rank) != topo.node_of(a):
            return 0.0
        win, dev = self.ch.window, ctx.device
        src = torch.ones(max(nbytes, 1), dtype=torch.uint8, device=dev)
        times = []
        for it in range(iters + 2):
            _sync(dev)
            t0 = time.perf_counter()
            for writer, reader in ((a, b), (b, a)):
                if ctx.rank == writer:
                    win.peer(m.node_ranks.index(reader))[:nbytes].copy_(src[:nbytes])
                _wait_now(win.barrier(m.barrier_ms))
            _sync(dev)
            if it >= 2:
                times.append((time.perf_counter() - t0) / 2)
        # the receive buffers must start zeroed (their scratch rows are read as zero partials): clear, then
        # a barrier so no peer writes before this rank has cleared
        win.local.zero_()
        _wait_now(win.barrier(m.barrier_ms))
        _sync(dev)
        return statistics.median(times) if ctx.rank in (a, b) else 0.0


def _wait_now(work) -> None:
    if work is not None:
        work.wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# choice and set-up


_LOGGED: set = set()


def _log_once(ctx, msg: str) -> None:
    if ctx.rank == 0 and msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info("%s", msg)


def static_reason(ctx, intra_node: str, metadata: str, prov=None) -> str | None:
    """Why symmetric memory is not used, decided without communication (the same on every rank), or None."""
    if intra_node not in INTRA_NODE:
        raise ValueError(f"comm.intra_node: {intra_node!r} is not one of {', '.join(INTRA_NODE)}")
    if intra_node == "nccl":
        return "comm.intra_node: nccl"
    if metadata != "padded":
        return f"comm.metadata: {metadata} (row counts are known only at run time; symmetric memory needs padded regions)"
    topo = ctx.topology
    if not any(len(topo.ranks_on_node(n)) >= 2 for n in range(topo.num_nodes)):
        return "no node has 2 or more ranks (no intra-node links)"
    return (prov or provider()).unavailable(ctx)


def _all_ok(ctx, ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.control_group)
    return bool(t.item())


def attach(ctx, base, intra_node: str, metadata: str, channels: list, buffers: list[tuple[str, int, int]],
           watch: PeerWatch):
    """The mover of an exchange (collective over all ranks; every rank gets the same kind).

    `base` moves every link unless symmetric memory is chosen and set up on every rank; then each
    channel gets a window holding `buffers` ([(name, rows, bytes per row)], the channel's receive
    buffers, sized for the largest rank) and the returned mover sends intra-node rows through it and
    the rest through `base` (its move_subset)."""
    from comm.channel import add_node_groups

    reason = static_reason(ctx, intra_node, metadata)
    if reason is not None:
        _log_once(ctx, f"comm.intra_node: {intra_node} -> {base.name} for every link ({reason})")
        return base
    prov = provider()
    nbytes, regions = carve(buffers)
    add_node_groups(ctx, channels)  # collective: every rank makes every node's group
    mine = [ch for ch in channels if ch.node_group is not None]  # all or none: a node has >= 2 ranks or not
    local, err = [], None
    try:  # allocate first and agree, so a rank failing here never leaves its peers waiting in a rendezvous
        local = [prov.allocate(nbytes, ctx.device) for _ch in mine]
    except Exception as e:  # noqa: BLE001 -- fall back, never fail
        err = e
    windows = []
    if _all_ok(ctx, err is None):
        try:
            windows = [prov.rendezvous(t, ch.node_group) for t, ch in zip(local, mine)]
            for win in windows:
                win.local.zero_()
            _sync(ctx.device)
        except Exception as e:  # noqa: BLE001
            err = e
    if not _all_ok(ctx, err is None):
        if err is not None:
            log.warning("rank %d: symmetric memory set-up failed: %s", ctx.rank,
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        _log_once(ctx, f"comm.intra_node: {intra_node} -> {base.name} for every link (symmetric memory set-up "
                       "failed on some rank; see its warning)")
        return base
    for ch, win in zip(mine, windows):
        ch.use_window(win, regions)
    _log_once(ctx, f"comm.intra_node: {intra_node} -> symm_mem ({prov.name}) for intra-node links, "
                   f"{base.name} across nodes; {len(channels)} channel window(s) of "
                   f"{nbytes / 2**20:.1f} MiB per rank")
    return SymmMemMover(base, ctx.topology, watch, ctx.world_size, ctx.rank, nbytes)
