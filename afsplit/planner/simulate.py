"""Replay a recorded run through afsplit's own scheduler and predict every step's time.

The run's requests (all submitted at once, fixed input and output lengths, ignore_eos) go into the
real :class:`afsplit.scheduler.Scheduler` with the run's KV blocks, sequence limit and token
budget. Each scheduled step is then priced by the step model the way the engine runs it:

* a decode-only step whose micro-batches fit a CUDA-graph bucket goes through the lazy graph
  cache (:class:`GraphCacheModel`, afsplit.cuda_graphs.GraphCache's rule per (m, bucket)): the
  first step of a bucket runs the static path eagerly, the second captures (every kernel launched
  once) and replays, later ones replay;
* anything else (prefill chunks, mixed steps, graphs off) is an eager step whose attention is the
  prefill kernel's padded tiles over every sequence of the step, decodes included (with the profile's
  mixed points: the prompt pieces' tiles plus what each decode row measured to add, given the longest
  piece, BlockTimes.mixed_decode_row; since 2026-12-04 the engine runs those rows on the paged decode
  kernel, which profiles made from then on measure).

What ran before the measured run on the same engine sets the cache: the single-process engine's warm
start (runtime.capture_at_start, afsplit/warm_start.py: every decode bucket captured when the engine is
built), ``--warmup`` (the same prompts for 3 tokens, cuda_graphs.warm_up_requests) and, for engine runs
made one after another in one process (engine_runs.py), the earlier runs. Only the measured run's steps are timed; its wall time
is their sum, as the runs measure it (from the first step to the last), plus the work outside the steps
per prompt token the profile measured in its own runs (StepModel.admit_time). Several attention ranks
get the requests round-robin (the coordinator spreads them by free KV capacity, which is that for
equal requests); the ranks run in lockstep, so the fullest rank's schedule sets the pace.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from afsplit.block_manager import KVCacheManager
from afsplit.cuda_graphs import graph_buckets, step_tokens_hint
from afsplit.planner.fitting import flash_tile_pairs
from afsplit.sampling_params import SamplingParams
from afsplit.scheduler import Scheduler
from afsplit.sequence import Sequence

WARMUP_TOKENS = 3  # afsplit.cuda_graphs.warm_up_requests


@dataclass
class RunPrediction:
    steps: int
    wall_s: float
    decode_step_ms_median: float | None
    generated_tokens: int
    tokens_per_s_per_gpu: float
    kinds: dict = field(default_factory=dict)  # step kind -> (steps, seconds): replay, capture, eager_decode, chunk
    captured: list = field(default_factory=list)  # (m, bucket) graphs captured during the measured run, in order


@dataclass
class GraphCacheModel:
    """afsplit.cuda_graphs.GraphCache per (micro-batches, bucket) key: eager once, captured next, replayed after."""

    warmed: set = field(default_factory=set)
    graphs: list = field(default_factory=list)  # captured keys, in order

    def visit(self, key: tuple[int, int]) -> str:
        if key in self.graphs:
            return "replay"
        if key in self.warmed:
            self.graphs.append(key)
            return "capture"
        self.warmed.add(key)
        return "eager_decode"


def kv_blocks(config, shape) -> int:
    """runtime.num_kv_blocks, or what kv_cache_memory_gb holds (the engine's own rule)."""
    rt = config.runtime
    if rt.num_kv_blocks:
        return rt.num_kv_blocks
    per_block = shape.kv_bytes_per_token * rt.block_size
    return max(1, int(rt.kv_cache_memory_gb * 2**30) // per_block)


def predict_run(step_model, layout, config, num_requests: int, input_len: int, output_len: int, m: int,
                graphs: bool, warmup: bool = True, earlier=(), warm_start: bool = False) -> RunPrediction:
    """The measured run's prediction; `earlier`: (num_requests, input_len, output_len) of the runs made before
    it on the same engine (each with its warm-up when `warmup`), in order; `warm_start`: the engine captured
    every decode bucket when it was built."""
    cache = GraphCacheModel()
    if warm_start and graphs:
        cache.graphs = [(m, b) for b in graph_buckets(config.runtime.max_num_seqs)]
    for n, il, ol in earlier:
        if warmup:
            _run(step_model, layout, config, n, il, min(ol, WARMUP_TOKENS), m, graphs, cache, timed=False)
        _run(step_model, layout, config, n, il, ol, m, graphs, cache, timed=False)
    if warmup:
        _run(step_model, layout, config, num_requests, input_len, min(output_len, WARMUP_TOKENS), m, graphs, cache,
             timed=False)
    before = len(cache.graphs)
    pred = _run(step_model, layout, config, num_requests, input_len, output_len, m, graphs, cache, timed=True)
    pred.captured = cache.graphs[before:]
    return pred


def _run(sm, layout, config, num_requests: int, input_len: int, output_len: int, m: int, graphs: bool,
         cache: GraphCacheModel, timed: bool) -> RunPrediction:
    rt = config.runtime
    n_att = layout.num_attention_ranks
    mine = math.ceil(num_requests / n_att)
    kv = KVCacheManager(kv_blocks(config, sm.shape), rt.block_size)
    sched = Scheduler(kv, rt.max_num_seqs, rt.max_num_batched_tokens, rt.chunked_prefill)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(mine):
        sched.add(Sequence(i, [0] * input_len, params, seed=0))
    transport = config.comm.transport if config.comm.transport != "adaptive" else "direct"
    wall, decode_steps, steps, generated, kinds = 0.0, [], 0, 0, {}
    while sched.has_work():
        batch = sched.schedule()
        if not batch.seqs:
            raise RuntimeError(f"simulated run stalled: {len(sched.waiting)} waiting requests do not fit "
                               f"{kv.allocator.num_blocks} KV blocks")
        steps += 1
        kind, t = _step_time(sm, layout, batch, m, rt, graphs, transport, cache, timed)
        if timed:
            wall += t
            n, sec = kinds.get(kind, (0, 0.0))
            kinds[kind] = (n + 1, sec + t)
            if kind != "chunk":
                decode_steps.append(t)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:  # sampled a token
                seq.output_token_ids.append(0)
                generated += 1
                if len(seq.output_token_ids) >= output_len:
                    sched.finish(seq, "length")
    if timed:  # the run's work outside its steps (copying requests to their ranks, outputs): in its wall time
        t = sm.admit_time(layout, num_requests, input_len)
        wall += t
        kinds["admit"] = (1, t)
    total = generated * num_requests / mine if mine else 0
    med = 1e3 * statistics.median(decode_steps) if decode_steps else None
    return RunPrediction(steps, wall, med, int(total), total / wall / layout.gpus if wall else 0.0, kinds)


def _step_time(sm, layout, batch, m: int, rt, graphs: bool, transport: str, cache: GraphCacheModel,
               timed: bool) -> tuple[str, float]:
    """(kind, seconds) of one scheduled step; the graph cache is updated either way."""
    ns = batch.num_tokens
    seqs = len(ns)
    if all(n == 1 for n in ns):
        ctx = sum(s.num_computed_tokens + 1 for s in batch.seqs) / seqs
        per_mb = math.ceil(seqs / m)
        bucket, graphable = step_tokens_hint(per_mb, True, rt.max_num_seqs, rt.max_num_batched_tokens)
        kind = cache.visit((m, bucket)) if graphs and graphable else "eager_decode"
        if not timed:
            return kind, 0.0
        if kind == "replay":
            return kind, sm.decode_step(layout, seqs, m, ctx, transport).step_s
        if kind == "capture":
            return kind, sm.capture_step(layout, seqs, m, ctx, transport)
        rows = bucket if graphs and graphable else None  # the static path pads to the bucket
        return kind, sm.eager_step(layout, seqs, 0.0, seqs, seqs, m, transport, decode_ctx=ctx, rows=rows)
    if not timed:
        return "chunk", 0.0
    blocks = sm.blocks
    bm, bn = blocks.prefill_tiles
    sampled = sum(1 for s, n in zip(batch.seqs, ns) if s.num_computed_tokens + n == s.num_tokens)
    if not blocks.has_mixed:  # every row on the prefill kernel's padded tiles
        tiles = sum(flash_tile_pairs(n, s.num_computed_tokens, bm, bn) for s, n in zip(batch.seqs, ns))
        return "chunk", sm.eager_step(layout, sum(ns), tiles, seqs, sampled, m, transport)
    # single-token rows (decodes riding along) at the cost the profile's mixed points measured
    longest = max(n for n in ns if n > 1)
    tiles = sum(flash_tile_pairs(n, s.num_computed_tokens, bm, bn) for s, n in zip(batch.seqs, ns) if n > 1)
    extra = sum(blocks.mixed_decode_row(longest, s.num_computed_tokens) for s, n in zip(batch.seqs, ns) if n == 1)
    return "chunk", sm.eager_step(layout, sum(ns), tiles, seqs, sampled, m, transport, attention_extra=extra)
