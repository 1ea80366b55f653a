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
import signal
import time

import torch
import torch.distributed as dist

from afsplit.config import Config, validate
from afsplit.cuda_graphs import GraphCache, graphs_wanted, warm_up_requests
from afsplit.engine import DTYPES, LLMEngine, RequestOutput, resolve_model, run_to_completion
from afsplit.models.moe_model import ExpertModel
from afsplit.models.weights import load_expert_weights
from afsplit.placement_file import resolve_placement
from afsplit.runtime.expert_server import ExpertServer
from afsplit.runtime.remote_experts import RemoteExperts
from afsplit.runtime.coordinator import Coordinator, StepPlan, SyncAnswer
from afsplit.runtime.failover import ExpertsLost, Failover, is_comm_failure
from afsplit.runtime.micro_batches import MAX_MICRO_BATCHES, fixed_micro_batches
from afsplit.runtime.router import ExpertRouter
from afsplit.runtime.stats import StepReport
from afsplit.runtime.timing import PhaseTimes
from afsplit.sequence import SeqUpdate
from comm.exchange import MoEExchange
from comm.expert_stats import ExpertStatsRecorder
from comm.groups import init_distributed
from comm.placement import default_capacity

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
        self.spec, self.source = spec, source
        self.m = fixed_micro_batches(config.runtime.micro_batches, distributed=True) or MAX_MICRO_BATCHES
        self.placement = resolve_placement(config.balancer, spec.num_moe_layers, spec.num_experts, topo)
        # slots per expert rank, fixed for the job (a failover may fill spare ones, never more)
        self.slot_capacity = max(self.placement.slots_per_rank,
                                 default_capacity(spec.num_experts, len(topo.expert_ranks),
                                                  config.balancer.spare_slots_per_rank))
        self.dtype = dtype = DTYPES[config.model.dtype]
        self.expert_stats = None
        if self.ctx.is_attention and config.balancer.stats_path:
            self.expert_stats = ExpertStatsRecorder(spec.num_moe_layers, spec.num_experts,
                                                    len(topo.expert_ranks), self.ctx.device)
        router = self._build_exchange()
        experts = None
        if self.ctx.is_expert:
            j = topo.expert_index(self.rank)
            mine = {layer: self.placement.slots(i, j) for i, layer in enumerate(spec.moe_layer_ids)}
            experts = ExpertModel(load_expert_weights(source, spec, dtype, self.ctx.device, mine))
        self.experts = experts
        self.engine = None
        self.server = None
        self.times = PhaseTimes(self.ctx.device, sync=config.runtime.profile)
        if self.ctx.is_attention:
            moe = self._remote = RemoteExperts(self.exchange, router, experts, self.times)
            self.engine = LLMEngine(config, build_moe=lambda *_: moe, device=self.ctx.device,
                                    micro_batches=1, spec_and_source=(spec, source))
        else:
            use_graphs, capture = graphs_wanted(config.runtime.cuda_graphs and not config.runtime.profile,
                                                self.ctx.device)
            graphs = GraphCache(self.ctx.device, capture, name="expert step") if use_graphs else None
            self.server = ExpertServer(self.exchange, spec, experts, 1, self.times, config.runtime.max_num_seqs,
                                       graphs)
        self.coord = Coordinator(self) if self.rank == self.coordinator else None
        self.applied_step = -1  # attention ranks: the last plan whose requests and aborts this rank took
        self.unacked: tuple[int, StepReport] | None = None  # (step, report) the coordinator may not have yet
        # failover replaces the default process group: only for a world this runtime made itself
        wanted = config.comm.failover and self.ctx.world_size > 1 and self.owns_ctx
        self.failover = Failover(self) if wanted else None
        self._fault = _injected_faults(self.rank)
        log.info("rank %d ready: %s, %s micro-batch(es), transport %s", self.rank, topo.role_of(self.rank),
                 config.runtime.micro_batches, config.comm.transport)

    def _build_exchange(self) -> ExpertRouter | None:
        """The exchange over the current world, and the router (attention ranks) over the current placement."""
        config, spec, topo = self.config, self.spec, self.topo
        router = None
        if self.ctx.is_attention:
            router = ExpertRouter(spec, self.placement, self.ctx.device, topo.attention_index(self.rank),
                                  len(topo.attention_ranks), self.expert_stats)
        # every rank builds the same channel groups: whether attention groups exist must not depend on the role
        count_groups = ExpertRouter.needs_count_groups(self.placement, len(topo.attention_ranks))
        self.exchange = MoEExchange(self.ctx, spec.hidden_size, spec.top_k, self.dtype,
                                    max_tokens_per_rank=config.runtime.max_num_batched_tokens,
                                    transport=config.comm.transport, metadata=config.comm.metadata,
                                    timeout_s=config.comm.timeout_s, channels=self.m, attention_groups=count_groups,
                                    intra_node=config.comm.intra_node)
        return router

    def comm_groups(self) -> list:
        """Every process group this rank uses in the current world (failover closes or buries them)."""
        groups = [self.ctx.data_group, self.ctx.control_group, self.attention_group]
        for ch in self.exchange.channels:
            groups += [ch.data_group, ch.attention_group, ch.header_group, ch.node_group]
        return [g for g in dict.fromkeys(groups) if g is not None]

    def rebuild(self, ctx, kept: list[int], dead: list[int]) -> int:
        """Go on in the world `ctx` of the survivors (kept[i]: old rank of new rank i; `dead`: launch-time ranks
        of the lost, for messages): remap the placement, load the experts that lost every replica, new exchange
        and router. Returns the number of experts loaded (on all survivors together)."""
        old_topo = self.topo
        kept_j = [old_topo.expert_index(r) for r in kept if old_topo.ranks[r].is_expert]
        placement, reloads, lost = self.placement.after_loss(kept_j, self.slot_capacity)
        if lost or not kept_j:
            what = ", ".join(f"layer {l} expert {e}" for l, e in lost[:6]) + (" ..." if len(lost) > 6 else "")
            raise ExpertsLost(f"failover impossible: it held the only replicas of {what or 'every expert'} and no "
                              f"surviving expert rank has a free slot ({self.slot_capacity} slots per rank = "
                              f"ceil(experts / expert ranks) + balancer.spare_slots_per_rank "
                              f"{self.config.balancer.spare_slots_per_rank}); give replicas (balancer.replicas: auto) "
                              "or spare slots to survive this", dead[0] if dead else None)
        new_index = {old: new for new, old in enumerate(kept)}
        self.exchange.close()
        self.ctx, self.topo, self.rank = ctx, ctx.topology, ctx.rank
        self.coordinator = new_index[self.coordinator]
        self.placement = placement
        self._control = None
        stats = bool(self.config.balancer.stats_path)
        self.attention_group = dist.new_group(list(self.topo.attention_ranks)) if stats else None
        if self.experts is not None:
            mine = reloads.get(self.topo.expert_index(self.rank), {})
            self._load_into_slots(mine)
        router = self._build_exchange()
        if self.engine is not None:
            backend = self._remote
            backend.exchange, backend.router = self.exchange, router
            backend._inflight.clear()  # the failed step's handles
            static = self.engine.runner.static
            if static is not None and static.graphs is not None:
                static.graphs.reset()  # captured over the old world's groups
        if self.server is not None:
            self.server.exchange = self.exchange
            if self.server.graphs is not None:
                self.server.graphs.reset()  # captured over the old world's groups
        if self.coord is not None:
            self.coord.renumber(new_index)
        return sum(len(v) for per_rank in reloads.values() for v in per_rank.values())

    def _load_into_slots(self, mine: dict[int, list[tuple[int, int]]]) -> None:
        """Load logical experts from the checkpoint into this rank's slots ({moe layer: [(slot, expert)]})."""
        w = self.experts.w
        for i, items in sorted(mine.items()):
            layer = self.spec.moe_layer_ids[i]
            ids = list(w.experts[layer])
            got = load_expert_weights(self.source, self.spec, self.dtype, self.ctx.device,
                                      {layer: [e for _s, e in items]})
            for k, (slot, e) in enumerate(items):
                if slot == len(ids):  # a spare slot: the stacked weights grow by one
                    ids.append(e)
                    w.w13[layer] = torch.cat([w.w13[layer], got.w13[layer][k:k + 1]])
                    w.w2[layer] = torch.cat([w.w2[layer], got.w2[layer][k:k + 1]])
                else:  # over a replica another rank still holds
                    ids[slot] = e
                    w.w13[layer][slot].copy_(got.w13[layer][k])
                    w.w2[layer][slot].copy_(got.w2[layer][k])
            w.experts[layer] = tuple(ids)

    def fail_over(self, exc: BaseException) -> dict:
        """Recover from a lost peer (afsplit/runtime/failover.py); re-raises `exc` when failover is off or it is
        not a comm failure."""
        if self.failover is None or not is_comm_failure(exc):
            raise exc
        return self.failover.recover(exc)

    def sync_answer(self, step: int) -> SyncAnswer | None:
        """What this rank has of step `step` after a recovery (attention ranks; None elsewhere)."""
        if self.engine is None:
            return None
        report = self.unacked[1] if self.unacked is not None and self.unacked[0] == step else None
        sched = self.engine.scheduler
        redo = len(sched.running) if self.applied_step == step and report is None else 0
        return SyncAnswer(self.applied_step, report, redo)

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
        self.applied_step = plan.step
        if plan.step in self._fault:  # fault injection (tests): this attention rank dies with its requests
            os.kill(os.getpid(), self._fault.pop(plan.step))
        engine.runner.micro_batches = plan.micro_batches
        start = self.times.now()
        updates = engine.step(lockstep=True)
        step_s = self.times.now() - start
        aborted = [SeqUpdate(rid, [], "abort") for rid in plan.abort]
        kv = engine.kv
        demand = sum(kv.blocks_for(s.num_tokens) for s in engine.scheduler.waiting)
        tokens, decodes = engine.last_step
        report = StepReport(updates=aborted + updates, free_blocks=kv.num_free_blocks, demand_blocks=demand,
                            has_work=engine.scheduler.has_work(), tokens=tokens, decodes=decodes, step_s=step_s,
                            phases=self.times.take(), num_running=len(engine.scheduler.running),
                            num_waiting=len(engine.scheduler.waiting))
        self.unacked = (plan.step, report)
        return report

    def _expert_step(self, plan: StepPlan) -> StepReport:
        self.server.micro_batches = plan.micro_batches
        start = self.times.now()
        self.server.fault = self._fault.get(plan.step)
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
            try:
                plan = self.broadcast(None)
                if plan.stop:
                    self.dump_expert_stats()
                    return
                if plan.idle:  # an idle coordinator is still there: no step, nothing to report
                    continue
                if plan.sync:  # after a recovery: what this rank has of the step that failed
                    self.gather(self.sync_answer(plan.step))
                    continue
                self.gather(self.run_step(plan))
            except Exception as e:  # noqa: BLE001 -- a lost peer: recover and follow the next plan
                self.fail_over(e)

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

    @property
    def failed_over(self) -> bool:
        """Whether this rank went through a recovery (its old world's groups are kept, never torn down)."""
        return self.failover is not None and self.failover.agreement.epoch > 0

    def shutdown(self, abort: bool = False) -> None:
        """Idempotent; `abort` after a failure: do not wait for peers."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.failover is not None:
            self.failover.stop()
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
        if self.owns_ctx and not self.failed_over:  # after a failover the process leaves with comm.groups.leave_process
            self.ctx.shutdown(abort=abort or captured)


FAULTS_ENV = "AFSPLIT_FAULTS"  # fault injection for the failover tests: "RANK@STEP:KILL|STOP,..."


def _injected_faults(rank: int) -> dict[int, int]:
    """{step: signal} this (launch-time) rank sends itself in that step (expert ranks: mid-step, after a
    dispatch; attention ranks: once the plan is taken)."""
    out = {}
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        who, _, rest = item.partition("@")
        step, _, sig = rest.partition(":")
        if int(who) == rank:
            out[int(step)] = getattr(signal, f"SIG{sig or 'KILL'}")
    return out
