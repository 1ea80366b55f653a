"""What a run measured, as the coordinator sees it (also written by `afsplit generate --stats-json`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepReport:
    """One rank's account of one engine step, gathered by the coordinator over the control group."""

    updates: list = field(default_factory=list)  # SeqUpdate per request that sampled (attention ranks)
    free_blocks: int = 0
    demand_blocks: int = 0  # blocks the waiting prompts will need
    has_work: bool = False
    num_running: int = 0  # sequences in the scheduler after the step (attention ranks)
    num_waiting: int = 0
    tokens: int = 0  # tokens computed this step (attention ranks)
    decodes: int = 0  # of which single-token decodes
    step_s: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds by phase (see RunStats)


@dataclass
class RunStats:
    """Throughput, latency and the per-phase time split of one run."""

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
    micro_batches: dict = field(default_factory=dict)  # m -> steps run with it
    failovers: list = field(default_factory=list)  # one record per recovery from a lost rank (runtime/failover.py)
    sampled_tokens: int = 0  # tokens sampled so far (finished or not): the clock of throughput around failovers

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
            "prompt_tokens": self.prompt_tokens,
            "output_throughput": self.generated_tokens / self.wall_s if self.wall_s else 0.0,
            "tokens_per_s_per_gpu": self.generated_tokens / self.wall_s / self.world_size if self.wall_s else 0.0,
            "decode_step_ms_mean": 1e3 * sum(tpot) / len(tpot) if tpot else None,
            "decode_step_ms_median": 1e3 * tpot[len(tpot) // 2] if tpot else None,
            "gpus": self.world_size,
            "num_requests": len(self.requests),
            "micro_batches": {str(m): n for m, n in sorted(self.micro_batches.items())},
            "failovers": list(self.failovers),
        }
        out.update(aggregate_latency(self.requests))
        if self.failovers:
            out["failover_throughput"] = around_failovers(self.failovers, self.sampled_tokens, self.wall_s)
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


def around_failovers(records: list[dict], tokens: int, wall_s: float) -> dict:
    """Sampled tokens/s before the first failover (run start to the failed step) and after the last one
    (recovery done to the end of the run); each record holds failed_at_s / resumed_at_s / tokens_*."""
    first, last = records[0], records[-1]
    after_s = wall_s - last["resumed_at_s"]
    return {"before_tok_s": first["tokens_at_failure"] / first["failed_at_s"] if first["failed_at_s"] > 0 else None,
            "after_tok_s": (tokens - last["tokens_at_resume"]) / after_s if after_s > 0 else None,
            "stalled_s": sum(r["resumed_at_s"] - r["failed_at_s"] for r in records)}
