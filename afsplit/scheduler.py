"""Continuous batching (pure CPU): which sequences compute how many tokens this step.

Every step has a token budget (`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`).
Running sequences go first, in arrival order: a decode takes one token, an unfinished prefill
takes what is left of its prompt (in chunks when `chunked_prefill` is on, so a long prompt never
stalls running decodes). When the KV cache is full, the most recently admitted running sequence
is preempted by recompute: its blocks are freed and it goes back to the front of the waiting
queue, keeping its generated tokens, to be prefilled again later. Then waiting sequences are
admitted while budget, sequence slots and free blocks allow. Finally the batch is ordered with its
1-token chunks (decodes) first, each part in the order above (`decodes_first`), so that attention
serves the decode rows with the paged decode kernel and the rest with the prefill kernel through
plain slices (afsplit/ops.py `attention`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afsplit.block_manager import KVCacheManager
from afsplit.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute for each seq this step
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write work for the cache

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


def decodes_first(batch: ScheduledBatch) -> ScheduledBatch:
    """The batch with its 1-token chunks first, then the longer ones, each in its original order (a
    stable partition; `block_copies` are unordered work). What is scheduled does not change, only the
    rows' order: every consumer (sampling, micro-batch split, the distributed runtime) indexes the
    batch by position, and contiguous micro-batches of it keep the order."""
    n = batch.num_tokens
    order = sorted(range(len(n)), key=lambda i: n[i] != 1)  # sorted() is stable
    if order == list(range(len(n))):
        return batch
    batch.seqs = [batch.seqs[i] for i in order]
    batch.num_tokens = [n[i] for i in order]
    return batch


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self, admit: bool = True) -> ScheduledBatch:
        """This step's batch. `admit=False`: running sequences only (the engine's step ahead, whose input
        tokens are partly still on the device, must not prefill a waiting one -- afsplit/step_ahead.py).
        A running sequence with nothing left to compute (its last token will end it) is skipped."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            if budget == 0:
                break
            if seq.num_uncomputed == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            if not self.chunked_prefill and n < seq.num_uncomputed:
                continue
            copies = self.kv.allocate_slots(seq, n)
            while copies is None:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                copies = self.kv.allocate_slots(seq, n)
            if copies is None:
                continue
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            batch.block_copies += copies
            budget -= n
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.chunked_prefill and n < seq.num_uncomputed:
                break
            copies = self.kv.allocate_slots(seq, n)
            if copies is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            batch.block_copies += copies
            budget -= n
        return decodes_first(batch)

    def finish(self, seq: Sequence, reason: str) -> None:
        """`seq` is done: free its blocks. It is running, or waiting when a step ahead preempted it after the
        step that produced its last token had been launched."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    def abort(self, request_id: int) -> Sequence | None:
        """Drop a waiting or running request and free its KV blocks; the Sequence, or None if unknown."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.kv.free(seq)
                    seq.status = SeqStatus.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        return None
