"""Replay a recorded run through afsplit's own scheduler and predict every step's time.

The run's requests (all submitted at once, fixed input and output lengths, ignore_eos) go into the
real :class:`afsplit.scheduler.Scheduler` with the run's KV blocks, sequence limit and token
budget. Each scheduled step is then priced by the step model: a decode-only step whose
micro-batches fit a CUDA-graph bucket as a graph replay, anything else (prefill chunks, mixed
steps, graphs off) as an eager step. Several attention ranks get the requests round-robin (the
coordinator spreads them by free KV capacity, which is that for equal requests); the ranks run in
lockstep, so the fullest rank's schedule sets the pace.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from afsplit.block_manager import KVCacheManager
from afsplit.cuda_graphs import step_tokens_hint
from afsplit.sampling_params import SamplingParams
from afsplit.scheduler import Scheduler
from afsplit.sequence import Sequence


@dataclass
class RunPrediction:
    steps: int
    wall_s: float
    decode_step_ms_median: float | None
    generated_tokens: int
    tokens_per_s_per_gpu: float


def kv_blocks(config, shape) -> int:
    """runtime.num_kv_blocks, or what kv_cache_memory_gb holds (the engine's own rule)."""
    rt = config.runtime
    if rt.num_kv_blocks:
        return rt.num_kv_blocks
    per_block = shape.kv_bytes_per_token * rt.block_size
    return max(1, int(rt.kv_cache_memory_gb * 2**30) // per_block)


def predict_run(step_model, layout, config, num_requests: int, input_len: int, output_len: int, m: int,
                graphs: bool) -> RunPrediction:
    rt = config.runtime
    n_att = layout.num_attention_ranks
    mine = math.ceil(num_requests / n_att)
    kv = KVCacheManager(kv_blocks(config, step_model.shape), rt.block_size)
    sched = Scheduler(kv, rt.max_num_seqs, rt.max_num_batched_tokens, rt.chunked_prefill)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(mine):
        sched.add(Sequence(i, [0] * input_len, params, seed=0))
    transport = config.comm.transport if config.comm.transport != "adaptive" else "direct"
    wall, decode_steps, steps, generated = 0.0, [], 0, 0
    while sched.has_work():
        batch = sched.schedule()
        if not batch.seqs:
            raise RuntimeError(f"simulated run stalled: {len(sched.waiting)} waiting requests do not fit "
                               f"{kv.allocator.num_blocks} KV blocks")
        steps += 1
        t, is_decode = _step_time(step_model, layout, batch, m, rt, graphs, transport)
        wall += t
        if is_decode:
            decode_steps.append(t)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:  # sampled a token
                seq.output_token_ids.append(0)
                generated += 1
                if len(seq.output_token_ids) >= output_len:
                    sched.finish(seq, "length")
    total = generated * num_requests / mine if mine else 0
    med = 1e3 * statistics.median(decode_steps) if decode_steps else None
    return RunPrediction(steps, wall, med, int(total), total / wall / layout.gpus if wall else 0.0)


def _step_time(sm, layout, batch, m: int, rt, graphs: bool, transport: str) -> tuple[float, bool]:
    ns = batch.num_tokens
    decode = all(n == 1 for n in ns)
    seqs = len(ns)
    if decode:
        ctx = sum(s.num_computed_tokens + 1 for s in batch.seqs) / seqs
        per_mb = math.ceil(seqs / m)
        _, graphable = step_tokens_hint(per_mb, True, rt.max_num_seqs, rt.max_num_batched_tokens)
        if graphs and graphable:
            return sm.decode_step(layout, seqs, m, ctx, transport).step_s, True
        return sm.eager_step(layout, seqs, 0.0, 0.0, seqs, seqs, m, transport, decode_ctx=ctx), True
    s2 = sum(n * (s.num_computed_tokens + (n + 1) / 2) for s, n in zip(batch.seqs, ns))
    kv_tokens = sum(s.num_computed_tokens + n for s, n in zip(batch.seqs, ns))
    sampled = sum(1 for s, n in zip(batch.seqs, ns) if s.num_computed_tokens + n == s.num_tokens)
    return sm.eager_step(layout, sum(ns), s2, kv_tokens, seqs, sampled, m, transport), False
