"""The ops layer: every piece of model math the engine does goes through these functions.

Each op calls its kernel in ``kernels/``: the Triton kernel for CUDA tensors, the kernel file's
plain-torch reference for everything else (which is what the CPU parity tests check against
transformers). Set ``AFSPLIT_KERNELS=ref`` to force the references on CUDA too (for A/B checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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

    The scheduler puts the 1-token chunks first (afsplit/scheduler.py `decodes_first`), so a mixed
    step is `num_decodes` decode rows followed by the prompt chunks: `attention` serves the first
    part with the paged decode kernel and the rest with the varlen prefill kernel, through the
    `decode_*` / `prefill_*` views below (plain slices, made once here, no per-layer device work).
    A batch in another order is still correct: its later 1-token chunks go with the prompts.
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
    # -- decided once per forward on the host (not per layer); a builder may pass them (the static decode
    # path, whose host lists are partial), otherwise __post_init__ derives them from the host lists --
    max_seqlen_q: int | None = None  # longest chunk: the prefill kernel's grid bound (no device -> host sync)
    num_decodes: int | None = None  # leading 1-token chunks = rows = sequences served by the paged decode kernel
    whole_prompts: bool | None = None  # the chunks after the decodes all start at position 0 and none is longer
    #   than NO_PREFIX_PATH_MAX_LEN: the prefill kernel's no-prefix path (faster there, see `attention`)
    decode_max_seq_len: int | None = None  # longest context of the decode rows (host bound sizing the decode
    #   kernel's split count; None = the block tables' width), known when prefix_lens_list covers them
    # -- views of the per-sequence tensors split at num_decodes (slices: no device work, CUDA-graph safe) --
    decode_block_tables: torch.Tensor = field(init=False, repr=False)  # [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor = field(init=False, repr=False)  # [num_decodes]
    # the prompt chunks, for the prefill kernel over the WHOLE q/k/v: cu_seqlens_q[num_decodes:] keeps the
    # absolute row offsets (it starts at num_decodes), which the kernel uses as row indices into q/k/v and its
    # output, so no q/k/v slice and no output copy is needed for the (large) prompt part
    prefill_cu_seqlens_q: torch.Tensor = field(init=False, repr=False)  # [B - num_decodes + 1]
    prefill_prefix_lens: torch.Tensor = field(init=False, repr=False)  # [B - num_decodes]
    prefill_block_tables: torch.Tensor = field(init=False, repr=False)  # [B - num_decodes, max_blocks]
    # what a model derives from this metadata once and every layer of the forward reuses (e.g. MLA's gather of
    # the prompts' cached latents), by the model's own key
    per_forward: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        cu, prefix = self.cu_seqlens_list, self.prefix_lens_list
        if self.max_seqlen_q is None:
            self.max_seqlen_q = max((b - a for a, b in zip(cu, cu[1:])), default=0)
        if self.num_decodes is None and self.decode_only:
            self.num_decodes = self.seq_lens.shape[0]  # every sequence (a shape: no host list needed)
        elif self.num_decodes is None:
            nd = 0
            while nd + 1 < len(cu) and cu[nd + 1] - cu[nd] == 1:
                nd += 1
            self.num_decodes = nd
        nd = self.num_decodes
        if self.whole_prompts is None:
            rest = prefix[nd:]
            self.whole_prompts = (bool(rest) and not any(rest) and len(cu) - 1 == len(prefix)
                                  and self.max_seqlen_q <= NO_PREFIX_PATH_MAX_LEN)
        if self.decode_max_seq_len is None and 0 < nd <= len(prefix):
            self.decode_max_seq_len = max(prefix[:nd]) + 1
        self.decode_block_tables, self.decode_seq_lens = self.block_tables[:nd], self.seq_lens[:nd]
        self.prefill_cu_seqlens_q = self.cu_seqlens_q[nd:]
        self.prefill_prefix_lens, self.prefill_block_tables = self.prefix_lens[nd:], self.block_tables[nd:]

    @property
    def num_seqs(self) -> int:
        """B, from the host copy of cu_seqlens_q (0 for the piecewise pieces' metadata, which has none)."""
        return max(len(self.cu_seqlens_list) - 1, 0)


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


# whole prompts up to this length take the prefill kernel's no-prefix path (64x64 tuned tiles), which beats
# the paged-prefix path's 128x128 up to 4k-token prompts (1.02-1.29x) and loses at 8k (0.91x)
# (launch/prefill_attn_ab.py, 1 H200, 2026-12-04); decided per forward (AttentionMetadata.whole_prompts)
NO_PREFIX_PATH_MAX_LEN = 4096


def attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None):
    """Causal attention of each chunk's queries over its cached prefix plus the chunk itself.

    q [T, Hq, D], k/v [T, Hkv, D] (already stored in the cache); returns [T, Hq, D].
    The leading `meta.num_decodes` one-token chunks go through the paged decode kernel (one program
    per sequence and kv head, split over its context), the other chunks through the varlen prefill
    kernel; a mixed step runs both, each writing its own rows of one output.
    """
    be, nd = _backend(), meta.num_decodes
    if meta.decode_only or nd == meta.num_seqs:
        return kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window,
                                              backend=be)
    if meta.whole_prompts:
        kc = vc = bt = None
    else:
        kc, vc, bt = k_cache, v_cache, meta.prefill_block_tables
    # the prompt chunks: cu_seqlens_q[nd:] indexes the whole q/k/v, so rows [:nd] of `out` are left unwritten ...
    out = kernels.flash_attention(q, k, v, meta.prefill_cu_seqlens_q, kc, vc, bt, meta.prefill_prefix_lens, scale,
                                  window, max_seqlen_q=meta.max_seqlen_q, backend=be)
    if nd:  # ... and filled here by the decode rows
        out[:nd] = kernels.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, scale, window,
                                                  max_seq_len=meta.decode_max_seq_len, backend=be)
    return out


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """MLA: write latents [T, 1, L] into the paged latent cache [num_blocks, block_size, 1, L] (slots < 0 skipped).

    The latent is MLA's only cached tensor, so it goes through store_kv as both "k" and "v"
    (the second write repeats the first; T x L values, negligible next to attention)."""
    kernels.store_kv(latent, latent, cache, cache, slot_mapping, backend=_backend())


def mla_decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_lora_rank: int):
    """MLA absorbed decode of the metadata's leading one-token chunks (all of them when decode_only):
    q [num_decodes, Hq, R + DR] over each sequence's cached latents -> [num_decodes, Hq, R]."""
    return kernels.mla_decode(q, cache, meta.decode_block_tables, meta.decode_seq_lens, scale, kv_lora_rank,
                              backend=_backend())


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
