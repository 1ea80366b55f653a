"""Memory per GPU for a layout: weights by role, KV cache, exchange buffers, and the KV capacity left.

usable = gpu_memory x memory_utilization - memory_reserve (CUDA context, graphs, activations;
both assumptions live in the profile's ``assumed`` section). Expert ranks hold ceil(E / n_e)
experts of every MoE layer (round-robin placement, the slowest rank's share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class RoleMemory:
    role: str  # attention | expert | colocated | engine
    weights: float  # bytes
    kv: float  # bytes of KV for the planned batch
    buffers: float  # exchange regions
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.buffers + self.reserve


def experts_per_rank(num_experts: int, expert_ranks: int) -> int:
    return math.ceil(num_experts / expert_ranks)


def usable_bytes(blocks) -> float:
    a = blocks.assumed
    return blocks.gpu_memory_bytes * a["memory_utilization"] - a["memory_reserve_gb"] * GB


def role_memory(shape, layout, batch: int, seq_tokens: int, m: int, rows: int, blocks,
                spare_slots: int = 0) -> list[RoleMemory]:
    """Memory of each role's GPU for `batch` sequences of up to `seq_tokens` tokens per attention rank
    (expert ranks hold ceil(E / n_e) + `spare_slots` experts per MoE layer)."""
    reserve = blocks.assumed["memory_reserve_gb"] * GB
    kv = batch * seq_tokens * shape.kv_bytes_per_token
    if layout.kind == "engine":
        return [RoleMemory("engine", shape.attention_weight_bytes_total + shape.routed_expert_bytes_total, kv, 0.0,
                           reserve)]
    n_e, n_a = layout.num_expert_ranks, layout.num_attention_ranks
    experts = (experts_per_rank(shape.num_experts, n_e) + spare_slots) * shape.num_moe_layers * shape.expert_bytes
    # one region per (peer, micro-batch channel) in each direction: send and receive sides
    row = shape.dispatch_row_bytes() + shape.combine_row_bytes()
    att_buf = 2 * m * n_e * rows * row
    exp_buf = 2 * m * n_a * rows * row
    if layout.kind == "colocated":
        return [RoleMemory("colocated", shape.attention_weight_bytes_total + experts, kv, att_buf + exp_buf, reserve)]
    return [RoleMemory("attention", shape.attention_weight_bytes_total, kv, att_buf, reserve),
            RoleMemory("expert", experts, 0.0, exp_buf, reserve)]


def kv_capacity_tokens(shape, layout, m: int, rows: int, blocks, spare_slots: int = 0) -> int:
    """Tokens of KV one attention rank can hold next to its weights and buffers."""
    mem = role_memory(shape, layout, 0, 0, m, rows, blocks, spare_slots)[0]
    free = usable_bytes(blocks) + mem.reserve - mem.total
    return max(0, int(free // shape.kv_bytes_per_token))


def memory_problem(shape, layout, batch: int, seq_tokens: int, m: int, rows: int, blocks,
                   spare_slots: int = 0) -> str | None:
    """None if every role fits, else the first that does not, with the arithmetic."""
    cap = usable_bytes(blocks)
    a = blocks.assumed
    for r in role_memory(shape, layout, batch, seq_tokens, m, rows, blocks, spare_slots):
        if r.total - r.reserve > cap:
            kv = (f" + KV {r.kv / GB:.1f} GB ({batch} seqs x {seq_tokens} tokens x "
                  f"{shape.kv_bytes_per_token / 1024:.0f} KiB)") if r.kv else ""
            return (f"memory: {r.role} GPU needs weights {r.weights / GB:.1f} GB{kv} + buffers {r.buffers / GB:.2f} GB "
                    f"= {(r.total - r.reserve) / GB:.1f} GB > {cap / GB:.1f} GB usable "
                    f"({blocks.gpu_memory_bytes / GB:.1f} GB x {a['memory_utilization']:g} - "
                    f"{a['memory_reserve_gb']:g} GB reserve)")
    return None
