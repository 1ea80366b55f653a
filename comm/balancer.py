"""Replica selection: map each (token, logical expert) to a physical replica (expert index, slot).

Least-loaded selection (Janus-style), per MoE layer and micro-batch, with no coordinator: every
attention rank holds the same inputs - the per-attention-rank logical-expert counts ``counts_AE``
(one small all_gather, :func:`gather_counts`) - and runs the same integer arithmetic on them, so
all ranks reach the same global assignment; each then applies its own share to its own tokens.

A replica is identified by its expert rank (a placement never puts two replicas of one expert on
one rank), so the quotas are a dense [E, n] matrix q (n expert ranks), zero off the placement.

1. Quotas q_En (global, integer): how many of expert e's c_e tokens rank j serves.
   Experts with one replica are fixed: they load their rank with B_j. The replicated experts'
   tokens W are water-filled over the ranks that host them, on top of B: rank j's target intake
   is t_j = max(0, lambda - B_j), the level lambda that minimises the max rank load if every
   replicated token could go anywhere. Then ``iters`` rounds of Sinkhorn scaling (fixed point,
   integer) fit the replicated experts' split to those intakes: scale each rank's column to t_j,
   then each expert's row back to c_e. Final rounding keeps every row sum exactly c_e (largest
   remainder, ties to the lower rank). ``iters=0`` is the plain even split over replicas.
   Integer arithmetic throughout (no float atomics), so the result is bit-identical on every rank.
2. Shares: expert e's tokens are laid out globally in attention-rank order (rank 0's first); rank
   j serves positions [Q_{j-1}, Q_j) (prefix sums of q over j). Attention rank a's tokens of e
   start at sum_{a' < a} counts_AE[a', e]; within a rank they are taken in token order.
3. Lookup: (expert, rank) -> local slot from the placement.

Everything is fixed-shape torch on the device: no host sync, no Python loop over tokens, so
``assign`` can be captured in a CUDA graph. Slots with id -1 (padding rows of a CUDA-graph bucket)
go nowhere: dest = slot = -1, and they are not counted. Assumes the K experts of one token are distinct (true
for top-k routers) and that ``counts_AE[attention_index]`` is this rank's own bincount.
"""

from __future__ import annotations

import torch

from comm.placement import Placement

_BIG = 1 << 40  # "infinite" load / boundary (fits int64 even times n)
_FP = 1 << 8  # fixed-point scale of the Sinkhorn quotas (1/256 token)


def gather_counts(counts_E: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather this attention rank's logical-expert counts [E] into counts_AE [A, E].

    `group` must be the attention ranks' group, its group rank i being attention index i (the
    row order of the result). Works with NCCL and gloo.
    """
    import torch.distributed as dist

    A = dist.get_world_size(group)
    counts_E = counts_E.contiguous()
    out = torch.empty((A, counts_E.numel()), dtype=counts_E.dtype, device=counts_E.device)
    if dist.get_backend(group) == "gloo":  # list form: gloo's into-tensor support varies by version
        dist.all_gather(list(out.unbind(0)), counts_E, group=group)
    else:
        dist.all_gather_into_tensor(out, counts_E, group=group)
    return out


def local_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """This rank's tokens per logical expert [E] int32 (fixed shape, no host sync; ids of -1 not counted)."""
    flat = topk_ids_TK.reshape(-1).long()
    out = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    out.scatter_add_(0, torch.where(flat < 0, num_experts, flat), torch.ones_like(flat, dtype=torch.int32))
    return out[:num_experts]


