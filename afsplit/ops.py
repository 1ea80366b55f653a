"""The ops layer: every piece of model math the engine does goes through these functions.

Each op calls its kernel in ``kernels/``: the Triton kernel for CUDA tensors, the kernel file's
plain-torch reference for everything else (which is what the CPU parity tests check against
transformers). Set ``AFSPLIT_KERNELS=ref`` to force the references on CUDA too (for A/B checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels  # the repo's own kernels/ package (Triton + torch references)


def _backend() -> str | None:
    """None: Triton on CUDA tensors, the torch reference elsewhere; AFSPLIT_KERNELS=ref forces the reference."""
    return "ref" if os.environ.get("AFSPLIT_KERNELS") == "ref" else None


@dataclass
class AttentionMetadata:
    """Where the tokens of one forward pass sit: a packed batch of per-sequence chunks.

    A decode is a chunk of length 1; a prefill (or a piece of a chunked prefill) is a longer chunk
    whose first `prefix_lens[b]` tokens are already in the paged KV cache.
    """

    positions: torch.Tensor  # [T] int64 absolute positions
    slot_mapping: torch.Tensor  # [T] int64 KV cache slot of each token
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    prefix_lens: torch.Tensor  # [B] int32 tokens already cached before this chunk
    seq_lens: torch.Tensor  # [B] int32 prefix + chunk
    block_tables: torch.Tensor  # [B, max_blocks] int32
    decode_only: bool  # every chunk has length 1
    cu_seqlens_list: list[int]  # host copies, so no op needs a device -> host sync
    prefix_lens_list: list[int]
    valid_rows: torch.Tensor | None = None  # [T] bool; False = padding (CUDA-graph buckets): routed nowhere

    @property
    def max_seqlen_q(self) -> int:
        cu = self.cu_seqlens_list
        return max((b - a for a, b in zip(cu, cu[1:])), default=0)


# ----------------------------------------------------------------------------------------------
# Norms, rotary, activations


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in fp32 (HF semantics). With `residual`: returns (norm(x + residual), x + residual)."""
    return kernels.rmsnorm(x, weight, eps, residual, backend=_backend())


def rotary_cache(max_pos: int, head_dim: int, base: float, device) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half of the columns, sin in the second."""
    return kernels.rotary_cos_sin_cache(max_pos, head_dim, base, device)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 inplace: bool = False):
    """NeoX-style rotary embedding (HF rotate_half) on q [T, Hq, D] and k [T, Hkv, D] (new tensors, or in place)."""
    return kernels.apply_rotary(q, k, positions, cos_sin, inplace=inplace, backend=_backend())


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on gate|up halves of the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# KV cache and attention


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the paged cache [num_blocks, block_size, Hkv, D] at their slots."""
    kernels.store_kv(k, v, k_cache, v_cache, slot_mapping, backend=_backend())


NO_PREFIX_PATH_MAX_LEN = 4096


def attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None):
    """Causal attention of each chunk's queries over its cached prefix plus the chunk itself.

    q [T, Hq, D], k/v [T, Hkv, D] (already stored in the cache); returns [T, Hq, D].
    """
    if meta.decode_only:
        return kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window,
                                              backend=_backend())
    if meta.prefix_lens_list and not any(meta.prefix_lens_list) and meta.max_seqlen_q <= NO_PREFIX_PATH_MAX_LEN:
        # whole prompts (known on the host): the kernel's no-prefix path (64x64 tuned tiles) beats the
        # paged-prefix path's 128x128 up to 4k-token prompts (1.02-1.29x) and loses at 8k (0.91x)
        # (launch/prefill_attn_ab.py, 1 H200, 2026-12-04)
        k_cache = v_cache = block_tables = None
    else:
        block_tables = meta.block_tables
    return kernels.flash_attention(q, k, v, meta.cu_seqlens_q, k_cache, v_cache, block_tables, meta.prefix_lens,
                                   scale, window, max_seqlen_q=meta.max_seqlen_q, backend=_backend())


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """MLA: write latents [T, 1, L] into the paged latent cache [num_blocks, block_size, 1, L] (slots < 0 skipped).

    The latent is MLA's only cached tensor, so it goes through store_kv as both "k" and "v"
    (the second write repeats the first; T x L values, negligible next to attention)."""
    kernels.store_kv(latent, latent, cache, cache, slot_mapping, backend=_backend())


def mla_decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_lora_rank: int):
    """MLA absorbed decode: q [B, Hq, R + DR] over each sequence's cached latents -> [B, Hq, R]."""
    return kernels.mla_decode(q, cache, meta.block_tables, meta.seq_lens, scale, kv_lora_rank, backend=_backend())


def mla_prefill(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, scale: float, max_seqlen_q: int):
    """MLA expanded prefill: causal attention of q [T, Hq, DN + DR] over k_nope [Nk, Hq, DN] +
    shared k_pe [Nk, DR] with values v [Nk, Hq, DV] -> [T, Hq, DV]."""
    return kernels.mla_prefill(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, scale, max_seqlen_q=max_seqlen_q,
                               backend=_backend())


# ----------------------------------------------------------------------------------------------
# MoE


def topk_gating(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax router: (weights float32 [T, K], ids int32 [T, K]), HF order (descending)."""
    return kernels.topk_gating(logits, top_k, renormalize, backend=_backend())


def grouped_topk(logits: torch.Tensor, top_k: int, routing, bias: torch.Tensor | None, renormalize: bool):
    """DeepSeek router (spec.GroupedRouting): (weights float32 [T, K], ids int32 [T, K]), on the device."""
    return kernels.grouped_topk(logits, top_k, routing.scoring, routing.n_group, routing.topk_group,
                                routing.group_rank, bias, renormalize, routing.routed_scaling_factor,
                                backend=_backend())


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over local expert slots; ids of -1 are skipped.

    x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I] -> [T, H] in x.dtype.
    """
    return kernels.fused_moe(x, w13, w2, topk_ids, topk_weights, backend=_backend())
