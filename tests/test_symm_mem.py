"""The symmetric-memory mover (comm/movers/symm_mem.py): peer-write layout, selection and fallback, and the
whole comm selftest through its write/barrier logic on CPU (a shared-memory stand-in for the GPU windows,
tests/helpers/symm_mem_cases.py); on >= 2 GPUs the real thing, eager and captured."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
import torch

from afsplit.config import load_config
from afsplit.errors import ConfigError
from comm.layout import plan_stage
from comm.movers import symm_mem
from comm.movers.symm_mem import carve, split_segments, stage_writes, static_reason
from comm.transports import ROUTES, build_plan
from tests.helpers.comm_selftest import check_topologies, fault_worker, local_ranks_of, run_world_checks, spawn_world, topo
from tests.helpers.symm_mem_cases import FakeSymmMem, fallback_case, gpu_case

# every topology the comm selftest runs (tests/test_comm.py), plus the 2-GPU ones
WORLD4 = ["2A,2E", "1A+1E,1A+1E", "1A,1E,1A,1E", "1A,3E", "2C,2C", "2A+2E", "3A,1E"]
WORLD8 = ["2A,2E,2E,2E", "1A+3E,3A+1E", "4C,4C", "1A,1A,3E,3E", "1A+1E,1A+1E,1A+1E,1A+1E"]
SMALL = ["1A+1E", "2C", "1A,1E", "1A+2E"]
SCENARIOS = ["random", "one_rank", "zero_first", "full", "single"]
VARIANTS = ["direct", "two_phase", "adaptive", "two_phase_2ch", "direct_counts"]


def _padded_layouts(plan, rank: int, P: int) -> dict:
    """What the exchange lays out on `rank` for padded regions (comm/exchange.py _padded_stage)."""
    held = []
    if plan.topology.ranks[rank].is_attention:
        held = [(k, i * P, P) for i, k in enumerate(plan.first_hop_keys(rank))]
    out = {}
    for s in plan.active_stages:
        out[s], held = plan_stage(plan, rank, s, held, lambda _k: P, "cpu")
    return out


def _offset_of(segs, peer: int) -> tuple[int, int]:
    return next((o, n) for q, o, n in segs if q == peer)


# ---- pure


def test_peer_writes_land_where_the_peer_lays_them_out():
    """For every topology, route, P and stage: the row where a rank writes into a peer's buffer (dispatch and
    combine) is where that peer's own layout expects this rank's rows, with the same row count."""
    checked = 0
    for spec in WORLD4 + WORLD8 + SMALL:
        tp = topo(spec)
        for route in ROUTES:
            plan = build_plan(tp, route)
            for P in (0, 1, 3):
                lay = {r: _padded_layouts(plan, r, P) for r in range(tp.world_size)}
                for p in range(tp.world_size):
                    for s in plan.active_stages:
                        w = stage_writes(plan, p, s, P)
                        for q, _off, n in lay[p][s].send:
                            if q != p:
                                assert _offset_of(lay[q][s].recv, p) == (w.dispatch[q], n), (spec, route, P, p, q, s)
                                checked += 1
                        for q, _off, n in lay[p][s].recv:  # combine: p sends these rows back to q
                            if q != p:
                                assert _offset_of(lay[q][s].send, p) == (w.combine[q], n), (spec, route, P, p, q, s)
                        # the barrier / NCCL call flags: any moving pair on p's node / across nodes (same for all)
                        pairs = [(a, b) for a in range(tp.world_size) for b, _o, m in lay[a][s].send if m and a != b]
                        assert w.intra == any(tp.node_of(a) == tp.node_of(b) == tp.node_of(p) for a, b in pairs)
                        assert w.inter == any(tp.node_of(a) != tp.node_of(b) for a, b in pairs)
    assert checked > 500


def test_split_segments_and_window_carving():
    tp = topo("1A+1E,1A+1E")  # ranks 0, 1 on node 0; 2, 3 on node 1
    own, intra, inter = split_segments(tp, 1, [(0, 0, 4), (1, 4, 4), (2, 8, 0), (3, 8, 4)])
    assert (own, intra, inter) == ([(1, 4, 4)], [(0, 0, 4)], [(3, 8, 4)])
    total, regions = carve([("a", 3, 100), ("b", 2, 64), ("c", 1, 4)])
    assert regions == {"a": (0, 300), "b": (512, 128), "c": (768, 4)}
    assert total == 1024 and all(off % symm_mem.ALIGN == 0 for off, _n in regions.values())


def _ctx(spec: str, backend: str = "nccl", device: str = "cuda"):
    return SimpleNamespace(topology=topo(spec), backend=backend, device=torch.device(device), rank=0)


def test_selection_reasons(monkeypatch):
    real = symm_mem.TorchSymmMem()
    monkeypatch.setattr(symm_mem, "_PROVIDER", [real])
    assert static_reason(_ctx("1A+1E"), "nccl", "padded") == "comm.intra_node: nccl"
    assert "comm.metadata: counts" in static_reason(_ctx("1A+1E"), "auto", "counts")
    assert "no node has 2 or more ranks" in static_reason(_ctx("1A,1E"), "symm_mem", "padded")
    assert "the data backend is gloo on cpu" in static_reason(_ctx("1A+1E", "gloo", "cpu"), "auto", "padded")
    with pytest.raises(ValueError, match="comm.intra_node: 'nvlink' is not one of auto, nccl, symm_mem"):
        static_reason(_ctx("1A+1E"), "nvlink", "padded")
    # a torch without symmetric memory (old or CPU-only builds): NCCL, never an error
    import builtins
    orig = builtins.__import__

    def no_symm(name, *a, **k):
        if name.startswith("torch.distributed._symmetric_memory"):
            raise ImportError("No module named 'torch.distributed._symmetric_memory'")
        return orig(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_symm)
    assert "has no symmetric memory" in static_reason(_ctx("1A+1E"), "auto", "padded")
    monkeypatch.setattr(builtins, "__import__", orig)
    monkeypatch.setattr(real, "unavailable", lambda ctx: None)  # everything present: auto tries it
    assert static_reason(_ctx("2C,1C"), "auto", "padded") is None


def test_static_fallback_returns_base_and_logs_once(monkeypatch, caplog):
    base = SimpleNamespace(name="gloo")
    monkeypatch.setattr(symm_mem, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="comm.movers.symm_mem"):
        for _ in range(3):
            assert symm_mem.attach(_ctx("1A+1E", "gloo", "cpu"), base, "auto", "padded", [], [], None) is base
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["comm.intra_node: auto -> gloo for every link (the data backend is gloo on cpu)"]


def test_config_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {path: x}\ncomm: {intra_node: nvlink}\n")
    with pytest.raises(ConfigError, match=r"comm.intra_node: 'nvlink' is not one of auto, nccl, symm_mem"):
        load_config(p)
    p.write_text("model: {path: x}\ncomm: {intra_node: symm_mem, metadata: counts}\n")
    with pytest.raises(ConfigError, match=r"comm.intra_node: symm_mem needs comm.metadata: padded"):
        load_config(p)
    assert load_config(p, ["comm.metadata=padded"]).comm.intra_node == "symm_mem"
    p.write_text("model: {path: x}\n")
    assert load_config(p).comm.intra_node == "nccl"  # the default until the mover has run on >= 2 GPUs


# ---- multi-process (gloo ranks, the shared-memory stand-in for the windows)


def _check(specs, kw):
    return check_topologies(specs, VARIANTS, SCENARIOS, intra_node="symm_mem", symm_provider=FakeSymmMem(), **kw)


def _run(specs, world, **kw):
    return run_world_checks(_check, specs, world, timeout_s=240, **kw)


def _expected_mover(spec: str, variant: str) -> str:
    tp = topo(spec)
    multi = any(len(tp.ranks_on_node(n)) >= 2 for n in range(tp.num_nodes))
    return "symm_mem" if multi and not variant.endswith("_counts") else "gloo"


@pytest.mark.parametrize("world,specs", [(4, WORLD4), (8, WORLD8)], ids=["world4", "world8"])
def test_selftest_through_symmetric_memory(world, specs):
    """Every topology x transport x scenario of the comm selftest, bit-exact against the reference and against
    the other variants, with intra-node rows written into the peers' windows (adaptive calibrated through the
    mover on the mixed topology)."""
    results = _run(specs, world, calibrated=(specs[1],))
    for v in results:
        assert v["movers"] == {f"{s} {var}": _expected_mover(s, var) for s in specs for var in VARIANTS}


def test_setup_failure_falls_back_on_every_rank():
    res = spawn_world(3, fallback_case, "1A+2E", [("allocate", 1), ("rendezvous", -1), ("", -1)],
                      local_ranks=local_ranks_of("1A+2E"), timeout_s=120)
    assert all(ok for ok, _ in res), res
    for _ok, cases in res:
        assert [c["mover"] for c in cases] == ["gloo", "gloo", "symm_mem"]
        assert all(c["ok"] for c in cases)
        assert [c["windows"] for c in cases] == [[False], [False], [True]]


def test_silent_peer_in_the_node_barrier_fails_fast():
    timeout = 3.0
    t0 = time.monotonic()
    res = spawn_world(3, fault_worker, "1A+2E", 2, "hang", timeout, "symm_mem", FakeSymmMem(),
                      local_ranks=local_ranks_of("1A+2E"), timeout_s=60)
    assert time.monotonic() - t0 < 45
    for ok, v in res[:2]:
        assert ok, v
        assert v["mover"] == "symm_mem" and v["layer"] == 1, v
        assert "CommError" in v["error"] and "rank 2 (expert, node 0)" in v["error"], v
        assert v["elapsed"] < timeout + 2.0, v


# ---- GPUs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("spec,transports", [("1A+1E", ["direct"]), ("2C", ["direct", "two_phase"])])
def test_gpu_symmetric_memory_matches_nccl(spec, transports):
    res = spawn_world(2, gpu_case, spec, transports, local_ranks=local_ranks_of(spec), timeout_s=300)
    assert all(ok for ok, _ in res), res
    for _ok, v in res:
        assert not v["failures"], "\n".join(v["failures"][:10])
        assert all(m == ("symm_mem" if k.endswith("symm_mem") else "nccl") for k, m in v["movers"].items()), v


# ---- the 2-GPU script's step profiler (launch/step_profile.py): its split of a trace


def test_step_profile_split_of_a_trace():
    from launch.step_profile import split_trace

    def k(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [k("_decode_split_kernel", 0, 10), k("ncclDevKernel_SendRecv", 5, 20), k("_moe_gate_up_kernel", 30, 5),
              k("Memcpy DtoD (Device -> Device)", 40, 2, "gpu_memcpy"), k("c10d::symmetric_memory::barrier_kernel", 41, 4),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]
    out = split_trace(events)
    assert out["window_ms"] == pytest.approx(45e-3) and out["kernels"] == 5
    # compute 0-10, exchange exposed 10-25 and 40-45, idle 25-30 and 35-40, experts 30-35
    assert out["split_ms"] == pytest.approx({"experts": 5e-3, "compute": 10e-3, "exchange": 20e-3, "idle": 10e-3})
    assert out["busy_ms"] == pytest.approx({"experts": 5e-3, "compute": 10e-3, "exchange": 25e-3})
    assert split_trace([]) == {"window_ms": 0.0, "kernels": 0}
