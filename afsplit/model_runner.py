"""Turns a scheduled batch into tensors, runs the model and returns the rows to sample from."""

from __future__ import annotations

import torch

from afsplit import ops
from afsplit.cuda_graphs import step_tokens_hint
from afsplit.piecewise_prefill import PiecewisePrefill
from afsplit.static_decode import StaticDecode
from afsplit.transfers import to_device
from afsplit.models.moe_model import AttentionModel, MoEBackend
from afsplit.scheduler import ScheduledBatch


class KVCache:
    """Per-layer paged caches. Attention: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim].
    MLA (`latent=True`): (latent, None) with latent [num_blocks, block_size, 1, head_dim], the compressed
    KV plus the rotary key of each token (spec.head_dim = kv_lora_rank + qk_rope_head_dim)."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, latent=False):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def zeros():
            return torch.zeros(shape, dtype=dtype, device=device)

        self.layers = [(zeros(), None if latent else zeros()) for _ in range(num_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies])
        dst = torch.tensor([d for _, d in copies])
        for pair in self.layers:
            for c in pair:
                if c is not None:
                    c[dst.to(c.device)] = c[src.to(c.device)]

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype, latent=False) -> int:
        tensors = 1 if latent else 2
        return tensors * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def build_metadata(batch: ScheduledBatch, block_size: int, device) -> tuple[torch.Tensor, ops.AttentionMetadata, list[int]]:
    """Token ids, attention metadata and, per sequence, the row of its last token (or -1 if it does not sample).

    Rows follow the batch's order (the scheduler's: 1-token chunks first); what attention decides once
    per forward (num_decodes, max_seqlen_q, whole_prompts, ...) AttentionMetadata derives from the host lists."""
    token_ids, positions, slots, cu, prefix, seq_lens = [], [], [], [0], [], []
    sample_rows = []
    max_blocks = max((len(s.block_table) for s in batch.seqs), default=1) or 1
    tables = torch.zeros((len(batch.seqs), max_blocks), dtype=torch.int32)
    for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
        start = seq.num_computed_tokens
        token_ids += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        cu.append(cu[-1] + n)
        prefix.append(start)
        seq_lens.append(start + n)
        tables[b, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        sample_rows.append(cu[-1] - 1 if start + n == seq.num_tokens else -1)
    meta = ops.AttentionMetadata(  # non-blocking copies (afsplit/transfers.py): the host goes on launching
        positions=to_device(positions, torch.int64, device),
        slot_mapping=to_device(slots, torch.int64, device),
        cu_seqlens_q=to_device(cu, torch.int32, device),
        prefix_lens=to_device(prefix, torch.int32, device),
        seq_lens=to_device(seq_lens, torch.int32, device),
        block_tables=to_device(tables, torch.int32, device),
        decode_only=all(n == 1 for n in batch.num_tokens),
        cu_seqlens_list=cu,
        prefix_lens_list=prefix,
    )
    return to_device(token_ids, torch.int64, device), meta, sample_rows


def split_micro_batches(batch: ScheduledBatch, m: int) -> list[ScheduledBatch]:
    """Cut the batch into m contiguous micro-batches of about equal token counts; each keeps the batch's order
    (decodes first), so each one's metadata splits the same way. A sequence goes to the part its tokens'
    middle token falls in, so a mixed step's one long prompt chunk after a few decodes gets a part of its own
    (by its first token it would join the decodes and leave the other part empty, with nothing to overlap);
    parts can still be empty when there are fewer sequences than parts or one chunk outweighs the rest."""
    parts = [ScheduledBatch() for _ in range(m)]
    total, done = batch.total_tokens, 0
    for seq, n in zip(batch.seqs, batch.num_tokens):
        u = min(m - 1, (2 * done + n - 1) * m // (2 * total)) if total else 0
        parts[u].seqs.append(seq)
        parts[u].num_tokens.append(n)
        done += n
    return parts


class ModelRunner:
    """Runs the attention model over one scheduled batch; routed experts go through `moe`.

    Decode steps whose micro-batches fit a bucket go through `static` (padded inputs, CUDA graphs)
    when given; prefill and mixed steps of one micro-batch within the token buckets go through
    `piecewise` (graphs around everything but attention) when given; everything else runs eagerly.
    """

    def __init__(self, model: AttentionModel, kv_cache: KVCache, block_size: int, moe: MoEBackend, device,
                 micro_batches: int = 1, max_batch: int = 1, max_tokens_per_rank: int = 1,
                 static: StaticDecode | None = None, piecewise: PiecewisePrefill | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.moe = moe
        self.device = device
        self.micro_batches = micro_batches
        self.max_batch, self.max_tokens_per_rank = max_batch, max_tokens_per_rank  # the bucket rule's bounds
        self.static = static
        self.piecewise = piecewise  # prefill/mixed steps of one micro-batch, cut at attention (piecewise graphs)
        self.last_static = False  # whether the last run took the static (CUDA-graph) decode path

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, feed=None) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [S, V] for the S sequences that sample this step, their indices in `batch`).

        `feed`: input tokens still on the device (StaticDecode.run); only a decode step that takes the
        static path can have them. `self.last_static` says afterwards whether this step took it."""
        self.kv_cache.copy_blocks(batch.block_copies)
        parts = split_micro_batches(batch, self.micro_batches)
        position = {id(seq): i for i, seq in enumerate(batch.seqs)}
        max_tokens, all_decode = self.moe.agree_step(max((p.total_tokens for p in parts), default=0),
                                                     all(n == 1 for n in batch.num_tokens))
        hint, graphable = step_tokens_hint(max_tokens, all_decode, self.max_batch, self.max_tokens_per_rank)
        self.moe.begin_step(hint)
        self.last_static = graphable and self.static is not None
        if feed is not None and not self.last_static:
            raise RuntimeError("a step with device-fed tokens must be a decode step on the static path")
        if self.last_static:  # one token per sequence: decodes (or 1-token chunks)
            # rows of the sequences that sample (a 1-token chunk inside a prompt computes KV, samples nothing)
            rows, sampling = [], []
            for u, part in enumerate(parts):
                for b, seq in enumerate(part.seqs):
                    if seq.num_computed_tokens + 1 == seq.num_tokens:
                        rows.append(u * hint + b)
                        sampling.append(position[id(seq)])
            logits = self.static.run(parts, hint, feed)
            # the index goes through pinned memory: a blocking copy would wait for the replay just queued
            logits = logits[to_device(rows, torch.int64, logits.device)]
        elif self.piecewise is not None and len(parts) == 1 and self.piecewise.handles(batch.total_tokens):
            token_ids, meta, sample_rows = build_metadata(batch, self.block_size, self.device)
            rows = to_device([r for r in sample_rows if r >= 0], torch.int64, self.device)
            sampling = [i for i, r in enumerate(sample_rows) if r >= 0]
            logits = self.piecewise.run(token_ids, meta, rows)
        else:
            inputs, rows, sampling = [], [], []
            for part in parts:
                token_ids, meta, sample_rows = build_metadata(part, self.block_size, self.device)
                inputs.append((token_ids, meta))
                rows.append(to_device([r for r in sample_rows if r >= 0], torch.int64, self.device))
                sampling += [position[id(part.seqs[i])] for i, r in enumerate(sample_rows) if r >= 0]
            logits = self.model.forward(inputs, self.kv_cache.layers, self.moe, rows)
        self.moe.end_step()
        return logits, sampling
