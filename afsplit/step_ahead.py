"""Launching the next decode step before the host has read this one's tokens (vLLM's async scheduling).

A decode step of the single-process engine is one CUDA-graph replay, ~10 ms on the GPU at Qwen3-30B-A3B
shapes, but between two replays the host reads the sampled tokens (a device sync), appends them,
checks for the end of each request, schedules and fills the next step's inputs: ~1 ms in which the GPU
has nothing to do. So, when step N is a decode step on the static path and the next step can
only be the decodes of the same sequences (nothing waiting could join, counting the places that
requests ending by length free), the engine launches N+1 *before* reading N:

- N's tokens stay on the device (greedy or sampled there, afsplit/sampler.py: a sampled token depends only
  on its request's seed and position), with a copy to pinned host memory and an event;
- each sequence of N that may go on gets a placeholder token (:data:`PENDING`) so that the scheduler
  gives it one more slot, and N+1's input token of that sequence is taken on the device from N's
  tokens (``feed``: StaticDecode fills it with one gather after its host-to-device copy);
- then the host waits for N's event only, while the GPU already runs N+1; N's placeholders are
  replaced by the real tokens, finished requests are finished as before.

A sequence whose token N turns out to end it (EOS, a stop token) was still computed in N+1: that row is
dropped when N+1 is read, and the KV slot it wrote belongs to blocks freed meanwhile (the stream runs
N+1's write before any later step can reuse them). One that ends by length is known in advance and
is not run ahead. Tokens are those of the one-step-at-a-time loop: every row's computation is the
same, only its launch comes earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afsplit.sampler import sample
from afsplit.scheduler import ScheduledBatch
from afsplit.sequence import Sequence
from afsplit.transfers import HostCopy

PENDING = -1  # a generated token that is still on the device (its step was launched, not yet read)


@dataclass
class LaunchedStep:
    """One forward pass launched on the device, its tokens not yet read by the host."""

    batch: ScheduledBatch
    seqs: list[Sequence]  # the sequences that sample, in logits-row order
    slots: list[int]  # per sequence: the index in output_token_ids its new token takes
    static: bool  # it ran on the static (CUDA-graph) decode path
    tokens: torch.Tensor | None = None  # the sampled tokens on the device [S] (None: nothing samples)
    host: HostCopy | None = None  # their copy to the host, under way

    @classmethod
    def launched(cls, batch: ScheduledBatch, sampling: list[int], logits: torch.Tensor, static: bool) -> "LaunchedStep":
        """Record a step the runner has launched: its tokens are sampled on the device (afsplit/sampler.py) and
        their copy to the host starts now."""
        seqs = [batch.seqs[i] for i in sampling]
        step = cls(batch, seqs, [len(s.output_token_ids) for s in seqs], static)  # logits not kept: sampled now
        if seqs:
            step.tokens = sample(logits, seqs, step.slots)  # slot = which generated token: the draw's position
            step.host = HostCopy(step.tokens)
        return step

    def read_tokens(self) -> list[int]:
        """The step's tokens (waits for this step only, not for one launched after it)."""
        return self.host.get().tolist() if self.host is not None else []


def ends_by_length(seq: Sequence, max_model_len: int) -> bool:
    """Whether the token being computed for `seq` will end it by length (max_tokens or max_model_len)."""
    return len(seq.output_token_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= max_model_len


def can_run_ahead(running: list[Sequence], waiting: int, max_num_seqs: int, max_model_len: int) -> bool:
    """False while a waiting request could join the next step: the step-by-step loop would admit it there
    (a sequence ending by length frees its place), so it must be scheduled after this step is read."""
    if not waiting:
        return True
    ending = sum(1 for s in running if ends_by_length(s, max_model_len))
    return len(running) - ending >= max_num_seqs


def placeholders_for_ahead(step: LaunchedStep, running: list[Sequence], max_model_len: int) -> dict[int, int] | None:
    """Whether the step after `step` can be launched before `step` is read, and if so the feed map.

    It can when `step` was a static decode step and every running sequence sampled in it (no
    prompt chunk is in progress; the caller has checked that no waiting request could join). Each
    sequence that may go on gets a PENDING token; returns {id(seq): its row in step.tokens}, or None."""
    if not (step.static and step.tokens is not None):
        return None
    rows = {id(s): k for k, s in enumerate(step.seqs)}
    if any(id(s) not in rows for s in running):
        return None
    feed = {}
    for seq in running:
        if ends_by_length(seq, max_model_len):
            continue  # its token of `step` ends it: nothing to run ahead
        seq.output_token_ids.append(PENDING)
        feed[id(seq)] = rows[id(seq)]
    return feed or None


def drop_placeholders(seq: Sequence) -> None:
    """Remove tokens still pending from a sequence that is being aborted (they will never be read)."""
    while seq.output_token_ids and seq.output_token_ids[-1] == PENDING:
        seq.output_token_ids.pop()
