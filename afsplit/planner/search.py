"""Search deployment layouts for a TPOT bound: instance size x layout x micro-batches x transport x batch.

A cluster of N GPUs (G per node) runs N / S identical instances of S GPUs: S = a divisor of G
(part of one node) or k whole nodes (k divides N / G). Per instance: colocated, AF per node
(every node a attention + G - a expert ranks), AF across nodes (na attention nodes + ne expert
nodes), and the single-GPU engine when S = 1. For each layout, m in 1..max_m and each transport,
the largest batch per attention rank whose predicted TPOT (decode step) and memory fit is taken
(both grow with the batch, so it is a binary search over the bucket sizes). Every rejection
keeps its reason with the arithmetic.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from afsplit.errors import ConfigError
from afsplit.planner import layouts as L
from afsplit.planner.exchange import TRANSPORTS
from afsplit.planner.fitting import flash_tile_pairs
from afsplit.planner.memory import kv_capacity_tokens, memory_problem, role_memory
from afsplit.planner.step_model import StepResult, bucket

BATCH_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
MAX_ACROSS_SPLITS = 12  # attention:expert node splits tried per multi-node instance size


@dataclass(frozen=True)
class Workload:
    input_len: int = 1024
    output_len: int = 256
    max_batched_tokens: int = 8192  # runtime.max_num_batched_tokens of the written config

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2

    @property
    def seq_tokens(self) -> int:
        return self.input_len + self.output_len


@dataclass
class Candidate:
    layout: L.Layout
    instances: int
    m: int
    transport: str
    batch: int  # sequences per attention rank
    result: StepResult
    memory: list = field(default_factory=list)  # RoleMemory per role (filled for the chosen candidates)
    kv_capacity_seqs: int = 0
    ttft_s: float | None = None
    spare_slots: int = 0  # replica slots per expert rank the plan gives the balancer
    gain: float | None = None  # tokens/s/GPU over the best colocated candidate

    @property
    def tpot_ms(self) -> float:
        return self.result.step_s * 1e3

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.result.tokens_per_s_per_gpu


@dataclass
class SearchResult:
    candidates: list[Candidate]  # best per (layout, m, transport), by tokens/s/GPU descending
    best_colocated: Candidate | None
    rejected: Counter = field(default_factory=Counter)  # reason kind -> count
    examples: dict = field(default_factory=dict)  # reason kind -> one message with the arithmetic
    evaluated: int = 0

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def check_cluster(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node actually used); one clear error when N and G do not make whole nodes."""
    if gpus < 1 or gpus_per_node < 1:
        raise ConfigError(f"--gpus {gpus} and --gpus-per-node {gpus_per_node} must be >= 1")
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node:
        raise ConfigError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}: "
                          f"{gpus} = {gpus // gpus_per_node} x {gpus_per_node} + {gpus % gpus_per_node}")
    return gpus // gpus_per_node, gpus_per_node


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _spread(values: list[int], most: int) -> list[int]:
    if len(values) <= most:
        return values
    idx = {round(i * (len(values) - 1) / (most - 1)) for i in range(most)}
    return [values[i] for i in sorted(idx)]


def instance_layouts(gpus: int, gpus_per_node: int) -> list[tuple[L.Layout, int]]:
    """Every (layout, instance count) the search tries (see the module docstring)."""
    nodes, G = check_cluster(gpus, gpus_per_node)
    out: list[tuple[L.Layout, int]] = []
    for d in _divisors(G):  # instances inside one node
        n_inst = gpus // d
        if d == 1:
            out.append((L.engine_layout(), n_inst))
        out.append((L.colocated(d, 1), n_inst))
        out += [(L.af_per_node(a, d - a, 1), n_inst) for a in range(1, d)]
    for k in _divisors(nodes):
        if k == 1:
            continue
        n_inst = nodes // k
        out.append((L.colocated(G, k), n_inst))
        out += [(L.af_per_node(a, G - a, k), n_inst) for a in range(1, G)]
        out += [(L.af_across_nodes(na, k - na, G), n_inst) for na in _spread(list(range(1, k)), MAX_ACROSS_SPLITS)]
    return out


