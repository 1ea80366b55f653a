"""CUDA graphs for decode steps: batch buckets, the shared step-shape rule, and a lazy graph cache.

A decode step launches hundreds of small kernels per layer; from Python each launch costs tens of
microseconds of host time, which for a 48-layer MoE is far more than the GPU work (see
docs/benchmarks/runtime-*.md). So decode steps whose micro-batches fit a *bucket* (1, 2, 4, 8,
then multiples of 8, as in vLLM) run as one CUDA graph replay per rank:

- every micro-batch is padded to the bucket; padding rows carry expert id -1, so the communicator
  sends them nowhere and expert kernels skip them (``valid_rows`` in the attention metadata);
- the token-count vote that padded communication already does once per step (``agree_step``) also
  says whether every attention rank is decoding; all ranks then derive the same region size
  P = bucket from it (:func:`step_tokens_hint`), graphs or not, so a rank that runs eagerly still
  matches one that replays;
- graphs are made lazily (:class:`GraphCache`): the first step of a (bucket, micro-batches) shape runs
  the static code path eagerly (its warm-up: Triton compiles, NCCL connects, every rank exchanges
  real data), the second captures (no communication happens during capture), later ones replay.
  Every rank sees the same votes, so all capture at the same step; captured NCCL collectives then
  pair with the peers' replays or eager calls, which issue the same sequence.

On CPU there is nothing to capture; ``GraphCache(capture=False)`` runs the same static path eagerly,
which is how the CPU tests check padding and masking against the reference engine.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

STATIC_ON_CPU_ENV = "AFSPLIT_STATIC_DECODE"  # "1": use the graph code path (uncaptured) on CPU too (tests)


def padded_sizes(limit: int, first: int, step: int) -> list[int]:
    """Sizes to pad to: `first`, doubling while below `step`, then every `step`, the last >= limit."""
    out, n = [], first
    while True:
        out.append(n)
        if n >= limit:
            return out
        n = n * 2 if n < step else n + step


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes graphs are made for: 1, 2, 4, 8, 16, 24, ... up to the first >= max_batch."""
    return padded_sizes(max_batch, 1, 8)


def bucket_for(n: int, max_batch: int) -> int | None:
    """The smallest bucket >= n, or None when n is beyond max_batch."""
    if n > max_batch:
        return None
    return next(b for b in graph_buckets(max_batch) if b >= n)


def step_tokens_hint(max_tokens: int, all_decode: bool, max_batch: int, max_tokens_per_rank: int) -> tuple[int, bool]:
    """(P, graphable) for one step, the same on every rank: P = the padded region size (rows per
    attention/expert pair and micro-batch); graphable when every attention rank only decodes and the
    largest micro-batch fits a bucket that the communicator's buffers can hold."""
    if all_decode and max_tokens >= 1:
        b = bucket_for(max_tokens, max_batch)
        if b is not None and b <= max_tokens_per_rank:
            return b, True
    return max_tokens, False


def warm_up_requests(prompts: list):
    """The measured run's prompts, 3 new tokens each: a warm-up that prefills the same lengths (every
    prefill kernel shape gets compiled) and reaches the batch's decode bucket (eager warm-up, then
    capture), so the measured run that follows pays neither compilation nor capture."""
    from afsplit.sampling_params import SamplingParams

    return list(prompts), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def graphs_wanted(enabled: bool, device: torch.device) -> tuple[bool, bool]:
    """(use the static decode path, capture it): captured on CUDA; uncaptured on CPU only for tests."""
    if not enabled:
        return False, False
    if device.type == "cuda":
        return True, True
    return os.environ.get(STATIC_ON_CPU_ENV) == "1", False


class GraphCache:
    """Runs `fn` for a shape key: eagerly the first time, captured the second, replayed after.

    `fn` must read its inputs from static tensors and return tensors (or a tuple of them); the
    replay returns the tensors captured as outputs (overwritten by the next replay of that key).
    All graphs share one memory pool; only one runs at a time and its outputs are consumed before
    the next.
    """

    def __init__(self, device: torch.device, capture: bool, name: str = "decode"):
        self.device, self.capture, self.name = device, capture, name
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.warmed: set[tuple] = set()
        self.failed: set[tuple] = set()
        self.pool = None
        self.replays = 0
        self.calls = 0

    def reset(self) -> bool:
        """Free every graph (before the process group goes: NCCL keeps resources of captured collectives
        until their graph is destroyed, and tearing the communicator down first hangs). True if any existed."""
        had = bool(self.graphs)
        if had:
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.warmed.clear()
        return had

    def run(self, key: tuple, fn: Callable[[], object]):
        self.calls += 1
        entry = self.graphs.get(key)
        if entry is not None:
            entry[0].replay()
            self.replays += 1
            return entry[1]
        if not self.capture or key in self.failed or key not in self.warmed:
            self.warmed.add(key)
            return fn()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except Exception as e:  # noqa: BLE001 -- stay correct: this shape keeps running eagerly
            self.failed.add(key)
            log.warning("%s graph %s: capture failed, running it eagerly: %s", self.name, key,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return fn()
        self.graphs[key] = (graph, out)
        log.info("%s graph captured for %s (%d in all)", self.name, key, len(self.graphs))
        graph.replay()
        self.replays += 1
        return out
