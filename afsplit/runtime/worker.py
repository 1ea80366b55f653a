"""One rank of the disaggregated runtime, started by torchrun (or by the single-host cluster simulation).

Every engine step runs in lockstep on all ranks (the loop itself is afsplit/runtime/coordinator.py):
the coordinator broadcasts a step plan over the CPU control group, every rank runs its part of the
step (:meth:`RankRuntime.run_step`: attention ranks their own batch, possibly empty, still joining
every MoE collective with zero tokens; expert ranks every MoE layer's micro-batches) and reports
back. Ranks other than the coordinator follow plans in :meth:`RankRuntime.serve` until told to stop.
"""

from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist

from afsplit.config import Config, validate
from afsplit.cuda_graphs import GraphCache, graphs_wanted, warm_up_requests
from afsplit.engine import DTYPES, LLMEngine, RequestOutput, resolve_model, run_to_completion
from afsplit.models.moe_model import ExpertModel
from afsplit.models.weights import load_expert_weights
from afsplit.placement_file import resolve_placement
from afsplit.runtime.expert_server import ExpertServer
from afsplit.runtime.remote_experts import RemoteExperts
from afsplit.runtime.coordinator import Coordinator, StepPlan
from afsplit.runtime.micro_batches import MAX_MICRO_BATCHES, fixed_micro_batches
from afsplit.runtime.router import ExpertRouter
from afsplit.runtime.stats import StepReport
from afsplit.runtime.timing import PhaseTimes
from afsplit.sequence import SeqUpdate
from comm.exchange import MoEExchange
from comm.expert_stats import ExpertStatsRecorder
from comm.groups import init_distributed

log = logging.getLogger("afsplit.runtime")


def _control_plane(runtime: "RankRuntime"):
    """The rank's ControlPlane over the control group, made on first use (comm/control.py)."""
    plane = getattr(runtime, "_control", None)
    if plane is None:
        from comm.control import ControlPlane

        plane = runtime._control = ControlPlane(runtime.ctx.control_group, runtime.rank, runtime.ctx.world_size,
                                                runtime.coordinator, runtime.config.comm.timeout_s,
                                                runtime.topo.role_of)
    return plane


