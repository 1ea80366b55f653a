"""comm/: dispatch/combine over real gloo processes (CPU), fault handling, and the local cluster launcher.

Process start-up dominates (each rank imports torch), so many topologies/transports/scenarios run
inside a few launches: ranks share one process group and view it through several topologies of the
same world size (DistContext.with_topology).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from afsplit.errors import ConfigError
from comm.topology import NodeSpec
from comm.groups import init_distributed
from comm.transports import build_plan
from launch.local_cluster import parse_nodes, script_args
from tests.helpers.comm_selftest import (VARIANTS, check_topologies, fault_worker, local_ranks_of, run_world_checks,
                                        spawn_world, topo)

ROOT = Path(__file__).resolve().parents[1]
# *_a2a: padded regions moved by one all_to_all_single per stage (NCCL's path), forced on gloo;
# *_counts: exact-sized rows after headers; *_2ch: two micro-batches interleaved on two channels
SCENARIOS = ["random", "one_rank", "zero_first", "full", "single"]


def _run(specs, world, **kw):
    return run_world_checks(_check, specs, world, timeout_s=200, **kw)


def _check(specs, kw):
    return check_topologies(specs, list(VARIANTS), SCENARIOS, **kw)


# ---- pure (no processes)


def test_parse_nodes_and_plans():
    assert parse_nodes("2A,2E") == (NodeSpec(attention=2), NodeSpec(expert=2))
    assert parse_nodes("1A+1E,4C") == (NodeSpec(attention=1, expert=1), NodeSpec(colocated=4))
    with pytest.raises(ValueError):
        parse_nodes("2X")
    t = topo("2A,2E")
    direct, two = build_plan(t, "direct"), build_plan(t, "two_phase")
    assert direct.active_stages == (0,)
    assert two.active_stages == (0, 1, 2)
    # one packet per node pair crosses the network in two_phase
    inter = [(p, q) for p, d in two.sends[1].items() for q, _ in d if t.node_of(p) != t.node_of(q)]
    assert len(inter) == 1
    # one rank per node: two_phase degenerates to direct; one node: same as direct
    for spec in ("1A,1E", "2A+2E"):
        tt = topo(spec)
        hops = lambda plan: {k: [(p[s], p[s + 1]) for s in range(3) if p[s] != p[s + 1]] for k, p in plan.pos.items()}
        assert hops(build_plan(tt, "two_phase")) == hops(build_plan(tt, "direct"))
    # capacity: an expert rank holds one region per attention rank at the end
    from comm.layout import capacity
    assert capacity(direct, 2, 3, max_rows_per_key=10) == 2 * 10


def test_world_size_mismatch_message(monkeypatch):
    t = topo("2A,2E")
    with pytest.raises(ConfigError, match=r"2 attention \+ 2 expert ranks = 4 != 3 processes \(WORLD_SIZE\)"):
        t.check_world_size(3)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="!= 3 processes"):  # raised before any rendezvous
        init_distributed(t, backend="gloo")


def test_script_args():
    assert script_args([sys.executable, "-m", "afsplit.cli", "generate"]) == ["--module", "afsplit.cli", "generate"]
    assert script_args(["-m", "pkg.mod", "--x"]) == ["--module", "pkg.mod", "--x"]
    assert script_args(["run.py", "a"]) == ["run.py", "a"]


# ---- multi-process correctness (gloo)


def test_dispatch_combine_world4():
    specs = ["2A,2E", "1A+1E,1A+1E", "1A,1E,1A,1E", "1A,3E", "2C,2C", "2A+2E", "3A,1E"]
    results = _run(specs, 4, calibrated=("1A+1E,1A+1E",), check_mismatch=True)
    # the synthetic link model makes adaptive use both transports on 2A,2E (small and large batches)
    assert results[0]["chosen"]["2A,2E"] == ["direct", "two_phase"]
    for v in results:
        assert "ranks [1]" in v["mismatch"], v["mismatch"]


def test_dispatch_combine_world8():
    specs = ["2A,2E,2E,2E", "1A+3E,3A+1E", "4C,4C", "1A,1A,3E,3E", "1A+1E,1A+1E,1A+1E,1A+1E"]
    _run(specs, 8)


# ---- faults


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_silent_peer_fails_fast(mode):
    timeout = 3.0
    t0 = time.monotonic()
    res = spawn_world(3, fault_worker, "1A,2E", 2, mode, timeout, local_ranks=local_ranks_of("1A,2E"), timeout_s=60)
    assert time.monotonic() - t0 < 45
    survivors = [v for ok, v in res[:2]]
    assert all(ok for ok, _ in res[:2]), res
    for v in survivors:
        assert v["error"] is not None and v["layer"] == 1, v
        assert v["elapsed"] < timeout + 2.0, v
    # the attention rank talks to rank 2 directly: its error names rank 2 and the layer
    assert "rank 2" in survivors[0]["error"] and "layer 1" in survivors[0]["error"], survivors[0]


# ---- launcher


def _launch(nodes: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.local_cluster", "--nodes", nodes, "--timeout", "100", "--",
           "-m", "tests.helpers.comm_selftest", "--nodes", nodes, *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def test_local_cluster_runs_uneven_nodes():
    # 1 rank on node 0, 3 on node 1: torchrun takes a different --nproc-per-node per node
    p = _launch("1A,3E")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "node 0: torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr 127.0.0.1" in p.stdout
    assert "node 1: torchrun --nnodes 2 --node-rank 1 --nproc-per-node 3" in p.stdout
    assert "--module tests.helpers.comm_selftest" in p.stdout
    assert sum(f"rank {r} node" in p.stdout and "ok" in p.stdout for r in range(4)) == 4
    for r, node, local in [(0, 0, 0), (1, 1, 0), (3, 1, 2)]:
        assert f"rank {r} node {node} local {local}" in p.stdout


def test_local_cluster_failure_names_node():
    p = _launch("1A,1E", "--fail-rank", "1")
    assert p.returncode != 0
    assert "afsplit: error: rank 1 (expert, node 1) exited with code 7; all ranks stopped" in p.stdout, p.stdout


def test_single_rank_in_process(monkeypatch):
    """World of one colocated rank (nothing moves: the batch is the caller's tokens) + the size errors."""
    from comm.exchange import MoEExchange
    from tests.helpers.comm_selftest import fake_moe, free_port, make_inputs, reference

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    tp = topo("1C")
    ctx = init_distributed(tp, backend="gloo", timeout_s=10.0)
    try:
        for transport, metadata in [("direct", "counts"), ("two_phase", "padded"), ("adaptive", "padded")]:
            ex = MoEExchange(ctx, 8, 2, torch.float32, 5, transport, metadata, 5.0)
            for layer in range(3):
                x, dest, slot, w = make_inputs(tp, layer, "random", 8, 2, 3, 5)[0]
                ex.begin_step(x.shape[0])
                h = ex.dispatch(x, dest, slot, w, layer)
                assert h.batch.x is x
                out = ex.combine(fake_moe(h.batch, 0), h)
                assert torch.equal(out, reference(x, dest, slot, w))
            ex.begin_step(5)
            x = torch.zeros(6, 8)
            idx = torch.zeros(6, 2, dtype=torch.long)
            with pytest.raises(ValueError, match="6 tokens on rank 0 >"):
                ex.dispatch(x, idx, idx, torch.ones(6, 2), 9)
            with pytest.raises(ValueError, match="channel 1 does not exist"):
                ex.dispatch(x[:1], idx[:1], idx[:1], torch.ones(1, 2), 9, channel=1)
    finally:
        ctx.shutdown()
