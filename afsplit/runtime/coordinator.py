"""The coordinator: the first attention rank's control loop over the whole cluster.

It has the interface of the single-process engine (``add_sequence``, ``abort_request``,
``step``, ``has_unfinished_requests``), so the same driver (:func:`afsplit.engine.run_to_completion`),
the batch CLI and the server run on either. One ``step`` is one engine step of every rank in lockstep:

1. broadcast a :class:`StepPlan` over the CPU control group: new requests, each assigned to the
   attention rank with the most free KV capacity; requests to abort; the step's micro-batch count;
2. every rank runs its part (attention ranks their own batches, expert ranks every MoE layer);
3. gather every rank's :class:`StepReport` (the tokens each request produced, free KV blocks, the
   time split) and apply the tokens to the coordinator's own copy of each request.

When a rank is lost during a step (comm.failover), the survivors rebuild (afsplit/runtime/failover.py)
and the coordinator resolves the step with a *sync* plan: every attention rank answers what it has of
it (:class:`SyncAnswer`): a finished step's report is applied (once), a step that failed before
sampling runs again as part of the next step, and a plan that never arrived is re-queued. Requests
of a dead attention rank fail with an error record.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

from afsplit.runtime.failover import is_comm_failure
from afsplit.runtime.micro_batches import MicroBatchTuner, fixed_micro_batches
from afsplit.runtime.stats import RunStats
from afsplit.sequence import SeqStatus, SeqUpdate, Sequence

log = logging.getLogger("afsplit.runtime")

MAX_IDLE_STEPS = 100  # steps in a row with work queued but nothing scheduled before the run is stopped


@dataclass
class StepPlan:
    stop: bool = False
    assign: dict[int, list[Sequence]] = field(default_factory=dict)  # attention rank -> new sequences
    abort: list[int] = field(default_factory=list)  # request ids to drop (on whichever rank holds them)
    micro_batches: int = 1  # m for this step, the same on every rank
    dump_stats: bool = False  # after this step the attention ranks append their expert counts (stats_every_steps)
    idle: bool = False  # no step: an idle coordinator (a server with no requests) telling its followers it is alive
    step: int = 0  # the coordinator's step number (a recovery asks the ranks about it)
    sync: bool = False  # no step: after a recovery, every attention rank answers with its SyncAnswer for `step`


@dataclass
class SyncAnswer:
    """An attention rank's account of step `step` after a recovery."""

    applied: int  # the last plan whose new requests and aborts it took
    report: object = None  # its StepReport of the step if it finished it, else None
    redo: int = 0  # sequences whose step failed before sampling and will run it again


