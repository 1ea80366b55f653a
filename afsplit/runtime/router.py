"""Which physical replica serves each (token, logical expert): the balancer, plus activation statistics.

Runs on attention ranks, per MoE layer and micro-batch, entirely on the device (captured inside
decode CUDA graphs). With replicas and several attention ranks, every attention rank first learns
all ranks' per-expert token counts (one small all_gather over the micro-batch's channel), so each
reaches the same global least-loaded assignment with no coordinator (comm/balancer.py).
"""

from __future__ import annotations

import torch

from afsplit.models.spec import ModelSpec
from comm.balancer import LeastLoadedBalancer, gather_counts, local_counts
from comm.expert_stats import ExpertStatsRecorder
from comm.placement import Placement


class ExpertRouter:
    def __init__(self, spec: ModelSpec, placement: Placement, device, attention_index: int, num_attention: int,
                 stats: ExpertStatsRecorder | None = None):
        self.spec = spec
        self.placement = placement
        self.balancer = LeastLoadedBalancer(placement, device)
        self.attention_index = attention_index
        self.num_attention = num_attention
        self.stats = stats
        self.moe_index = {layer: i for i, layer in enumerate(spec.moe_layer_ids)}  # comm/ numbers MoE layers

    @staticmethod
    def needs_count_groups(placement: Placement, num_attention: int) -> bool:
        """Replica choice over several attention ranks exchanges token counts (a group per channel)."""
        return placement.has_replicas() and num_attention > 1

    def assign(self, layer: int, ids_TK: torch.Tensor, channel) -> tuple[torch.Tensor, torch.Tensor]:
        """(dest expert index [T, K], local slot [T, K]) for the logical ids of one micro-batch (-1: nowhere)."""
        moe_layer = self.moe_index[layer]
        counts_AE = None
        if self.placement.has_replicas(moe_layer):
            counts_E = local_counts(ids_TK, self.spec.num_experts)
            counts_AE = gather_counts(counts_E, channel.attention_group) if self.num_attention > 1 else counts_E[None]
        dest_TK, slot_TK = self.balancer.assign(moe_layer, ids_TK, counts_AE, self.attention_index)
        if self.stats is not None:
            self.stats.record(moe_layer, ids_TK, dest_TK)
        return dest_TK, slot_TK
