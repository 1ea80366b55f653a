"""Multi-head latent attention (DeepSeek-V2/V3) for one layer, over the paged latent cache.

Per token the cache holds only the latent `[c | k_pe]` (kv_lora_rank R + rope DR values):

* decode (one new token per sequence) uses the absorbed form: W_UK is folded into the query
  (q_lat = W_UK^T q_nope per head), attention runs over the latents themselves
  (`ops.mla_decode`), and W_UV is applied to its output, so each step reads R + DR values per
  cached token for all heads together;
* prompt chunks use the expanded form: the context's latents (cached prefix + chunk) are
  gathered and expanded with kv_b_proj into per-head keys and values once, then
  `ops.mla_prefill` attends (cheaper than the absorbed form when many queries share a context).

A mixed step runs its leading one-token chunks (decodes, first in every scheduled batch) absorbed
and the chunks after them expanded.
Rotary dims of interleaved checkpoints were permuted to NeoX halves at load, so the rotation
is `ops.apply_rotary` with the spec's (possibly YaRN) cos/sin table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afsplit import ops
from afsplit.models.spec import ModelSpec
from afsplit.models.weights import AttnLayerWeights
from afsplit.transfers import to_device

# transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps
_LATENT_NORM_EPS = 1e-6


def mla_attention(spec: ModelSpec, lw: AttnLayerWeights, x: torch.Tensor, meta: ops.AttentionMetadata,
                  cache: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H] (normed hidden states) -> attention output after o_proj [T, H]; stores the chunk's latents."""
    m, w, Hq = spec.mla, lw.mla, spec.num_heads
    T, R, DN, DR = x.shape[0], m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim
    a = F.linear(x, w.in_w, w.in_b)  # [T, Qa + R + DR]: q_a (or q) and kv_a in one GEMM
    q_in, kv_a = a.split([a.shape[1] - R - DR, R + DR], dim=-1)
    if w.q_b_w is not None:
        q_in = F.linear(ops.rmsnorm(q_in.contiguous(), w.q_a_norm, _LATENT_NORM_EPS), w.q_b_w)
    q = q_in.reshape(T, Hq, m.qk_head_dim)
    latent = torch.empty((T, 1, R + DR), dtype=x.dtype, device=x.device)
    latent[:, 0, :R] = ops.rmsnorm(kv_a[:, :R].contiguous(), w.kv_a_norm, _LATENT_NORM_EPS)
    latent[:, 0, R:] = kv_a[:, R:]
    ops.apply_rotary(q[..., DN:], latent[..., R:], meta.positions, cos_sin, inplace=True)
    ops.store_latent(latent, cache, meta.slot_mapping)

    if meta.decode_only:
        out = _absorbed_decode(spec, w.kv_b_w, q, cache, meta)
    else:
        out = _mixed(spec, w.kv_b_w, q, cache, meta)
    return F.linear(out.reshape(T, Hq * m.v_head_dim), lw.o_w, lw.o_b)


def _absorbed_decode(spec: ModelSpec, kv_b_w: torch.Tensor, q: torch.Tensor, cache: torch.Tensor,
                     meta: ops.AttentionMetadata) -> torch.Tensor:
    """One query per sequence: q [B, Hq, DN + DR] -> [B, Hq, DV]; no host sync (CUDA graphs)."""
    m, Hq = spec.mla, spec.num_heads
    DN, R = m.qk_nope_head_dim, m.kv_lora_rank
    kv_b = kv_b_w.view(Hq, DN + m.v_head_dim, R)  # per head: W_UK [DN, R] rows, then W_UV [DV, R]
    q_lat = torch.bmm(q[..., :DN].transpose(0, 1), kv_b[:, :DN])  # [Hq, B, DN] @ [Hq, DN, R] -> [Hq, B, R]
    q_abs = torch.cat([q_lat.transpose(0, 1), q[..., DN:]], dim=-1)  # [B, Hq, R + DR]
    o_lat = ops.mla_decode(q_abs, cache, meta, m.softmax_scale, R)  # [B, Hq, R]
    return torch.bmm(o_lat.transpose(0, 1), kv_b[:, DN:].transpose(1, 2)).transpose(0, 1)  # [B, Hq, DV]


def _mixed(spec: ModelSpec, kv_b_w: torch.Tensor, q: torch.Tensor, cache: torch.Tensor,
           meta: ops.AttentionMetadata) -> torch.Tensor:
    """A step with prompt chunks (eager only: uses the host copies of the chunk layout): the leading
    `meta.num_decodes` one-token chunks (the scheduler puts decodes first) absorbed, the rest expanded,
    as two row slices of q."""
    nd, cu, prefix = meta.num_decodes, meta.cu_seqlens_list, meta.prefix_lens_list
    if nd == meta.num_seqs:
        return _absorbed_decode(spec, kv_b_w, q, cache, meta)
    gather = meta.per_forward.get("mla_prefill_gather")
    if gather is None:  # the same for every layer of this forward: made once
        lens = [b - a for a, b in zip(cu[nd:], cu[nd + 1:])]
        gather = meta.per_forward["mla_prefill_gather"] = _prefill_gather(meta.prefill_block_tables, lens,
                                                                          prefix[nd:], cache.shape[1], q.device)
    prompts = _expanded_prefill(spec, kv_b_w, q[nd:], cache, gather)
    if not nd:
        return prompts
    return torch.cat([_absorbed_decode(spec, kv_b_w, q[:nd], cache, meta), prompts])  # ops.mla_decode: rows [:nd]


def _prefill_gather(block_tables: torch.Tensor, lens: list[int], prefix: list[int], page: int, dev):
    """(cache slot of every context position of every chunk, cu_q, cu_k, longest chunk) for chunks of `lens`
    tokens after `prefix` cached ones: device ops, sizes from the host."""
    ctx = [p + n for p, n in zip(prefix, lens)]
    cu_q = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + ctx, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    Nk = int(cu_k[-1])
    seq = torch.repeat_interleave(torch.arange(len(ctx), device=dev), to_device(ctx, torch.int64, dev), output_size=Nk)
    cu_k, cu_q = to_device(cu_k, torch.int32, dev), to_device(cu_q, torch.int32, dev)
    pos = torch.arange(Nk, device=dev) - cu_k[seq].long()
    slots = block_tables[seq, pos // page].long() * page + pos % page
    return slots, cu_q, cu_k, max(lens)


def _expanded_prefill(spec: ModelSpec, kv_b_w: torch.Tensor, q: torch.Tensor, cache: torch.Tensor,
                      gather) -> torch.Tensor:
    """Prompt chunks (their latents are cached already) attending to their context, K/V expanded from the
    latents that `gather` (_prefill_gather) names."""
    m, Hq = spec.mla, spec.num_heads
    R, DN = m.kv_lora_rank, m.qk_nope_head_dim
    slots, cu_q, cu_k, max_len = gather
    Nk = slots.shape[0]
    lat = cache.view(-1, cache.shape[-1])[slots]  # [Nk, R + DR]
    kv = F.linear(lat[:, :R], kv_b_w).view(Nk, Hq, DN + m.v_head_dim)
    return ops.mla_prefill(q, kv[..., :DN], lat[:, R:], kv[..., DN:], cu_q, cu_k, m.softmax_scale, max_len)
