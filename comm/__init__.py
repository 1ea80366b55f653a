"""M2N MoE communication between attention and expert ranks (see DESIGN.md, "Communication").

    from comm import init_distributed, MoECommunicator
    ctx = init_distributed(topology, backend="auto", timeout_s=120.0)
    comm = MoECommunicator(ctx, hidden, top_k, dtype, max_tokens_per_rank, transport="direct")

Heavy imports (torch.distributed) happen on first attribute access, so `import comm` stays cheap.
"""

_EXPORTS = {
    "DistContext": "comm.groups",
    "init_distributed": "comm.groups",
    "CommError": "comm.groups",
    "MoECommunicator": "comm.communicator",
    "ExpertBatch": "comm.communicator",
    "Handle": "comm.communicator",
    "TRANSPORTS": "comm.transports.plan",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'comm' has no attribute {name!r}")
