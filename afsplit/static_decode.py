"""Decode steps on static, bucket-padded inputs, replayed as CUDA graphs (see afsplit/cuda_graphs.py).

The eager path (ModelRunner) builds fresh tensors sized to the batch every step; a CUDA graph needs
the same addresses and shapes every replay. So here every micro-batch of a decode step is written
into preallocated inputs of the bucket's size: real sequences first, then padding rows (token 0,
position 0, KV slot -1 so nothing is stored, context length 1, expert ids masked to -1). Block
tables are as wide as ``max_model_len`` needs, so any decode fits.
"""

from __future__ import annotations

import torch

from afsplit import ops
from afsplit.cuda_graphs import GraphCache
from afsplit.scheduler import ScheduledBatch


class StaticDecode:
    """One forward of m decode micro-batches, each padded to a bucket, eager once, then a CUDA graph."""

    def __init__(self, model, kv_cache, block_size: int, max_model_len: int, max_bucket: int, moe, device,
                 capture: bool):
        self.model, self.kv_cache, self.moe, self.device = model, kv_cache, moe, device
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.max_bucket = max_bucket
        self.graphs = GraphCache(device, capture)
        self._m = 0  # micro-batches the static inputs are allocated for

    def _allocate(self, m: int) -> None:
        if m <= self._m:
            return
        B, dev = self.max_bucket, self.device
        # token, position, KV slot, context length, feed row (-1: the token column holds the token)
        self.scalars = torch.zeros(m, 5, B, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(m, B, self.max_blocks, dtype=torch.int32, device=dev)
        self.valid = torch.zeros(m, B, dtype=torch.bool, device=dev)
        self.seq_lens = torch.ones(m, B, dtype=torch.int32, device=dev)
        self.rows = torch.arange(B, dtype=torch.int64, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        # Two sets of host staging buffers, used in turn: with a step launched ahead (afsplit/step_ahead.py) the
        # host fills step N+1's while step N's copy out of the other set may not have run on the device yet.
        self._host = [(torch.zeros(m, 5, B, dtype=torch.int64, pin_memory=pin),
                       torch.zeros(m, B, self.max_blocks, dtype=torch.int32, pin_memory=pin)) for _ in range(2)]
        self._turn = 0
        self._m = m

    def _fill(self, parts: list[ScheduledBatch], bucket: int, feed=None) -> None:
        m, bs = len(parts), self.block_size
        host_scalars, host_tables = self._host[self._turn]
        self._turn ^= 1
        hs, ht = host_scalars[:m, :, :bucket], host_tables[:m, :bucket]
        hs.zero_()
        hs[:, 2].fill_(-1)  # padding rows store no KV
        hs[:, 3].fill_(1)  # and attend to one (never stored) key
        hs[:, 4].fill_(-1)  # and, as every row whose token the host knows, take no fed token
        ht.zero_()
        fed = feed[1] if feed is not None else {}
        for u, part in enumerate(parts):  # Python lists first, one tensor write per micro-batch (host time matters)
            cols: tuple[list[int], ...] = ([], [], [], [], [])  # token, position, KV slot, context length, feed row
            tables = []
            for seq in part.seqs:
                p = seq.num_computed_tokens  # the one token this decode computes
                n_prompt = len(seq.prompt_token_ids)
                cols[0].append(seq.prompt_token_ids[p] if p < n_prompt else seq.output_token_ids[p - n_prompt])
                cols[1].append(p)
                cols[2].append(seq.block_table[p // bs] * bs + p % bs)
                cols[3].append(p + 1)
                cols[4].append(fed.get(id(seq), -1))
                tables.append(seq.block_table)
            n = len(tables)
            if n:
                hs[u, :, :n] = torch.tensor(cols, dtype=torch.int64)
                width = max(len(t) for t in tables)
                ht[u, :n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.scalars[:m, :, :bucket].copy_(hs, non_blocking=True)
        self.tables[:m, :bucket].copy_(ht, non_blocking=True)
        if fed:  # tokens the previous step sampled on the device, not yet seen by the host (step_ahead.py)
            src, tokens = self.scalars[:m, 4, :bucket], self.scalars[:m, 0, :bucket]
            tokens.copy_(torch.where(src >= 0, feed[0][src.clamp(min=0)], tokens))
        torch.ge(self.scalars[:m, 2, :bucket], 0, out=self.valid[:m, :bucket])  # real rows have a KV slot
        self.seq_lens[:m, :bucket].copy_(self.scalars[:m, 3, :bucket])

    def _forward(self, m: int, bucket: int):
        inputs = []
        for u in range(m):
            meta = ops.AttentionMetadata(
                positions=self.scalars[u, 1, :bucket], slot_mapping=self.scalars[u, 2, :bucket],
                cu_seqlens_q=self.cu[:bucket + 1], prefix_lens=self.seq_lens[u, :bucket] - 1,
                seq_lens=self.seq_lens[u, :bucket], block_tables=self.tables[u, :bucket], decode_only=True,
                cu_seqlens_list=list(range(bucket + 1)), prefix_lens_list=[], valid_rows=self.valid[u, :bucket],
                max_seqlen_q=1, num_decodes=bucket)  # every row a decode (no per-row host list to scan)
            inputs.append((self.scalars[u, 0, :bucket], meta))
        return self.model.forward(inputs, self.kv_cache.layers, self.moe, [self.rows[:bucket]] * m)

    def run(self, parts: list[ScheduledBatch], bucket: int, feed=None) -> torch.Tensor:
        """Logits [m * bucket, V]: row u * bucket + b is sequence b of micro-batch u (padding rows after
        each micro-batch's sequences; overwritten by the next run of this bucket).

        `feed` = (tokens [S] on the device, {id(seq): row}): the input token of each sequence named is
        tokens[row] (the previous step's sample, which the host has not read yet); the others' come
        from their token lists."""
        m = len(parts)
        self._allocate(m)
        self._fill(parts, bucket, feed)
        return self.graphs.run((m, bucket), lambda: self._forward(m, bucket))
