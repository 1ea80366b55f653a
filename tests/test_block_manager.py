"""Block allocator and block tables: no leaked or double-owned block after random operations."""

import random

from afsplit.block_manager import KVCacheManager
from afsplit.sampling_params import SamplingParams
from afsplit.sequence import Sequence


def new_seq(i):
    return Sequence(i, [1], SamplingParams(), seed=0)


def test_random_allocate_append_fork_free_never_leaks():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    next_id = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.35 or not live:  # new sequence with a prompt
            seq = new_seq(next_id)
            next_id += 1
            n = rng.randint(1, 20)
            if kv.allocate_slots(seq, n) is not None:
                seq.num_computed_tokens = n
                live.append(seq)
        elif op < 0.7:  # append tokens
            seq = rng.choice(live)
            n = rng.randint(1, 6)
            copies = kv.allocate_slots(seq, n)
            if copies is not None:
                for src, dst in copies:
                    assert src != dst and kv.allocator.ref_counts[dst] == 1
                seq.num_computed_tokens += n
        elif op < 0.8:  # fork
            parent = rng.choice(live)
            child = new_seq(next_id)
            next_id += 1
            kv.fork(parent, child)
            live.append(child)
        else:  # free
            seq = live.pop(rng.randrange(len(live)))
            kv.free(seq)
        # invariants: every table covers its tokens; ref counts equal the number of owners
        owners = [0] * 64
        for s in live:
            assert len(s.block_table) == kv.blocks_for(s.num_computed_tokens)
            for b in s.block_table:
                owners[b] += 1
        assert owners == kv.allocator.ref_counts
        assert kv.num_free_blocks == sum(1 for c in owners if c == 0)
    for s in live:
        kv.free(s)
    assert kv.num_free_blocks == 64 and sum(kv.allocator.ref_counts) == 0


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = new_seq(0)
    assert kv.allocate_slots(seq, 9) is None
    assert seq.block_table == [] and kv.num_free_blocks == 2
    assert kv.allocate_slots(seq, 8) == [] and kv.num_free_blocks == 0


def test_copy_on_write_of_shared_partial_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent, child = new_seq(0), new_seq(1)
    kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    kv.fork(parent, child)
    copies = kv.allocate_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # full block stays shared