class Coordinator:
    """Runs on the coordinator rank; `runtime` is that rank's RankRuntime (an attention rank)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.engine = runtime.engine  # validates, tokenizes, detokenizes
        topo = runtime.topo
        self.att = list(topo.attention_ranks)
        self.capacity = {a: self.engine.kv.allocator.num_blocks for a in self.att}
        self.busy = {a: False for a in self.att}
        self.pending: list[Sequence] = []
        self.aborts: list[int] = []
        self.owner: dict[int, int] = {}  # request id -> attention rank
        self.live: dict[int, Sequence] = {}  # the coordinator's copies of unfinished requests
        self.idle_steps = 0
        self.steps_run = 0  # over the coordinator's life (the statistics cadence), not reset with the stats
        self.last_reports: list = []  # every rank's StepReport of the last step (the server's load figures)
        self.failovers: list[dict] = []  # one record per recovery (never reset: /metrics reads it)
        self._old: dict[int, int] = {}  # during a recovery: current rank -> its number when the failed plan was made
        self._orphans: list[int] = []  # requests of attention ranks lost in a recovery, to be failed
        m = fixed_micro_batches(runtime.config.runtime.micro_batches, distributed=True)
        self.tuner = None if m is not None else MicroBatchTuner()
        self.m = m
        self.reset_stats()

    def reset_stats(self) -> None:
        topo = self.runtime.topo
        self.stats = RunStats(world_size=topo.world_size, num_moe_layers=self.runtime.spec.num_moe_layers)
        self.stats.ranks = {"attention": len(self.att),
                            "expert": len([r for r in topo.expert_ranks if r not in self.att])}
        self._run_start = None

    # -- the engine-core interface -------------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> None:
        self.pending.append(seq)
        self.live[seq.request_id] = seq

    def abort_request(self, request_id: int) -> bool:
        seq = self.live.get(request_id)
        if seq is None:
            return False
        if seq in self.pending:
            self.pending.remove(seq)
            self._finish(seq, "abort")
        else:
            self.aborts.append(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[SeqUpdate]:
        """One lockstep engine step of the whole cluster; what every request produced in it."""
        if self._run_start is None:
            self._run_start = time.perf_counter()
        self.steps_run += 1
        plan = StepPlan(micro_batches=self.tuner.current if self.tuner else self.m, abort=self.aborts,
                        step=self.steps_run)
        every = self.runtime.config.balancer.stats_every_steps
        plan.dump_stats = bool(every) and self.steps_run % every == 0
        self.aborts = []
        for seq in self.pending:  # most free capacity first; a prompt's blocks are its demand
            a = max(self.att, key=lambda r: (self.capacity[r], -self.att.index(r)))
            # the attention rank runs its own copy (the coordinator may be that rank: keep ours apart)
            plan.assign.setdefault(a, []).append(copy.deepcopy(seq))
            self.owner[seq.request_id] = a
            self.capacity[a] -= self.engine.kv.blocks_for(seq.num_tokens)
        self.pending = []
        if self.idle_steps >= MAX_IDLE_STEPS:
            ranks = [a for a in self.att if self.busy[a]]
            self.stop()
            raise RuntimeError(f"no progress for {MAX_IDLE_STEPS} steps: attention rank(s) {ranks} have requests "
                               "but cannot schedule any (KV cache too small?); stopped all ranks")
        rt = self.runtime
        step_start = time.perf_counter()
        try:
            rt.broadcast(plan)
            reports = self.last_reports = rt.gather(rt.run_step(plan))
        except Exception as e:  # noqa: BLE001 -- a lost peer: recover (or re-raise), then settle this step
            return self._recover(plan, e)
        step_s = time.perf_counter() - step_start
        self._account(plan, reports, step_s)
        updates = self._apply({a: reports[a] for a in self.att})
        self.stats.wall_s = time.perf_counter() - self._run_start
        return updates

    def keepalive(self) -> None:
        """An idle plan (a server with no requests): the followers' waits must not reach comm.timeout_s."""
        try:
            self.runtime.broadcast(StepPlan(idle=True, step=self.steps_run))
        except Exception as e:  # noqa: BLE001
            self._recover(None, e)

    def _apply(self, reports: dict) -> list[SeqUpdate]:
        """Apply attention ranks' step reports {rank: StepReport} to the coordinator's copies of the requests."""
        now = time.time()
        updates = []
        for a, rep in reports.items():
            self.capacity[a] = rep.free_blocks - rep.demand_blocks
            self.busy[a] = rep.has_work
            for upd in rep.updates:
                seq = self.live.get(upd.request_id)
                if seq is None:
                    continue
                upd.time = now  # the coordinator's clock: what a caller of this process sees
                seq.output_token_ids += upd.new_token_ids
                seq.token_times += [now] * len(upd.new_token_ids)
                self.stats.sampled_tokens += len(upd.new_token_ids)
                if upd.finish_reason:
                    self._finish(seq, upd.finish_reason)
                updates.append(upd)
        return updates

    # -- failover ------------------------------------------------------------------------------

    def _recover(self, plan: StepPlan | None, exc: BaseException) -> list[SeqUpdate]:
        """Rebuild over the survivors, then settle `plan`'s step from every attention rank's SyncAnswer."""
        rt = self.runtime
        failed_at = time.perf_counter() - (self._run_start or time.perf_counter())
        tokens_at_failure = self.stats.sampled_tokens
        self._old = {a: a for a in self.att}  # current rank -> its number when `plan` was made
        while True:
            record = rt.fail_over(exc)  # re-raises what failover does not handle
            step = plan.step if plan is not None else self.steps_run
            try:
                rt.broadcast(StepPlan(sync=True, step=step))
                answers = rt.gather(rt.sync_answer(step))
                break
            except Exception as e:  # noqa: BLE001 -- lost another one while settling: go again
                exc = e
        done, redo, requeued = {}, 0, 0
        for a in self.att:
            ans = answers[a]
            if plan is not None and ans.applied < plan.step:  # the plan never reached it: its requests go again
                for seq in plan.assign.get(self._old.get(a, -1), []):
                    original = self.live.get(seq.request_id)
                    if original is not None and original not in self.pending:
                        self.pending.append(original)
                        self.owner.pop(seq.request_id, None)
                        requeued += 1
            if ans.report is not None:
                done[a] = ans.report
            redo += ans.redo
        if plan is not None:
            self.aborts = list(plan.abort) + self.aborts  # aborting twice is harmless; never aborting is not
        failed = self._fail_orphans()
        updates = failed + self._apply(done)
        record.update(requests_replayed=redo + requeued, reports_recovered=len(done),
                      requests_failed=len(failed), failed_at_s=round(failed_at, 3),
                      resumed_at_s=round(time.perf_counter() - (self._run_start or time.perf_counter()), 3),
                      tokens_at_failure=tokens_at_failure, tokens_at_resume=self.stats.sampled_tokens)
        self.failovers.append(record)
        self.stats.failovers.append(record)
        log.warning("failover %d: ranks %s (%s) lost; detected in %.2f s, recovered in %.2f s; %d request(s) "
                    "replayed, %d failed", record["epoch"], record["dead_ranks"], ", ".join(record["dead_roles"]),
                    record["detection_s"], record["recovery_s"], record["requests_replayed"],
                    record["requests_failed"])
        return updates

    def renumber(self, new_index: dict[int, int]) -> None:
        """The ranks were renumbered after a loss (old rank -> new rank; the dead are missing)."""
        self._old = {new: self._old.get(old, old) for old, new in new_index.items()}
        self.att = list(self.runtime.topo.attention_ranks)
        self.capacity = {new_index[a]: c for a, c in self.capacity.items() if a in new_index}
        self.busy = {new_index[a]: b for a, b in self.busy.items() if a in new_index}
        self._orphans = [rid for rid, a in self.owner.items() if a not in new_index]
        self.owner = {rid: new_index[a] for rid, a in self.owner.items() if a in new_index}
        self.last_reports = []
        self.stats.world_size = self.runtime.topo.world_size

    def _fail_orphans(self) -> list[SeqUpdate]:
        """Requests that lived on a dead attention rank fail (their KV cache is gone)."""
        updates = []
        for rid in self._orphans:
            seq = self.live.get(rid)
            if seq is None:
                continue
            seq.error = "its attention rank died (failover cannot move a request's KV cache); resubmit it"
            self._finish(seq, "error")
            updates.append(SeqUpdate(rid, [], "error", time.time()))
        self._orphans = []
        return updates

    def stop(self) -> None:
        """Tell every other rank to leave its serve loop (they dump statistics first). With failover, a rank
        lost at this point costs nothing (the work is done): it is logged, not raised."""
        try:
            self.runtime.broadcast(StepPlan(stop=True))
        except Exception as e:  # noqa: BLE001
            if self.runtime.failover is None or not is_comm_failure(e):
                raise
            log.warning("a rank was lost while stopping (%s); the run's work is complete", str(e).split(": [/")[0])
            return
        self.runtime.dump_expert_stats()

    # -- internals -----------------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.live.pop(seq.request_id, None)
        self.owner.pop(seq.request_id, None)
        if reason not in ("abort", "error"):
            self.stats.generated_tokens += len(seq.output_token_ids)
            self.stats.prompt_tokens += len(seq.prompt_token_ids)
            self.stats.requests.append(seq.latency_metrics())

    def _account(self, plan: StepPlan, reports: list, step_s: float) -> None:
        stats = self.stats
        stats.steps += 1
        stats.micro_batches[plan.micro_batches] = stats.micro_batches.get(plan.micro_batches, 0) + 1
        for r, rep in enumerate(reports):
            stats.add_report("attention" if r in self.att else "expert", rep)
        att_reports = [reports[a] for a in self.att]
        self.idle_steps = 0 if any(rep.tokens for rep in att_reports) else self.idle_steps + 1
        decode_only = all(rep.tokens == rep.decodes for rep in att_reports) and any(rep.decodes for rep in att_reports)
        if decode_only:
            stats.decode_step_s.append(step_s)
        if self.tuner is not None:
            why = self.tuner.observe(plan.micro_batches, decode_only, step_s)
            if why:
                log.info("%s", why)
