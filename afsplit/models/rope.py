"""Rotary-embedding cos/sin tables for a model spec: default RoPE or YaRN (transformers' formulas).

The table layout is the one `ops.apply_rotary` reads: `[max_pos, dim]` float32, cos of each
frequency in the first half of the columns and sin in the second (NeoX halves; interleaved
checkpoints are permuted into this layout at load time, see `afsplit.models.weights`).
YaRN tables include its `attention_factor` (transformers multiplies cos and sin by it).
"""

from __future__ import annotations

import math

import torch

from afsplit import ops
from afsplit.models.spec import YarnScaling


def yarn_inv_freq(dim: int, base: float, yarn: YarnScaling) -> torch.Tensor:
    """[dim/2] float32: extrapolated frequencies for the fast dimensions, interpolated (/ factor) for
    the slow ones, with a linear ramp between the YaRN correction range [low, high]."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def cos_sin_table(max_pos: int, dim: int, base: float, yarn: YarnScaling | None, device) -> torch.Tensor:
    """`[max_pos, dim]` float32 cos | sin table for rotary dimension `dim`."""
    if yarn is None:
        return ops.rotary_cache(max_pos, dim, base, device)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.int64).float(), yarn_inv_freq(dim, base, yarn))
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * yarn.attention_factor
    return table.to(device).contiguous()
