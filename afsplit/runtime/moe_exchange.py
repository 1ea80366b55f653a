"""Routed experts across processes: the attention side's MoE exchange and the expert side's server.

Per MoE layer and micro-batch every rank makes the same two collective calls, in the same order:

    attention rank: balancer -> comm.dispatch(x) ...... (attention of the next micro-batch) ...... comm.combine -> y
    expert rank:                comm.dispatch -> fused_moe over local slots -> comm.combine(partials)

A colocated rank is both: it dispatches its tokens, serves its own share, combines.
"""

from __future__ import annotations

import torch

from afsplit.cuda_graphs import GraphCache, step_tokens_hint
from afsplit.models.moe_model import ExpertModel, MoEExchange
from afsplit.models.spec import ModelSpec
from afsplit.runtime.timing import PhaseTimes


def needs_token_vote(comm) -> bool:
    """Adaptive transport choice and padded buffers need every rank's largest micro-batch, agreed once per step."""
    return comm.transport == "adaptive" or comm.metadata == "padded"


class RoutedExperts:
    """Maps logical expert ids to (expert rank, slot) with the balancer, and records statistics."""

    def __init__(self, spec: ModelSpec, placement, balancer, attention_index: int, counts_group=None, stats=None):
        self.spec = spec
        self.placement = placement
        self.balancer = balancer
        self.attention_index = attention_index
        self.counts_group = counts_group  # attention ranks' group, for the per-micro-batch count exchange
        self.stats = stats
        self.moe_index = {layer: i for i, layer in enumerate(spec.moe_layer_ids)}
        # replicated layers exchange per-micro-batch counts and split tokens by them (not masked-row safe)
        self.placement_replicated = placement.has_replicas()

    def assign(self, layer: int, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dest expert index [T, K], local slot [T, K]) for logical ids of one micro-batch."""
        from comm.balancer import gather_counts, local_counts

        moe_layer = self.moe_index[layer]
        counts_AE = None
        if self.placement.has_replicas(moe_layer):
            counts_AE = gather_counts(local_counts(ids_TK, self.spec.num_experts), self.counts_group)
        dest_TK, slot_TK = self.balancer.assign(moe_layer, ids_TK, counts_AE, self.attention_index)
        if self.stats is not None:
            self.stats.record(moe_layer, ids_TK, dest_TK)
        return dest_TK, slot_TK


class RemoteMoE(MoEExchange):
    """Attention side of an MoE layer: send a micro-batch's tokens now, collect the sum of partials later.

    Every rank must issue the collectives in the same order; an expert rank serves micro-batch u
    completely (dispatch, compute, combine) before u + 1, so this side issues
    dispatch(u), combine(u - 1)... in that order too: ``send(u)`` first queues the combine of
    u - 1, then the dispatch of u. Both run in the communicator's background queue while this
    rank computes attention for the next micro-batch (ping-pong). In colocated mode this rank
    also serves its own expert share between its dispatch and its combine.
    """

    def __init__(self, comm, routing: RoutedExperts, local_experts: ExpertModel | None, times: PhaseTimes):
        self.comm = comm
        self.routing = routing
        self.times = times
        self.local_experts = local_experts  # colocated: this rank's own expert slots
        self._dispatched: list[int] = []  # layers dispatched whose combine is not issued yet (AF)
        self._dispatches: list = []  # dispatch handles (AF), waited on in recv to surface errors
        self._combines: list = []  # combine handles, in micro-batch order
        self.tokens_hint: int | None = None

    def agree_step(self, max_tokens, decode_only):
        if needs_token_vote(self.comm):
            return self.comm.agree_step(max_tokens, decode_only)
        return max_tokens, False  # no vote: no rank may pad to a bucket (they would not agree)

    def begin_step(self, tokens_hint):
        self.tokens_hint = tokens_hint if needs_token_vote(self.comm) else None

    @property
    def graph_safe(self) -> bool:
        """A forward through this exchange can be captured: no host sync, no statistics on the host."""
        # padded regions (bucket-sized, masked rows routed nowhere); captured only on NCCL's inline path
        capturable = self.comm.inline or not self.comm.nccl
        return (self.comm.metadata == "padded" and capturable and self.routing.stats is None
                and not self.routing.placement_replicated)

    def end_step(self):
        self.comm.drain()  # a dead peer fails here, by name, before sampling reads the logits

    def _issue_combines(self) -> None:
        while self._dispatched:
            self._combines.append(self.comm.combine_async(None, self._dispatched.pop(0)))

    def send(self, layer, micro_batch, x, ids, weights):
        with self.times.phase("dispatch"):
            dest, slot = self.routing.assign(layer, ids)
            if self.local_experts is None:
                self._issue_combines()
                self._dispatches.append(self.comm.dispatch_async(x, dest, slot, weights, layer,
                                                                 tokens_hint=self.tokens_hint))
                self._dispatched.append(layer)
                return
            # through the communicator's queue, behind the previous micro-batch's combine (one channel, one order)
            batch = self.comm.dispatch_async(x, dest, slot, weights, layer, tokens_hint=self.tokens_hint).wait()
        with self.times.phase("experts"):
            partial = self.local_experts(layer, batch.x, batch.topk_ids, batch.topk_weights)
        with self.times.phase("dispatch"):
            self._combines.append(self.comm.combine_async(partial, layer))

    def recv(self, layer, micro_batch):
        with self.times.phase("combine"):
            if not self._combines:
                self._issue_combines()
            if self._dispatches:
                self._dispatches.pop(0).wait()
            return self._combines.pop(0).wait()


class ExpertServer:
    """Expert side (AF mode): serves every MoE layer's micro-batches of one engine step.

    Decode steps padded to a bucket (afsplit/cuda_graphs.py) replay one CUDA graph of the whole
    step per (micro-batches, bucket): the region sizes are all the expert side needs to know.
    """

    def __init__(self, comm, spec: ModelSpec, experts: ExpertModel, micro_batches: int, times: PhaseTimes,
                 max_batch: int, graphs: GraphCache | None = None):
        self.comm = comm
        self.spec = spec
        self.experts = experts
        self.micro_batches = micro_batches
        self.times = times
        self.max_batch = max_batch  # runtime.max_num_seqs: the bucket rule's bound, as on attention ranks
        self.graphs = graphs if comm.inline else None

    @torch.inference_mode()
    def serve_step(self) -> int:
        """Run one engine step's worth of MoE layers; returns the number of rows served (padding included)."""
        hint, graphable = None, False
        if needs_token_vote(self.comm):
            max_tokens, all_decode = self.comm.agree_step(0, True)
            hint, graphable = step_tokens_hint(max_tokens, all_decode, self.max_batch, self.comm.max_tokens)
        if graphable and self.graphs is not None:
            self.graphs.run((self.micro_batches, hint), lambda: self._serve(hint))
            served = hint * len(self.comm.topo.attention_ranks) * self.micro_batches * len(self.spec.moe_layer_ids)
        else:
            served = self._serve(hint)
        self.comm.drain()
        return served

    def _serve(self, hint: int | None) -> int:
        served = 0
        for layer in self.spec.moe_layer_ids:
            for _ in range(self.micro_batches):
                with self.times.phase("dispatch"):
                    batch = self.comm.dispatch(None, None, None, None, layer, tokens_hint=hint)
                with self.times.phase("experts"):
                    y = self.experts(layer, batch.x, batch.topk_ids, batch.topk_weights)
                with self.times.phase("combine"):
                    self.comm.combine(y, layer)
                served += batch.x.shape[0]
        return served
