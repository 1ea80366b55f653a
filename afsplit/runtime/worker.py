"""One rank of the disaggregated runtime, started by torchrun (or by the single-host cluster simulation).

Every engine step runs in lockstep on all ranks:

1. the coordinator (the first attention rank) broadcasts a step plan over the CPU control group:
   new requests, each assigned to the attention rank with the most free KV capacity, or stop;
2. attention ranks schedule and run their own batch (possibly empty: they still join every MoE
   collective with zero tokens); expert ranks serve every MoE layer's micro-batches;
3. attention ranks report finished requests, free KV blocks and whether work is left; the
   coordinator gathers the reports and the finished results.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afsplit.config import Config, validate
from afsplit.engine import LLMEngine, RequestOutput, resolve_model
from afsplit.errors import RequestError
from afsplit.models.moe_model import ExpertModel
from afsplit.models.weights import load_expert_weights
from afsplit.runtime.moe_exchange import ExpertServer, RemoteMoE, RoutedExperts
from afsplit.sequence import Sequence

log = logging.getLogger("afsplit.runtime")


@dataclass
class StepPlan:
    stop: bool = False
    assign: dict[int, list[Sequence]] = field(default_factory=dict)  # attention rank -> new sequences


@dataclass
class StepReport:
    finished: list[Sequence] = field(default_factory=list)
    free_blocks: int = 0
    demand_blocks: int = 0  # blocks the waiting prompts will need
    has_work: bool = False
    scheduled_tokens: int = 0
    step_s: float = 0.0


def micro_batch_count(config: Config) -> int:
    m = config.runtime.micro_batches
    return 2 if m == "auto" else int(m)


class RankRuntime:
    """Builds this rank's role (attention, expert or both) and runs the step loop."""

    def __init__(self, config: Config):
        from comm.balancer import LeastLoadedBalancer
        from comm.communicator import MoECommunicator
        from comm.groups import init_distributed
        from comm.placement import resolve_placement

        self.config = config
        topo = config.topology.topology
        validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        self.ctx = init_distributed(topo, backend=config.comm.backend, timeout_s=config.comm.timeout_s,
                                    device=config.topology.device, config_fingerprint=config.to_dict())
        self.topo, self.rank = topo, self.ctx.rank
        self.coordinator = topo.attention_ranks[0]
        # every rank must take part in creating each group
        self.attention_group = dist.new_group(list(topo.attention_ranks))
        spec, source = resolve_model(config)
        self.spec = spec
        self.m = micro_batch_count(config)
        self.placement = resolve_placement(config.balancer, spec.num_moe_layers, spec.num_experts, topo)
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config.model.dtype]
        self.comm = MoECommunicator(self.ctx, spec.hidden_size, spec.top_k, dtype,
                                    max_tokens_per_rank=config.runtime.max_num_batched_tokens,
                                    transport=config.comm.transport, timeout_s=config.comm.timeout_s)
        experts = None
        if self.ctx.is_expert:
            j = topo.expert_index(self.rank)
            mine = {layer: self.placement.slots(i, j) for i, layer in enumerate(spec.moe_layer_ids)}
            experts = ExpertModel(load_expert_weights(source, spec, dtype, self.ctx.device, mine))
        self.engine = None
        self.server = None
        if self.ctx.is_attention:
            routing = RoutedExperts(spec, self.placement, LeastLoadedBalancer(self.placement, self.ctx.device),
                                    topo.attention_index(self.rank), self.attention_group)
            moe = RemoteMoE(self.comm, routing, experts)
            self.engine = LLMEngine(config, build_moe=lambda *_: moe, device=self.ctx.device,
                                    micro_batches=self.m, spec_and_source=(spec, source))
        else:
            self.server = ExpertServer(self.comm, spec, experts, self.m)
        log.info("rank %d ready: %s, %d micro-batch(es), transport %s", self.rank, topo.role_of(self.rank),
                 self.m, config.comm.transport)

    # -- control plane -------------------------------------------------------------------------

    def _broadcast(self, plan: StepPlan | None) -> StepPlan:
        box = [plan]
        dist.broadcast_object_list(box, src=self.coordinator, group=self.ctx.control_group)
        return box[0]

    def _gather(self, report: StepReport | None) -> list[StepReport | None] | None:
        out = [None] * self.ctx.world_size if self.rank == self.coordinator else None
        dist.gather_object(report, out, dst=self.coordinator, group=self.ctx.control_group)
        return out

    def _attention_step(self, plan: StepPlan) -> StepReport:
        engine = self.engine
        for seq in plan.assign.get(self.rank, []):
            engine.scheduler.add(seq)
        start = time.perf_counter()
        finished = engine.step(lockstep=True)
        kv = engine.kv
        demand = sum(kv.blocks_for(s.num_tokens) for s in engine.scheduler.waiting)
        return StepReport(finished=finished, free_blocks=kv.num_free_blocks, demand_blocks=demand,
                          has_work=engine.scheduler.has_work(), step_s=time.perf_counter() - start)

    # -- the loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        """Non-coordinator ranks: follow the coordinator's plans until it says stop."""
        # Fault injection for the failure tests: this rank dies after N steps.
        die_after = int(os.environ.get("AFSPLIT_FAULT_AFTER_STEPS", "-1"))
        if os.environ.get("AFSPLIT_FAULT_EXIT_RANK") != str(self.rank):
            die_after = -1
        steps = 0
        while True:
            if steps == die_after:
                log.error("rank %d: fault injection: exiting", self.rank)
                os._exit(1)
            steps += 1
            plan = self._broadcast(None)
            if plan.stop:
                return
            if self.engine is not None:
                report = self._attention_step(plan)
            else:
                self.server.serve_step()
                report = None
            self._gather(report)

    def generate(self, prompts: list, params: list, use_tqdm: bool = True) -> list[RequestOutput]:
        """Coordinator: spread requests over attention ranks by free KV capacity, step until all finish."""
        engine = self.engine
        results: list[RequestOutput | None] = [None] * len(prompts)
        index: dict[int, int] = {}
        pending: list[Sequence] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                seq = engine.make_sequence(prompt, p)
                index[seq.request_id] = i
                pending.append(seq)
            except RequestError as e:
                results[i] = RequestOutput(request_id=-1, prompt=prompt if isinstance(prompt, str) else None,
                                           prompt_token_ids=[], error=str(e))
                log.error("%s", e)
        att = list(self.topo.attention_ranks)
        capacity = {a: engine.kv.allocator.num_blocks for a in att}
        busy = {a: False for a in att}
        bar = None
        if use_tqdm and pending:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc="generate", unit="req", dynamic_ncols=True)
        while True:
            plan = StepPlan()
            for seq in pending:  # most free capacity first; a prompt's blocks are its demand
                a = max(att, key=lambda r: (capacity[r], -att.index(r)))
                plan.assign.setdefault(a, []).append(seq)
                capacity[a] -= engine.kv.blocks_for(seq.num_tokens)
            pending = []
            plan.stop = not plan.assign and not any(busy.values())
            self._broadcast(plan)
            if plan.stop:
                break
            reports = self._gather(self._attention_step(plan))
            for a in att:
                rep = reports[a]
                capacity[a] = rep.free_blocks - rep.demand_blocks
                busy[a] = rep.has_work
                for seq in rep.finished:
                    results[index[seq.request_id]] = engine.request_output(seq)
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return results

    def shutdown(self) -> None:
        close = getattr(self.comm, "close", None)
        if close:
            close()
        self.ctx.shutdown()
