"""Capturing every CUDA graph the engine can use before it takes its first request (runtime.capture_at_start).

Graphs are otherwise made lazily (afsplit/cuda_graphs.py, afsplit/piecewise_prefill.py): the first step of
a shape runs eagerly, the second captures. So without a warm start the first requests of a server pay, at
every batch size and prompt length they meet for the first time, Triton's compiles of the kernels' tile
configs for that token count (0.4-1.2 s each in the 2026-12-04 engine benchmark) and the capture itself:
a TTFT spike that users see and benchmarks mistake for the engine's speed. vLLM and SGLang capture their
decode graphs at start for the same reason.

The warm start drives the engine's own step loop with synthetic requests, twice per shape (eager, then
capture), so that what is captured is exactly what a real step would replay:

- decode buckets: for each bucket b, n = b x micro-batches one-token prompts (capped at max_num_seqs),
  3 new tokens each: their first step is already decode-shaped (one token per sequence), the second
  captures, the third replays;
- prefill token buckets (piecewise graphs, single micro-batch GQA models): for each token bucket Tb,
  prompts whose lengths add up to Tb (at most max_num_batched_tokens; each shorter than max_model_len),
  1 new token each, run twice;
  a bucket whose prompts need more KV blocks or sequences than the engine has is left to be captured
  lazily (listed in the report).

Afterwards nothing of it is left: every request finished, every KV block free, request ids, the step
counter and expert statistics as a fresh engine's, so seeds derived from request ids do not move.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from afsplit.cuda_graphs import graph_buckets
from afsplit.piecewise_prefill import token_buckets
from afsplit.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class WarmStart:
    """What the warm start ran: decode bucket sizes (per micro-batch), prefill token buckets, those it left."""

    decode_buckets: list[int] = field(default_factory=list)
    prefill_buckets: list[int] = field(default_factory=list)
    skipped_prefill: list[int] = field(default_factory=list)  # need more KV blocks or sequences than there are
    seconds: float = 0.0


def _prompt(n: int, salt: int, vocab: int) -> dict:
    """n token ids spread over the vocabulary (not one repeated token: routing then spreads over experts too)."""
    return {"prompt_token_ids": [(salt * 7919 + i * 104729) % vocab for i in range(n)]}


def _prefill_lengths(tb: int, max_model_len: int) -> list[int]:
    """Prompt lengths adding up to tb, each < max_model_len (a prompt needs room for its one new token)."""
    longest = max_model_len - 1
    lengths = [longest] * (tb // longest)
    if tb % longest:
        lengths.append(tb % longest)
    return lengths


def _run(engine, prompts: list[dict], max_tokens: int) -> None:
    from afsplit.engine import run_to_completion

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for out in run_to_completion(engine, engine, prompts, params, use_tqdm=False):
        if out.error:  # a synthetic request the engine refuses is a bug here, not the user's input
            raise RuntimeError(f"warm start: {out.error}")


def capture_every_bucket(engine) -> WarmStart:
    """Run every decode bucket and prefill token bucket of `engine` twice (module docstring); returns the report.

    Call it on an idle engine (no requests queued or running)."""
    if engine.scheduler.has_work():
        raise RuntimeError("warm start: the engine already has requests")
    start = time.perf_counter()
    rt, report = engine.config.runtime, WarmStart()
    runner, vocab, free = engine.runner, engine.spec.vocab_size, engine.kv.num_free_blocks
    salt = 0
    if runner.static is not None:
        seen = set()
        for b in graph_buckets(rt.max_num_seqs):
            n = min(b * runner.micro_batches, rt.max_num_seqs, free)
            if n in seen:
                continue
            seen.add(n)
            salt += 1
            _run(engine, [_prompt(1, salt + i, vocab) for i in range(n)], max_tokens=3)
            report.decode_buckets.append(b)
    if runner.piecewise is not None:
        for tb in token_buckets(rt.max_num_batched_tokens):
            # the last bucket may lie past the step budget: a full step is the largest that lands in it
            lengths = _prefill_lengths(min(tb, rt.max_num_batched_tokens), engine.max_model_len)
            blocks = sum(engine.kv.blocks_for(n + 1) for n in lengths)
            if len(lengths) > rt.max_num_seqs or blocks > free:
                report.skipped_prefill.append(tb)
                continue
            for _ in range(2):  # eager (compiles), then captured
                salt += 1
                _run(engine, [_prompt(n, salt + i, vocab) for i, n in enumerate(lengths)], max_tokens=1)
            report.prefill_buckets.append(tb)
    engine.reset_counters()
    report.seconds = time.perf_counter() - start
    log.info("warm start: decode graphs for batch buckets %s, prefill graphs for %d token buckets (%s) in %.1f s%s",
             report.decode_buckets or "none", len(report.prefill_buckets),
             f"{report.prefill_buckets[0]}..{report.prefill_buckets[-1]}" if report.prefill_buckets else "none",
             report.seconds,
             f"; left to capture when first met (too few KV blocks or sequences): {report.skipped_prefill}"
             if report.skipped_prefill else "")
    return report