class _Tables:
    """Placement as dense device tensors [L, E, n]: which rank holds e, in which slot."""

    def __init__(self, placement: Placement, device):
        L, E, n = placement.num_layers, placement.num_experts, placement.num_expert_ranks
        held = torch.zeros((L, E, n), dtype=torch.bool)
        slot = torch.zeros((L, E, n), dtype=torch.int32)
        first = torch.zeros((L, E), dtype=torch.int32)
        for l in range(L):
            for e in range(E):
                reps = placement.replicas(l, e)
                for j, s in reps:
                    held[l, e, j], slot[l, e, j] = True, s
                first[l, e] = reps[0][0]
        nrep = held.sum(-1)
        multi = nrep > 1
        self.L, self.E, self.n = L, E, n
        self.held_LEn = held.to(device)
        self.slot_LEn = slot.to(device)
        self.nrep_LE = nrep.to(device)
        self.multi_LE = multi.to(torch.int64).to(device)
        # fixed (one-replica) and flexible (replicated) parts of the support
        self.single_LEn = (held & ~multi[..., None]).to(torch.int64).to(device)
        self.shared_LEn = (held & multi[..., None]).to(torch.int64).to(device)
        self.hosts_Ln = (held & multi[..., None]).any(1).to(device)  # ranks hosting a replicated expert
        # last rank holding e: token positions past the last boundary fall there
        j_n = torch.arange(n)
        last = torch.where(held, j_n, -1).amax(-1)
        self.past_last_LEn = (j_n[None, None] >= last[..., None]).to(device)
        # one extra column of -1: a masked token (id -1, e.g. a CUDA-graph padding row) indexes it and
        # gets dest = slot = -1, so the communicator sends it nowhere -- without an extra op per layer
        none = torch.full((L, 1), -1, dtype=torch.int32)
        self.first_dest_LE = torch.cat([first, none], 1).to(device)
        self.first_slot_LE = torch.cat([torch.gather(slot, 2, first[..., None].long())[..., 0], none], 1).to(device)
        self.replicated = [bool(multi[l].any()) for l in range(L)]
        self.before_nn = (j_n[None, :] < j_n[:, None]).to(device)  # [j, j']: j' < j (tie break)


