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
from afsplit.cuda_graphs import GraphCache, graphs_wanted, warm_up_requests
from afsplit.engine import DTYPES, LLMEngine, RequestOutput, progress_bar, resolve_model
from afsplit.models.moe_model import ExpertModel
from afsplit.models.weights import load_expert_weights
from afsplit.runtime.moe_exchange import ExpertServer, RemoteMoE, RoutedExperts
from afsplit.runtime.timing import PhaseTimes
from afsplit.sequence import Sequence

log = logging.getLogger("afsplit.runtime")


@dataclass
class StepPlan:
    stop: bool = False
    assign: dict[int, list[Sequence]] = field(default_factory=dict)  # attention rank -> new sequences
    micro_batches: int = 1  # m for this step, the same on every rank


@dataclass
class StepReport:
    finished: list[Sequence] = field(default_factory=list)
    free_blocks: int = 0
    demand_blocks: int = 0  # blocks the waiting prompts will need
    has_work: bool = False
    tokens: int = 0  # tokens computed this step (attention ranks)
    decodes: int = 0  # of which single-token decodes
    step_s: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds by phase (see RunStats)


@dataclass
class RunStats:
    """What a run measured, as the coordinator saw it (also written by `afsplit generate --stats-json`)."""

    world_size: int
    steps: int = 0
    wall_s: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    decode_step_s: list = field(default_factory=list)  # wall time of steps that only decoded
    # seconds by role and phase, summed over ranks of that role and steps
    phase_s: dict = field(default_factory=lambda: {"attention": {}, "expert": {}})
    requests: list = field(default_factory=list)  # per finished request: Sequence.latency_metrics()
    ranks: dict = field(default_factory=lambda: {"attention": 0, "expert": 0})
    num_moe_layers: int = 0

    def add_report(self, role: str, rep: StepReport) -> None:
        acc = self.phase_s[role]
        busy = 0.0
        for name, sec in rep.phases.items():
            acc[name] = acc.get(name, 0.0) + sec
            busy += sec
        rest = "attention" if role == "attention" else "idle"  # attention compute is what comm does not take
        acc[rest] = acc.get(rest, 0.0) + max(0.0, rep.step_s - busy)

    def summary(self) -> dict:
        tpot = sorted(self.decode_step_s)
        out = {
            "steps": self.steps, "wall_s": self.wall_s, "generated_tokens": self.generated_tokens,
            "output_throughput": self.generated_tokens / self.wall_s if self.wall_s else 0.0,
            "tokens_per_s_per_gpu": self.generated_tokens / self.wall_s / self.world_size if self.wall_s else 0.0,
            "decode_step_ms_mean": 1e3 * sum(tpot) / len(tpot) if tpot else None,
            "decode_step_ms_median": 1e3 * tpot[len(tpot) // 2] if tpot else None,
            "gpus": self.world_size,
            "num_requests": len(self.requests),
        }
        out.update(aggregate_latency(self.requests))
        per_layer = {}
        for role, acc in self.phase_s.items():
            n = self.ranks[role] * self.steps * max(1, self.num_moe_layers)
            if n:
                per_layer[role] = {k: 1e3 * v / n for k, v in sorted(acc.items())}
        out["per_layer_ms"] = per_layer
        return out


def aggregate_latency(requests: list[dict]) -> dict:
    """mean/median/p99 of ttft_ms, tpot_ms, itl_ms, e2el_ms over requests (vLLM's benchmark names)."""
    out = {}
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        vals = sorted(v for r in requests for v in (r[name] if name == "itl_ms" else [r[name]]) if v is not None)
        if vals:
            out[f"mean_{name}"] = sum(vals) / len(vals)
            out[f"median_{name}"] = vals[len(vals) // 2]
            out[f"p99_{name}"] = vals[min(len(vals) - 1, int(0.99 * len(vals)))]
    return out


MAX_IDLE_STEPS = 100  # steps in a row with work queued but nothing scheduled before the run is stopped
AUTO_PROBE_STEPS = 3  # steps measured with m = 2 before `micro_batches: auto` decides
MAX_MICRO_BATCHES = 4


def micro_batch_count(config: Config) -> int:
    m = config.runtime.micro_batches
    return 2 if m == "auto" else int(m)


def choose_micro_batches(per_layer_ms: dict, m_probe: int) -> tuple[int, str]:
    """MegaScale-Infer's ping-pong rule from measured per-layer times: m >= 2 (Tf + Tc) / Tf, with
    Tf = the slower side's compute per micro-batch and Tc = one micro-batch's round trip beyond the
    expert compute (what ping-pong has to hide); at most MAX_MICRO_BATCHES."""
    att = per_layer_ms.get("attention", {})
    exp = per_layer_ms.get("expert", {})
    ta = att.get("attention", 0.0) / m_probe
    te = exp.get("experts", att.get("experts", 0.0)) / m_probe
    tf = max(ta, te, 1e-6)
    tc = max(0.0, att.get("combine", 0.0) / m_probe - te)
    m = max(1, min(MAX_MICRO_BATCHES, -(-2 * (tf + tc) // tf)))
    return int(m), f"Ta={ta:.3f} ms, Te={te:.3f} ms, Tc={tc:.3f} ms per layer and micro-batch -> m={int(m)}"


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
        dtype = DTYPES[config.model.dtype]
        self.comm = MoECommunicator(self.ctx, spec.hidden_size, spec.top_k, dtype,
                                    max_tokens_per_rank=config.runtime.max_num_batched_tokens,
                                    transport=config.comm.transport, timeout_s=config.comm.timeout_s,
                                    metadata=config.comm.metadata)
        experts = None
        if self.ctx.is_expert:
            j = topo.expert_index(self.rank)
            mine = {layer: self.placement.slots(i, j) for i, layer in enumerate(spec.moe_layer_ids)}
            experts = ExpertModel(load_expert_weights(source, spec, dtype, self.ctx.device, mine))
        self.engine = None
        self.server = None
        self.times = PhaseTimes(self.ctx.device, sync=config.runtime.profile)
        if self.ctx.is_attention:
            self.expert_stats = None
            if config.balancer.stats_path:
                from comm.expert_stats import ExpertStatsRecorder

                self.expert_stats = ExpertStatsRecorder(spec.num_moe_layers, spec.num_experts,
                                                        len(topo.expert_ranks), self.ctx.device)
            routing = RoutedExperts(spec, self.placement, LeastLoadedBalancer(self.placement, self.ctx.device),
                                    topo.attention_index(self.rank), self.attention_group, self.expert_stats)
            moe = RemoteMoE(self.comm, routing, experts, self.times)
            self.engine = LLMEngine(config, build_moe=lambda *_: moe, device=self.ctx.device,
                                    micro_batches=self.m, spec_and_source=(spec, source))
        else:
            use_graphs, capture = graphs_wanted(config.runtime.cuda_graphs and not config.runtime.profile,
                                                self.ctx.device)
            graphs = GraphCache(self.ctx.device, capture, name="expert step") if use_graphs else None
            self.server = ExpertServer(self.comm, spec, experts, self.m, self.times, config.runtime.max_num_seqs, graphs)
        self.stats = RunStats(world_size=self.ctx.world_size, num_moe_layers=spec.num_moe_layers)
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
        engine.runner.micro_batches = plan.micro_batches
        start = self.times.now()
        finished = engine.step(lockstep=True)
        step_s = self.times.now() - start
        kv = engine.kv
        demand = sum(kv.blocks_for(s.num_tokens) for s in engine.scheduler.waiting)
        tokens, decodes = engine.last_step
        return StepReport(finished=finished, free_blocks=kv.num_free_blocks, demand_blocks=demand,
                          has_work=engine.scheduler.has_work(), tokens=tokens, decodes=decodes, step_s=step_s,
                          phases=self.times.take())

    def _expert_step(self, plan: StepPlan) -> StepReport:
        self.server.micro_batches = plan.micro_batches
        start = self.times.now()
        self.server.serve_step()
        return StepReport(step_s=self.times.now() - start, phases=self.times.take())

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
                self._dump_expert_stats()
                return
            report = self._attention_step(plan) if self.engine is not None else self._expert_step(plan)
            self._gather(report)

    def generate(self, prompts: list, params: list, use_tqdm: bool = True, last: bool = True) -> list[RequestOutput]:
        """Coordinator: spread requests over attention ranks by free KV capacity, step until all finish.

        `last=False` leaves the other ranks serving (no stop plan), so another generate can follow."""
        engine = self.engine
        results, pending, index = engine.admit(prompts, params)
        att = list(self.topo.attention_ranks)
        capacity = {a: engine.kv.allocator.num_blocks for a in att}
        busy = {a: False for a in att}
        bar = progress_bar(len(pending), use_tqdm)
        stats = self.stats
        for a in att:
            stats.ranks["attention"] += 1
        stats.ranks["expert"] = len([r for r in self.topo.expert_ranks if r not in att])
        run_start = time.perf_counter()
        idle_steps = 0
        auto = self.config.runtime.micro_batches == "auto"
        probe = RunStats(world_size=stats.world_size, num_moe_layers=stats.num_moe_layers, ranks=stats.ranks)
        while True:
            plan = StepPlan(micro_batches=self.m)
            for seq in pending:  # most free capacity first; a prompt's blocks are its demand
                a = max(att, key=lambda r: (capacity[r], -att.index(r)))
                plan.assign.setdefault(a, []).append(seq)
                capacity[a] -= engine.kv.blocks_for(seq.num_tokens)
            pending = []
            stuck = idle_steps >= MAX_IDLE_STEPS
            plan.stop = stuck or (not plan.assign and not any(busy.values()))
            if plan.stop and not stuck and not last:
                break  # the other ranks wait for the next generate's first plan
            self._broadcast(plan)
            if plan.stop:
                self._dump_expert_stats()
                if stuck:
                    ranks = [a for a in att if busy[a]]
                    raise RuntimeError(f"no progress for {MAX_IDLE_STEPS} steps: attention rank(s) {ranks} have "
                                       "requests but cannot schedule any (KV cache too small?); stopped all ranks")
                break
            step_start = time.perf_counter()
            reports = self._gather(self._attention_step(plan))
            step_s = time.perf_counter() - step_start
            stats.steps += 1
            measure = auto and any(reports[a].tokens for a in att)  # `auto` probes steps that did work
            for r, rep in enumerate(reports):
                for acc in (stats, probe) if measure else (stats,):
                    acc.add_report("attention" if r in att else "expert", rep)
            if measure:
                probe.steps += 1
                if probe.steps == AUTO_PROBE_STEPS:
                    self.m, why = choose_micro_batches(probe.summary()["per_layer_ms"], self.m)
                    auto = False
                    log.info("micro_batches: auto: %s", why)
            att_reports = [reports[a] for a in att]
            idle_steps = 0 if any(rep.tokens for rep in att_reports) else idle_steps + 1
            if all(rep.tokens == rep.decodes for rep in att_reports) and any(rep.decodes for rep in att_reports):
                stats.decode_step_s.append(step_s)
            for a in att:
                rep = reports[a]
                capacity[a] = rep.free_blocks - rep.demand_blocks
                busy[a] = rep.has_work
                for seq in rep.finished:
                    results[index[seq.request_id]] = engine.request_output(seq)
                    stats.generated_tokens += len(seq.output_token_ids)
                    stats.requests.append(seq.latency_metrics())
                    stats.prompt_tokens += len(seq.prompt_token_ids)
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        stats.wall_s = time.perf_counter() - run_start
        log.info("run stats: %s", stats.summary())
        return results

    def warm_up(self, prompts: list) -> None:
        """Coordinator: run `prompts` for 3 tokens each (see cuda_graphs.warm_up_requests), then forget
        the run's statistics; the other ranks keep serving."""
        self.generate(*warm_up_requests(prompts), use_tqdm=False, last=False)
        self.stats = RunStats(world_size=self.ctx.world_size, num_moe_layers=self.spec.num_moe_layers)

    def _dump_expert_stats(self) -> None:
        """Attention ranks sum their activation counts; the coordinator appends them to balancer.stats_path."""
        rec = getattr(self, "expert_stats", None)
        if rec is None:
            return
        dist.all_reduce(rec.expert_counts_LE, group=self.attention_group)
        dist.all_reduce(rec.rank_counts_LR, group=self.attention_group)
        tokens = torch.tensor(rec.tokens_L, dtype=torch.int64, device=rec.expert_counts_LE.device)
        dist.all_reduce(tokens, group=self.attention_group)
        rec.tokens_L = tokens.tolist()
        if self.rank == self.coordinator:
            rec.dump(self.config.balancer.stats_path)
            log.info("expert activation counts appended to %s", self.config.balancer.stats_path)

    def shutdown(self, abort: bool = False) -> None:
        """Idempotent; `abort` after a failure: do not wait for peers."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.comm.close()
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
        self.ctx.shutdown(abort=abort or captured)
