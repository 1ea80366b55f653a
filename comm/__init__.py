"""M2N MoE communication between attention and expert ranks (see DESIGN.md, "Communication").

The ground floor beside kernels/: it imports torch and itself only.

    from comm import init_distributed, MoEExchange
    ctx = init_distributed(topology, backend="auto", timeout_s=120.0)
    ex = MoEExchange(ctx, hidden, top_k, dtype, max_tokens_per_rank, transport="direct", channels=2)

Files: topology.py (rank -> node/role), groups.py (process groups), transports/ (routes: direct,
two_phase, adaptive), layout.py (regions per stage), pack.py (tokens -> regions -> sums),
movers/ (how a stage's rows cross the links), channel.py (one micro-batch's buffers, stream,
groups), peer_watch.py (deadlines, the error naming the rank), exchange.py (dispatch -> handle ->
combine), placement.py / replica_planner.py / balancer.py / expert_stats.py (replicas).

Heavy imports (torch.distributed) happen on first attribute access, so `import comm` stays cheap.
"""

_EXPORTS = {
    "DistContext": "comm.groups",
    "init_distributed": "comm.groups",
    "CommError": "comm.errors",
    "MoEExchange": "comm.exchange",
    "ExpertBatch": "comm.exchange",
    "Handle": "comm.exchange",
    "TRANSPORTS": "comm.transports",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'comm' has no attribute {name!r}")
