"""The attention side of the routed experts across ranks: a MoEBackend over the exchange.

``send(layer, u, ...)`` picks replicas (ExpertRouter) and dispatches micro-batch u on channel u;
``recv(layer, u)`` combines it. The model calls recv(u) just before u's next layer, so the
exchange of u is in flight while this rank computes attention for u + 1. A colocated rank also
serves its own expert share right after dispatching (its slice of every rank's tokens).
"""

from __future__ import annotations

from afsplit.models.moe_model import ExpertModel, MoEBackend
from afsplit.runtime.router import ExpertRouter
from afsplit.runtime.timing import PhaseTimes


class RemoteExperts(MoEBackend):
    def __init__(self, exchange, router: ExpertRouter, local_experts: ExpertModel | None, times: PhaseTimes):
        self.exchange = exchange
        self.router = router
        self.local_experts = local_experts  # colocated: this rank's own expert slots
        self.times = times
        self._inflight: dict[int, tuple] = {}  # micro-batch -> (handle, local partials or None)

    def agree_step(self, max_tokens, decode_only):
        if self.exchange.needs_vote:
            return self.exchange.agree_step(max_tokens, decode_only)
        if self.exchange.world > 1:
            return max_tokens, False  # no vote: no rank may pad to a bucket (they would not agree)
        return max_tokens, decode_only

    def begin_step(self, tokens_hint):
        self.exchange.begin_step(tokens_hint)

    @property
    def graph_safe(self) -> bool:
        return self.exchange.graph_safe

    def end_step(self):
        self.exchange.drain()  # a dead peer fails here, by name, before sampling reads the logits

    def send(self, layer, micro_batch, x, ids, weights):
        ex = self.exchange
        with self.times.phase("dispatch"):
            dest, slot = self.router.assign(layer, ids, ex.channels[micro_batch])
            h = ex.dispatch(x, dest, slot, weights, layer, channel=micro_batch)
        partial = None
        if self.local_experts is not None:
            with self.times.phase("experts"):
                b = h.batch
                partial = self.local_experts(layer, b.x, b.topk_ids, b.topk_weights)
        self._inflight[micro_batch] = (h, partial)

    def recv(self, layer, micro_batch):
        h, partial = self._inflight.pop(micro_batch)
        with self.times.phase("combine"):
            return self.exchange.combine(partial, h)
