"""The expert side (AF mode): serves every MoE layer's micro-batches of one engine step.

Per layer and micro-batch u, on channel u: receive (dispatch), fused MoE over the local slots,
send back (combine). Channels are independent, so u + 1's rows arrive while u is computed.
Decode steps padded to a bucket (afsplit/cuda_graphs.py) replay one CUDA graph of the whole step
per (micro-batches, bucket): the region sizes are all the expert side needs to know.
"""

from __future__ import annotations

import os

import torch

from afsplit.cuda_graphs import GraphCache, step_tokens_hint
from afsplit.models.moe_model import ExpertModel
from afsplit.models.spec import ModelSpec
from afsplit.runtime.timing import PhaseTimes


class ExpertServer:
    def __init__(self, exchange, spec: ModelSpec, experts: ExpertModel, micro_batches: int, times: PhaseTimes,
                 max_batch: int, graphs: GraphCache | None = None):
        self.exchange = exchange
        self.spec = spec
        self.experts = experts
        self.micro_batches = micro_batches
        self.times = times
        self.max_batch = max_batch  # runtime.max_num_seqs: the bucket rule's bound, as on attention ranks
        self.graphs = graphs if exchange.graph_safe else None
        self.fault: int | None = None  # fault injection (tests): a signal this rank sends itself mid-step

    @torch.inference_mode()
    def serve_step(self) -> None:
        """Run one engine step's worth of MoE layers (collective with the attention ranks)."""
        ex = self.exchange
        max_tokens, all_decode = ex.agree_step(0, True) if ex.needs_vote else (ex.max_tokens, False)
        hint, graphable = step_tokens_hint(max_tokens, all_decode, self.max_batch, ex.max_tokens)
        ex.begin_step(hint)
        if graphable and self.graphs is not None:
            self.graphs.run((self.micro_batches, hint), self._serve)
        else:
            self._serve()
        ex.drain()

    def _serve(self) -> None:
        ex = self.exchange
        for layer in self.spec.moe_layer_ids:
            for u in range(self.micro_batches):
                with self.times.phase("dispatch"):
                    h = ex.dispatch(None, None, None, None, layer, channel=u)
                if self.fault is not None:  # mid-step: the attention ranks wait for this layer's combine
                    sig, self.fault = self.fault, None
                    os.kill(os.getpid(), sig)
                with self.times.phase("experts"):
                    y = self.experts(layer, h.batch.x, h.batch.topk_ids, h.batch.topk_weights)
                with self.times.phase("combine"):
                    ex.combine(y, h)
        ex.join()
