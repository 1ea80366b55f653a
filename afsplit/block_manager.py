"""Paged KV cache bookkeeping (pure CPU): a reference-counted block allocator and block tables.

A sequence's K/V live in fixed-size blocks; its block table lists them in order, so token i sits
in block ``table[i // block_size]`` at offset ``i % block_size``. Forked sequences share blocks
(reference counts); the first write into a shared block copies it (copy-on-write), and the copy
is returned to the caller, which owns the cache tensors.
"""

from __future__ import annotations

from collections import deque

from afsplit.sequence import Sequence


class BlockAllocator:
    """Free list plus reference counts over block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV block (the caller must check num_free first)")
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is not allocated"
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


class KVCacheManager:
    """Grows, forks and frees per-sequence block tables."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        cow = self._shared_tail(seq) and seq.num_computed_tokens % self.block_size != 0
        return max(need, 0) + int(cow)

    def _shared_tail(self, seq: Sequence) -> bool:
        return bool(seq.block_table) and self.allocator.ref_counts[seq.block_table[-1]] > 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._new_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Make room for `num_new_tokens` more tokens of `seq`.

        Returns the (src, dst) block copies the cache owner must do (copy-on-write), or None
        (and changes nothing) when there are not enough free blocks.
        """
        if not self.can_allocate(seq, num_new_tokens):
            return None
        copies = []
        if self._shared_tail(seq) and seq.num_computed_tokens % self.block_size != 0:
            old = seq.block_table[-1]
            new = self.allocator.allocate()
            self.allocator.free(old)
            seq.block_table[-1] = new
            copies.append((old, new))
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self.allocator.allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share all of `parent`'s blocks (e.g. parallel sampling of one prompt)."""
        for block in parent.block_table:
            self.allocator.incref(block)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.allocator.free(block)
        seq.block_table = []