class Planner:
    def __init__(self, step_model, gpus: int, gpus_per_node: int, workload: Workload, max_m: int = 4,
                 batches=BATCH_GRID, transports=TRANSPORTS, max_batch: int = 1024):
        self.sm, self.blocks, self.shape = step_model, step_model.blocks, step_model.shape
        self.gpus, self.gpus_per_node = gpus, gpus_per_node
        self.nodes, _ = check_cluster(gpus, gpus_per_node)
        self.wl = workload
        self.max_m = max_m
        self.batches = tuple(b for b in batches if b <= max_batch)
        self.transports = transports

    # -- constraints ---------------------------------------------------------------------------

    def layout_problem(self, layout: L.Layout) -> tuple[str, str] | None:
        """(kind, message) when the layout cannot serve the model at any batch."""
        s = self.shape
        if layout.kind == "af" and layout.num_expert_ranks > s.num_experts:
            n = layout.num_expert_ranks
            return "experts", (f"{layout.label()}: {n} expert ranks > {s.num_experts} experts: {n - s.num_experts} "
                               "ranks would hold no expert (each expert is placed once)")
        why = memory_problem(s, layout, 0, 0, 1, 1, self.blocks, self.sm.spare_slots(layout))
        return ("memory", f"{layout.label()}: {why}") if why else None

    def point_problem(self, layout, m: int, batch: int) -> tuple[str, str] | None:
        if m > batch:
            return "micro-batches", f"m={m} micro-batches > {batch} sequences per attention rank"
        if batch > self.wl.max_batched_tokens:
            return "token budget", (f"batch {batch} per attention rank > runtime.max_num_batched_tokens "
                                    f"{self.wl.max_batched_tokens}")
        why = memory_problem(self.shape, layout, batch, self.wl.seq_tokens, m, bucket(math.ceil(batch / m)),
                             self.blocks, self.sm.spare_slots(layout))
        return ("memory", f"{layout.label()} batch {batch}: {why}") if why else None

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, layout, instances: int, m: int, transport: str, batch: int) -> Candidate:
        res = self.sm.decode_step(layout, batch, m, self.wl.mean_context, transport)
        return Candidate(layout, instances, m, transport, batch, res)

    def add_memory(self, c: Candidate) -> Candidate:
        """Fill in memory per role and KV capacity (sequences of the workload per attention rank)."""
        rows, spare = bucket(math.ceil(c.batch / c.m)), self.sm.spare_slots(c.layout)
        c.memory = role_memory(self.shape, c.layout, c.batch, self.wl.seq_tokens, c.m, rows, self.blocks, spare)
        c.kv_capacity_seqs = (kv_capacity_tokens(self.shape, c.layout, c.m, rows, self.blocks, spare)
                              // max(1, self.wl.seq_tokens))
        c.spare_slots = spare
        return c

    def ttft(self, cand: Candidate) -> float:
        """Prefill of one prompt (chunked by the token budget, beside the batch's other decodes), no queueing."""
        wl, left, done, t = self.wl, self.wl.input_len, 0, 0.0
        decodes = max(0, cand.batch - 1)
        bm, bn = self.blocks.prefill_tiles
        decode_tiles = decodes * flash_tile_pairs(1, int(wl.mean_context), bm, bn)
        while left > 0:
            n = min(left, max(1, wl.max_batched_tokens - decodes))
            tiles = flash_tile_pairs(n, done, bm, bn) + decode_tiles
            t += self.sm.eager_step(cand.layout, n + decodes, tiles, decodes + 1, decodes + 1, cand.m, cand.transport)
            left, done = left - n, done + n
        return t

    def _transports(self, layout) -> tuple[str, ...]:
        return self.transports if layout.num_nodes > 1 and layout.kind != "engine" else ("direct",)

    def search(self, tpot_ms: float, ttft_ms: float | None = None) -> SearchResult:
        out = SearchResult([], None)

        def reject(kind: str, msg: str) -> None:
            out.rejected[kind] += 1
            out.examples.setdefault(kind, msg)

        for layout, inst in instance_layouts(self.gpus, self.gpus_per_node):
            why = self.layout_problem(layout)
            if why:
                reject(*why)
                continue
            for m in range(1, self.max_m + 1):
                for tr in self._transports(layout):
                    best = self._largest_batch(layout, inst, m, tr, tpot_ms, ttft_ms, reject, out)
                    if best is not None:
                        out.candidates.append(best)
        out.candidates.sort(key=lambda c: -c.tokens_per_s_per_gpu)
        coloc = [c for c in out.candidates if c.layout.kind in ("colocated", "engine")]
        out.best_colocated = coloc[0] if coloc else None
        if out.best_colocated:
            for c in out.candidates:
                c.gain = c.tokens_per_s_per_gpu / out.best_colocated.tokens_per_s_per_gpu
        return out

    def _largest_batch(self, layout, inst, m, tr, tpot_ms, ttft_ms, reject, out) -> Candidate | None:
        """Binary search for the largest batch that fits memory, TPOT and TTFT (each grows with the batch)."""
        lo, hi, best, last_why = 0, len(self.batches) - 1, None, None
        while lo <= hi:
            mid = (lo + hi) // 2
            batch = self.batches[mid]
            why = self.point_problem(layout, m, batch)
            cand = None
            if why is None:
                cand = self.evaluate(layout, inst, m, tr, batch)
                out.evaluated += 1
                if cand.tpot_ms > tpot_ms:
                    why = ("TPOT", f"{layout.label()} m={m} {tr} batch {batch}: TPOT {cand.tpot_ms:.1f} ms > "
                                   f"{tpot_ms:g} ms ({cand.result.bottleneck}-bound)")
                elif ttft_ms is not None:
                    cand.ttft_s = self.ttft(cand)
                    if cand.ttft_s * 1e3 > ttft_ms:
                        why = ("TTFT", f"{layout.label()} m={m} batch {batch}: TTFT {cand.ttft_s * 1e3:.0f} ms > "
                                       f"{ttft_ms:g} ms")
            if why is None:
                best, lo = cand, mid + 1
            else:
                last_why, hi = why, mid - 1
        if best is None and last_why is not None:
            reject(*last_why)
        return self.add_memory(best) if best is not None else None

    def all_points(self) -> list[Candidate]:
        """Every memory-feasible (layout, m, transport, batch): the Pareto plots' raw points."""
        pts = []
        for layout, inst in instance_layouts(self.gpus, self.gpus_per_node):
            if self.layout_problem(layout):
                continue
            for m in range(1, self.max_m + 1):
                for tr in self._transports(layout):
                    for batch in self.batches:
                        if self.point_problem(layout, m, batch) is None:
                            pts.append(self.evaluate(layout, inst, m, tr, batch))
        return pts


def pareto(points, x=lambda c: c.tpot_ms, y=lambda c: c.tokens_per_s_per_gpu) -> list:
    """Non-dominated points (lower x, higher y), sorted by x."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (x(p), -y(p))):
        if y(p) > best:
            front.append(p)
            best = y(p)
    return front