class StaticBalancer:
    """Always the first replica (lowest expert index) of each logical expert: the no-balancing baseline."""

    def __init__(self, placement: Placement, device="cpu"):
        self.placement = placement
        self.t = _Tables(placement, device)

    def assign(self, layer: int, topk_ids_TK: torch.Tensor, counts_AE: torch.Tensor | None = None,
               attention_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        ids = topk_ids_TK.long()
        return self.t.first_dest_LE[layer][ids], self.t.first_slot_LE[layer][ids]


class LeastLoadedBalancer:
    """Least-loaded replica selection, deterministic across attention ranks (module docstring).

    ``assign(layer, topk_ids_TK, counts_AE, attention_index) -> (dest_TK, slot_TK)``, both int32
    [T, K]: the expert index (position in ``Topology.expert_ranks``) and local slot serving each
    (token, k). Layers with no replicated expert take a pure table lookup.
    """

    def __init__(self, placement: Placement, device="cpu", iters: int = 4):
        self.placement = placement
        self.device = torch.device(device)
        self.iters = iters
        self.t = _Tables(placement, self.device)

    # -- global quotas -------------------------------------------------------------------------

    def quotas(self, layer: int, counts_AE: torch.Tensor) -> torch.Tensor:
        """Tokens of expert e served by expert rank j, q_En (int64, 0 where j holds no replica of e);
        each row sums to the total count c_e = counts_AE[:, e].sum()."""
        t = self.t
        c_E = counts_AE.to(torch.int64).sum(0)
        single_En = t.single_LEn[layer]
        q_single = c_E[:, None] * single_En
        if not t.replicated[layer]:
            return q_single
        shared_En, multi_E = t.shared_LEn[layer], t.multi_LE[layer]
        if self.iters <= 0:  # even split, remainder to the lowest ranks
            nrep_E = t.nrep_LE[layer]
            order_En = torch.cumsum(shared_En, 1) - 1  # replica number of each held rank
            even = torch.div(c_E, nrep_E, rounding_mode="floor")[:, None] + (order_En < (c_E % nrep_E)[:, None])
            return q_single + even * shared_En
        # target intake per rank: water-fill the replicated tokens W over the hosting ranks above B
        base_n = q_single.sum(0)
        cm_E = c_E * multi_E
        flex_1 = cm_E.sum()[None]
        other_1n = torch.where(t.hosts_Ln[layer], base_n, _BIG)[None]
        intake_n = _waterfill(other_1n, flex_1, t.before_nn)[0] * _FP
        # Sinkhorn in fixed point: columns to the intakes, rows back to c_e
        row_target_E = cm_E * _FP
        q = torch.div(row_target_E, t.nrep_LE[layer], rounding_mode="floor")[:, None] * shared_En
        for _ in range(self.iters):
            col_n = q.sum(0)
            q = torch.div(q * intake_n, col_n.clamp(min=1), rounding_mode="floor")
            q = torch.maximum(q, shared_En)  # keep the support (never an all-zero row)
            q = torch.div(q * row_target_E[:, None], q.sum(1, keepdim=True).clamp(min=1), rounding_mode="floor")
        return q_single + _round_rows(q, cm_E, t.before_nn)

    def rank_loads(self, layer: int, counts_AE: torch.Tensor) -> torch.Tensor:
        """Tokens per expert rank [n] (int64) that the quotas give."""
        return self.quotas(layer, counts_AE).sum(0)

    # -- this rank's share ---------------------------------------------------------------------

    def assign(self, layer: int, topk_ids_TK: torch.Tensor, counts_AE: torch.Tensor,
               attention_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.t
        ids_TK = topk_ids_TK.long()
        if not t.replicated[layer]:  # fast path: one replica each, a pure lookup
            return t.first_dest_LE[layer][ids_TK], t.first_slot_LE[layer][ids_TK]
        T, K = ids_TK.shape
        counts_AE = counts_AE.to(torch.int64)
        q_En = self.quotas(layer, counts_AE)
        # rank j serves global positions [Q_{j-1}, Q_j) of e's tokens; shift to this rank's frame
        before_E = counts_AE[:attention_index].sum(0)  # this rank's tokens of e start here
        bound_En = torch.cumsum(q_En, 1) - before_E[:, None]
        bound_En = torch.where(t.past_last_LEn[layer], _BIG, bound_En)  # (robustness) never past the last replica
        # masked slots (id -1: CUDA-graph padding rows) are counted as a pseudo-expert E, then routed nowhere
        none_TK = ids_TK < 0
        ids_TK = torch.where(none_TK, t.E, ids_TK)
        bound_En = torch.cat([bound_En, torch.zeros_like(bound_En[:1])])
        # position of (t, k) among this rank's tokens of its expert, in token order. Laid out
        # [E, T] so the scan runs along the innermost dim: torch's CUDA scan over an outer dim of a
        # [T, E] tensor runs one thread per expert through all T tokens (~1 ms at T=4096, measured).
        ids_KT = ids_TK.t()
        onehot_ET = torch.zeros((t.E + 1, T), dtype=torch.int32, device=ids_TK.device)
        onehot_ET.scatter_(0, ids_KT, 1)
        pos_TK = (torch.cumsum(onehot_ET, 1, dtype=torch.int32).gather(0, ids_KT) - 1).t()
        dest_TK = (bound_En[ids_TK] <= pos_TK[..., None]).sum(-1)  # boundaries passed = rank index
        slot_TK = t.slot_LEn[layer][ids_TK.clamp(max=t.E - 1), dest_TK.clamp(max=t.n - 1)]
        return (torch.where(none_TK, -1, dest_TK).to(torch.int32),
                torch.where(none_TK, -1, slot_TK).to(torch.int32))


def _waterfill(other_Xn: torch.Tensor, c_X: torch.Tensor, before_nn: torch.Tensor) -> torch.Tensor:
    """Per row x: split c_x over the columns to level `other` (their current loads); integer.

    No sort: column j's position in ascending (load, j) order and the load sum up to it come from
    an [X, n, n] pairwise comparison (n is small). The active columns are the first k with
    k * O_(k) - sum_{i<=k} O_(i) <= c; they are raised to floor((c + sum) / k), the remainder going
    one token each to the lowest-ordered ones. Columns at _BIG never receive anything.
    """
    o_i = other_Xn[:, :, None]  # j
    o_j = other_Xn[:, None, :]  # j'
    prec = (o_j < o_i) | ((o_j == o_i) & before_nn)  # j' strictly before j in sorted order
    pos = prec.sum(-1)  # 0-based sorted position
    psum = torch.where(prec, o_j, 0).sum(-1) + other_Xn  # sum of loads up to and including j
    active = (pos + 1) * other_Xn - psum <= c_X[:, None]
    k = active.sum(-1)
    tot = c_X + torch.where(active, other_Xn, 0).sum(-1)
    level = torch.div(tot, k, rounding_mode="floor")
    rem = tot - level * k
    return torch.where(active, level[:, None] - other_Xn + (pos < rem[:, None]), 0)


def _round_rows(q_fp: torch.Tensor, c_E: torch.Tensor, before_nn: torch.Tensor) -> torch.Tensor:
    """Integer quotas proportional to the fixed-point q_fp, each row summing to c_e exactly
    (largest remainder; ties to the lower rank)."""
    row = q_fp.sum(1, keepdim=True).clamp(min=1)
    num = q_fp * c_E[:, None]
    base = torch.div(num, row, rounding_mode="floor")
    frac = num - base * row
    short = c_E - base.sum(1)  # < number of replicas
    f_i, f_j = frac[:, :, None], frac[:, None, :]
    ahead = ((f_j > f_i) | ((f_j == f_i) & before_nn)).sum(-1)  # rank of j by remainder, desc
    return base + ((ahead < short[:, None]) & (q_fp > 0))
