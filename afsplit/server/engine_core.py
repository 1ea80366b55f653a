"""The engine behind the server, one interface for both layouts.

Both wrap an engine core (``add_sequence``, ``abort_request``, ``step``, ``has_unfinished_requests``)
and the LLMEngine that validates and tokenizes (``engine``), and add what a long-running server
needs: the load figures for the metrics, a keep-alive for idle periods, per-layer exchange time,
and a clean stop. Only the engine-loop thread calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Load:
    """The engine's occupancy after a step."""

    running: int = 0
    waiting: int = 0  # in the scheduler(s), not yet running
    kv_used_blocks: int = 0
    kv_total_blocks: int = 1

    @property
    def kv_usage(self) -> float:
        return self.kv_used_blocks / max(1, self.kv_total_blocks)


class LocalCore:
    """The single-process engine (one rank: the whole model in this process)."""

    exchanges = False

    def __init__(self, engine):
        self.engine = engine
        self.core = engine
        self.device = engine.device

    def load(self) -> Load:
        e = self.engine
        return Load(len(e.scheduler.running), len(e.scheduler.waiting),
                    e.kv.allocator.num_blocks - e.kv.num_free_blocks, e.kv.allocator.num_blocks)

    def keepalive(self) -> None:
        pass

    def take_exchange_seconds(self) -> dict[str, float]:
        return {}

    def take_failovers(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


class ClusterCore:
    """The coordinator rank of the distributed runtime; the other ranks follow its plans (RankRuntime.serve)."""

    exchanges = True

    def __init__(self, runtime):
        self.runtime = runtime
        self.core = runtime.coord
        self.engine = runtime.engine  # the coordinator's own attention engine validates and tokenizes
        self.device = runtime.ctx.device
        self.num_attention = len(runtime.topo.attention_ranks)
        self.num_moe_layers = max(1, runtime.spec.num_moe_layers)
        self._failovers_seen = 0

    def load(self) -> Load:
        coord = self.core
        reports = [coord.last_reports[a] for a in coord.att] if coord.last_reports else []
        total = self.engine.kv.allocator.num_blocks * len(coord.att)
        if not reports:
            return Load(0, len(coord.pending), 0, total)
        return Load(sum(r.num_running for r in reports), sum(r.num_waiting for r in reports) + len(coord.pending),
                    total - sum(r.free_blocks for r in reports), total)

    def keepalive(self) -> None:
        """An idle plan: the followers' control-plane waits must not reach comm.timeout_s on an idle server."""
        self.core.keepalive()

    def take_failovers(self) -> list[dict]:
        """Recoveries from a lost rank since the last call (afsplit/runtime/failover.py)."""
        records = self.core.failovers[self._failovers_seen:]
        self._failovers_seen += len(records)
        return records

    def take_exchange_seconds(self) -> dict[str, float]:
        """Mean seconds per MoE layer and attention rank spent in dispatch and combine since the last call
        (host-side time unless runtime.profile synchronises the device)."""
        coord = self.core
        acc = coord.stats.phase_s.get("attention", {})
        n = self.num_attention * self.num_moe_layers * max(1, coord.stats.steps)
        out = {phase: acc[phase] / n for phase in ("dispatch", "combine") if acc.get(phase)}
        coord.reset_stats()  # a server runs for days: keep the run statistics to one step
        return out

    def close(self) -> None:
        self.core.stop()


def thread_device(device: torch.device):
    """Call on the thread that built the engine; returns a function that selects the same GPU on another
    thread (the CUDA current device is per thread, and torch.device("cuda") names no index)."""
    if device.type != "cuda":
        return lambda: None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lambda: torch.cuda.set_device(index)