class RankRuntime:
    """Builds this rank's role (attention, expert or both) and runs the step loop."""

    def __init__(self, config: Config, ctx=None):
        """`ctx`: process groups made earlier (tests run many configurations over one world); default: join
        the world described by torchrun's environment."""
        self.config = config
        topo = config.topology.topology
        validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        self.owns_ctx = ctx is None
        self.ctx = ctx if ctx is not None else init_distributed(
            topo, backend=config.comm.backend, timeout_s=config.comm.timeout_s, device=config.topology.device,
            config_fingerprint=config.to_dict())
        self.topo, self.rank = topo, self.ctx.rank
        self.coordinator = topo.attention_ranks[0]
        # every rank must take part in creating each group (the attention ranks sum statistics over it)
        stats = bool(config.balancer.stats_path) and self.ctx.world_size > 1
        self.attention_group = dist.new_group(list(topo.attention_ranks)) if stats else None
        spec, source = resolve_model(config)
        self.spec = spec
        self.m = fixed_micro_batches(config.runtime.micro_batches, distributed=True) or MAX_MICRO_BATCHES
        self.placement = resolve_placement(config.balancer, spec.num_moe_layers, spec.num_experts, topo)
        dtype = DTYPES[config.model.dtype]
        router = None
        self.expert_stats = None
        if self.ctx.is_attention:
            if config.balancer.stats_path:
                self.expert_stats = ExpertStatsRecorder(spec.num_moe_layers, spec.num_experts,
                                                        len(topo.expert_ranks), self.ctx.device)
            router = ExpertRouter(spec, self.placement, self.ctx.device, topo.attention_index(self.rank),
                                  len(topo.attention_ranks), self.expert_stats)
        # every rank builds the same channel groups: whether attention groups exist must not depend on the role
        count_groups = ExpertRouter.needs_count_groups(self.placement, len(topo.attention_ranks))
        self.exchange = MoEExchange(self.ctx, spec.hidden_size, spec.top_k, dtype,
                                    max_tokens_per_rank=config.runtime.max_num_batched_tokens,
                                    transport=config.comm.transport, metadata=config.comm.metadata,
                                    timeout_s=config.comm.timeout_s, channels=self.m, attention_groups=count_groups,
                                    intra_node=config.comm.intra_node)
        experts = None
        if self.ctx.is_expert:
            j = topo.expert_index(self.rank)
            mine = {layer: self.placement.slots(i, j) for i, layer in enumerate(spec.moe_layer_ids)}
            experts = ExpertModel(load_expert_weights(source, spec, dtype, self.ctx.device, mine))
        self.engine = None
        self.server = None
        self.times = PhaseTimes(self.ctx.device, sync=config.runtime.profile)
        if self.ctx.is_attention:
            moe = RemoteExperts(self.exchange, router, experts, self.times)
            self.engine = LLMEngine(config, build_moe=lambda *_: moe, device=self.ctx.device,
                                    micro_batches=1, spec_and_source=(spec, source))
        else:
            use_graphs, capture = graphs_wanted(config.runtime.cuda_graphs and not config.runtime.profile,
                                                self.ctx.device)
            graphs = GraphCache(self.ctx.device, capture, name="expert step") if use_graphs else None
            self.server = ExpertServer(self.exchange, spec, experts, 1, self.times, config.runtime.max_num_seqs,
                                       graphs)
        self.coord = Coordinator(self) if self.rank == self.coordinator else None
        log.info("rank %d ready: %s, %s micro-batch(es), transport %s", self.rank, topo.role_of(self.rank),
                 config.runtime.micro_batches, config.comm.transport)

    # -- control plane -------------------------------------------------------------------------

    def broadcast(self, plan: StepPlan | None) -> StepPlan:
        """The coordinator's plan to every rank, over the control plane (comm/control.py: a dead or
        silent peer raises CommError naming it). A follower waits without a deadline for its first plan
        (ranks finish loading at different times), then at most comm.timeout_s for each next one: an
        idle coordinator keeps them alive with StepPlan(idle=True) at least every comm.timeout_s / 2
        (`self.last_plan_s` is when it last sent one)."""
        if self.ctx.world_size == 1:
            return plan
        plane = _control_plane(self)
        if self.rank == self.coordinator:
            self.last_plan_s = time.monotonic()
            return plane.broadcast(plan, what="step plan")
        first, self._had_plan = not getattr(self, "_had_plan", False), True
        return plane.broadcast(None, what="step plan", timeout_s=None if first else "default")

    def gather(self, report: StepReport) -> list[StepReport] | None:
        """Every rank's report, on the coordinator, each within comm.timeout_s (comm/control.py)."""
        if self.ctx.world_size == 1:
            return [report]
        return _control_plane(self).gather(report, what="step report")

    # -- one step of this rank -------------------------------------------------------------------

    def run_step(self, plan: StepPlan) -> StepReport:
        report = self._attention_step(plan) if self.engine is not None else self._expert_step(plan)
        if plan.dump_stats:
            self.dump_expert_stats()
        return report

    def _attention_step(self, plan: StepPlan) -> StepReport:
        engine = self.engine
        for rid in plan.abort:
            engine.abort_request(rid)
        for seq in plan.assign.get(self.rank, []):
            engine.add_sequence(seq)
        engine.runner.micro_batches = plan.micro_batches
        start = self.times.now()
        updates = engine.step(lockstep=True)
        step_s = self.times.now() - start
        aborted = [SeqUpdate(rid, [], "abort") for rid in plan.abort]
        kv = engine.kv
        demand = sum(kv.blocks_for(s.num_tokens) for s in engine.scheduler.waiting)
        tokens, decodes = engine.last_step
        return StepReport(updates=aborted + updates, free_blocks=kv.num_free_blocks, demand_blocks=demand,
                          has_work=engine.scheduler.has_work(), tokens=tokens, decodes=decodes, step_s=step_s,
                          phases=self.times.take(), num_running=len(engine.scheduler.running),
                          num_waiting=len(engine.scheduler.waiting))

    def _expert_step(self, plan: StepPlan) -> StepReport:
        self.server.micro_batches = plan.micro_batches
        start = self.times.now()
        self.server.serve_step()
        return StepReport(step_s=self.times.now() - start, phases=self.times.take())

    # -- the loops -----------------------------------------------------------------------------

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
            plan = self.broadcast(None)
            if plan.stop:
                self.dump_expert_stats()
                return
            if plan.idle:  # an idle coordinator is still there: no step, nothing to report
                continue
            self.gather(self.run_step(plan))

    def generate(self, prompts: list, params: list, use_tqdm: bool = True, last: bool = True) -> list[RequestOutput]:
        """Coordinator: run every prompt to completion over the cluster (see Coordinator).

        `last=False` leaves the other ranks serving (no stop plan), so another generate can follow."""
        results = run_to_completion(self.coord, self.engine, prompts, params, use_tqdm)
        if last:
            self.coord.stop()
        log.info("run stats: %s", self.stats.summary())
        return results

    @property
    def stats(self):
        return self.coord.stats

    def warm_up(self, prompts: list) -> None:
        """Coordinator: run `prompts` for 3 tokens each (see cuda_graphs.warm_up_requests), then forget
        the run's statistics; the other ranks keep serving."""
        self.generate(*warm_up_requests(prompts), use_tqdm=False, last=False)
        self.coord.reset_stats()

    def dump_expert_stats(self) -> None:
        """Attention ranks sum their activation counts; the coordinator appends them to balancer.stats_path."""
        rec = self.expert_stats
        if rec is None:
            return
        if self.attention_group is not None:
            rec.all_reduce(self.attention_group)
        if self.rank == self.coordinator:
            rec.dump(self.config.balancer.stats_path)
            log.info("expert activation counts appended to %s", self.config.balancer.stats_path)

    def shutdown(self, abort: bool = False) -> None:
        """Idempotent; `abort` after a failure: do not wait for peers."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.exchange.close()
        caches = [self.server.graphs if self.server is not None else None,
                  self.engine.runner.static.graphs if self.engine is not None and self.engine.runner.static else None]
        captured = False
        for cache in filter(None, caches):
            try:
                captured |= cache.reset()
            except Exception as e:  # noqa: BLE001 -- on the way out; the abort below still runs
                log.warning("freeing CUDA graphs failed: %s", e)
                captured = True
        # captured NCCL collectives can make an orderly communicator teardown wait forever: abort instead
        # (every step was drained, so nothing is in flight)
        if self.owns_ctx:
            self.ctx.shutdown(abort=abort or captured)
