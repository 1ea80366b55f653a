"""Deployment planner: the step model on synthetic profiles with known answers, search, config, validate."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from afsplit.cli import main
from afsplit.errors import ConfigError
from afsplit.planner import layouts as L
from afsplit.planner.exchange import exchange_bytes_per_sender, exchange_times, rows_per_pair
from afsplit.planner.fitting import (Table2D, anchored, fit_floor_or_rate, fit_linear, fit_nonneg, fit_roofline,
                                     flash_tile_pairs, touched_experts)
from afsplit.planner.memory import memory_problem, role_memory
from afsplit.planner.profile_data import BlockTimes, check_profile
from afsplit.planner.search import Planner, Workload, check_cluster, instance_layouts
from afsplit.planner.shapes import resolve_shape
from afsplit.planner.step_model import StepModel, bucket, pingpong_layer, poisson_max_over_mean
from afsplit.planner.synthetic import h200_estimate, synthetic_profile

QWEN = resolve_shape("qwen3-30b-a3b")
BIG = 1e15  # bytes/s: a link with no bandwidth cost


def profile(shape=QWEN, att=lambda b, c: 1.0, moe=lambda s, n: 1.0, call_ms=0.25, overhead_ms=0.0,
            intra=(0.0, BIG), inter=(0.0, BIG, 0.0), balancer=None, memory_gb=150.0):
    """A synthetic profile: given attention/MoE functions (ms), free GEMMs and head, fixed exchange call."""
    batches = [1, 1024]
    return synthetic_profile(
        shape, attention_ms=att, moe_ms=moe, head_ms=lambda b: 0.0, prefill_ms=lambda p: 1.0,
        gemm_ms=lambda w, f: 1e-9,
        links={"intra": {"alpha_us": intra[0], "GBps": intra[1] / 1e9},
               "inter": {"alpha_us": inter[0], "GBps": inter[1] / 1e9, "gap_us": inter[2]}},
        system={"runtime": {"batch": batches, "step_overhead_ms": [overhead_ms] * 2, "exchange_call_ms": [call_ms] * 2},
                "engine": {"batch": batches, "step_overhead_ms": [overhead_ms] * 2, "layer_scale": [1.0, 1.0]}},
        balancer=balancer, gpu_memory_gb=memory_gb, assumed={"control_us_per_doubling": 0.0})


def model(prof, shape=QWEN, imbalance=1.0, exchange="padded", gbps=None, lat=None):
    blocks = BlockTimes(prof, shape)
    return StepModel(blocks, *blocks.links(gbps, lat), imbalance=imbalance, exchange=exchange)


# ----------------------------------------------------------------------------------------------
# pieces


def test_tables_fits_and_roofline_transfer():
    t = Table2D((1.0, 4.0), (10.0, 30.0), ((1.0, 3.0), (4.0, 12.0)))  # z = x * y / 10: bilinear-exact
    assert t(2.0, 20.0) == pytest.approx(4.0)
    assert anchored(t, lambda x, y: x * y, 8.0, 30.0) == pytest.approx(24.0)  # scaled roofline past the edge
    assert fit_linear([(x, 2.0 + 3.0 * x) for x in (1, 2, 5, 9)]) == pytest.approx((2.0, 3.0))
    pts = [(b, f, 5e-6 + max(b / 2e12, f / 4e14)) for b in (1e5, 1e7, 1e9) for f in (1e6, 1e10, 1e13)]
    r = fit_roofline(pts)
    assert r.c == pytest.approx(5e-6, rel=0.05) and r.bw == pytest.approx(2e12, rel=0.05)
    assert r.flops_rate == pytest.approx(4e14, rel=0.05)
    assert touched_experts(128, 1) == pytest.approx(1.0) and touched_experts(128, 10**6) == pytest.approx(128.0)
    # the H200 estimate's own rates come back out of its tables, and another shape is priced by them
    prof = h200_estimate(QWEN)
    check_profile(prof)
    fits = BlockTimes(prof, QWEN).fits()
    assert fits["moe"]["TFLOPs"] == pytest.approx(400.0, rel=0.05)
    assert fits["attention_decode"]["kv_GBps"] == pytest.approx(0.78 * 4152, rel=0.05)
    mix = resolve_shape("mixtral-8x7b")
    own, moved = BlockTimes(h200_estimate(mix), mix), BlockTimes(prof, mix)
    assert not moved.matched and own.matched
    for pairs in (16, 4096):
        assert moved.moe(pairs, 8) == pytest.approx(own.moe(pairs, 8), rel=0.05)
    assert moved.attention_decode(64, 1000) == pytest.approx(own.attention_decode(64, 1000), rel=0.05)


def test_nonneg_and_floor_fits_recover_known_parameters():
    rows = [(1.0, b, b * c) for b in (1, 8, 64) for c in (128, 2048)]
    assert fit_nonneg(rows, [2.0 + 0.5 * b + 0.01 * x for _, b, x in rows]) == pytest.approx((2.0, 0.5, 0.01))
    # a negative coefficient is not allowed: the best fit without it
    assert fit_nonneg([(1.0, x) for x in (1, 2, 3)], [3.0, 2.0, 1.0])[1] == 0.0
    # eager calls: max(host 1 ms, GPU g + s x); the two GPU-bound points fix s, the host-bound ones h
    pts = [(g, x, max(1e-3, g + 2e-15 * x)) for g, x in ((1e-4, 1e10), (2e-4, 5e10), (3e-4, 9e11), (5e-4, 2e12))]
    h, s = fit_floor_or_rate(pts)
    assert h == pytest.approx(1e-3, rel=0.02) and s == pytest.approx(2e-15, rel=0.02)


def test_flash_tile_pairs_follow_the_kernels_loops():
    """Every q-block of BM rows reads the prefix in BN tiles and the chunk up to its diagonal tile."""
    def by_loop(new, prefix, bm, bn):
        total = 0
        for m0 in range(0, new, bm):
            hi = min(m0 + bm, new)
            total += bm * (-(-prefix // bn) * bn + -(-hi // bn) * bn)
        return total

    for new, prefix, bm, bn in ((1, 500, 128, 128), (300, 0, 128, 128), (513, 1000, 128, 64), (64, 3, 64, 64),
                                (8192, 0, 128, 128)):
        assert flash_tile_pairs(new, prefix, bm, bn) == by_loop(new, prefix, bm, bn)
    assert flash_tile_pairs(1, 500, 128, 128) == 128 * (512 + 128)  # a decode row in a mixed step: a full tile
    assert flash_tile_pairs(0, 9, 128, 128) == 0.0


def test_system_fit_pools_slopes_and_measures_eager_and_context():
    """The runtime's layers are the engine's plus two exchange calls >= 0: a runtime slope below the engine's
    is the same layer measured twice (mean, calls 0); eager points give host per layer and the eager step's
    extra; the long prompt gives the in-model context growth over the table's."""
    from afsplit.planner.system_runs import SystemPlan, fit_system, pooled_slopes

    plan = SystemPlan(depths=(2, 10), engine_batches=(8, 64), runtime_batches=(8, 64), eager_batch=64,
                      context_batch=64, input_len=128, output_len=32, long_input_len=2048)
    eng = {"graphs": {d: {8: 0.5 + 0.20 * d, 64: 1.0 + 0.30 * d} for d in (2, 10)},
           "eager": {d: 3.0 + 1.2 * d for d in (2, 10)}, "long": {d: 1.5 + 0.36 * d for d in (2, 10)}}
    rt = {d: {8: 0.6 + 0.16 * d, 64: 1.2 + 0.32 * d} for d in (2, 10)}
    e, r = pooled_slopes(eng["graphs"], rt, (2, 10))
    assert e[8] == r[8] == pytest.approx(0.18e-3) and e[64] == pytest.approx(0.30e-3) and r[64] == pytest.approx(0.32e-3)
    rt_eager = {d: 3.5 + 1.3 * d for d in (2, 10)}
    att = lambda b, ctx: 1e-7 * b * ctx  # noqa: E731  (s): the table grows 0.0123 ms from context 144 to 2064
    sysd = fit_system(eng, rt, lambda b: 0.25e-3, lambda rows: 0.1e-3, plan, rt_eager, att)
    assert sysd["engine"]["layer_ms"] == pytest.approx([0.18, 0.30])
    assert sysd["runtime"]["exchange_call_ms"] == pytest.approx([0.0, 0.01])
    assert sysd["engine"]["eager_layer_ms"] == pytest.approx(1.2) and sysd["runtime"]["eager_layer_ms"] == pytest.approx(1.3)
    assert sysd["engine"]["eager_step_extra_ms"] == pytest.approx(3.0 - 0.1 - (1.0 - 0.1))
    assert sysd["runtime"]["eager_step_extra_ms"] == pytest.approx(3.5 - 0.1 - (1.2 - 0.1))
    assert sysd["engine"]["context_factor"] == pytest.approx((0.36 - 0.30) / (1e-4 * 64 * 1920))


def test_in_model_layer_time_is_interpolated_and_context_added():
    """Between measured batches the in-model *time* is interpolated (not its ratio to the isolated blocks);
    the correction applies at the measured context, the change with context is the table's x context_factor;
    a runtime step costs the engine's overhead plus the runtime's measured excess over it."""
    prof = profile(att=lambda b, c: 0.01 + 1e-5 * b * c, moe=lambda s, n: 0.02 + 0.001 * n)
    prof["system"] = {"workload": {"input_len": 100, "output_len": 0},
                      "engine": {"batch": [8, 64], "step_overhead_ms": [1.0, 2.0], "layer_ms": [0.05, 0.40],
                                 "context_factor": 2.0},
                      "runtime": {"batch": [8, 64], "step_overhead_ms": [1.5, 1.0], "exchange_call_ms": [0.0, 0.0]}}
    b = BlockTimes(prof, QWEN)
    iso = lambda r: (0.01 + 1e-5 * bucket(r) * 100 + 0.02 + 0.001 * r * QWEN.top_k) * 1e-3  # noqa: E731
    assert b.layer_scale(32) == pytest.approx((0.05 + 24 / 56 * 0.35) * 1e-3 / iso(32))
    assert b.layer_scale(1000) == pytest.approx(0.40e-3 / iso(64))  # beyond: the end batch's ratio
    sc = b.layer_scale(32)
    base, at = (0.01 + 1e-5 * 32 * 100) * 1e-3, (0.01 + 1e-5 * 32 * 900) * 1e-3
    assert b.in_model_attention(32, 900, sc) == pytest.approx(base * sc + 2.0 * (at - base))
    assert b.step_overhead("runtime", 8) == pytest.approx(1.5e-3)  # 1.0 + excess 0.5
    assert b.step_overhead("runtime", 64) == pytest.approx(2.0e-3)  # below the engine's: excess 0
    assert b.step_overhead("runtime", 36) == pytest.approx((1.5 + 0.25) * 1e-3)


def test_eager_and_capture_steps_overlap_host_and_gpu():
    """An eager layer takes the longer of its host launches and its GPU work; a graph capture launches
    every layer once, then replays."""
    prof = profile()
    prof["system"]["engine"].update(eager_layer_ms=1.5, eager_step_extra_ms=2.0)
    sm = model(prof)
    eng, layers = L.engine_layout(), QWEN.num_moe_layers
    # decode rows: 1 ms attention + 1 ms experts on the GPU > 1.5 ms host
    t = sm.eager_step(eng, 64, 0.0, 64, 64, 1, decode_ctx=500.0)
    assert t == pytest.approx(layers * 2.0e-3 + 2.0e-3)
    prof["system"]["engine"]["eager_layer_ms"] = 3.0  # host-bound now
    sm = model(prof)
    assert sm.eager_step(eng, 64, 0.0, 64, 64, 1, decode_ctx=500.0) == pytest.approx(layers * 3.0e-3 + 2.0e-3)
    assert sm.eager_step(eng, 64, 0.0, 64, 64, 2, decode_ctx=500.0) == pytest.approx(layers * 6.0e-3 + 2.0e-3)
    replay = sm.decode_step(eng, 64, 1, 500.0).step_s
    assert sm.capture_step(eng, 64, 1, 500.0) == pytest.approx(QWEN.num_layers * 3.0e-3 + 2.0e-3 + replay)


def test_first_visits_of_a_bucket_run_the_static_path_host_cost():
    """A decode bucket's first visit (and a capture's launches) costs the static path's host time per layer,
    measured in the engine's graphed runs (their tails) and used by the 1-rank runtime too; without it the
    mode's graphs-off eager layer. Steps are told apart by the graph cache's counters."""
    from afsplit.planner.engine_runs import step_kind
    from afsplit.planner.system_runs import SystemPlan, fit_system

    assert step_kind((4, 2, 1), (5, 2, 1), True) == "first" and step_kind((5, 2, 1), (6, 3, 2), True) == "capture"
    assert step_kind((6, 3, 2), (7, 4, 2), True) == "replay" and step_kind((7, 4, 2), (7, 4, 2), True) == "eager"
    assert step_kind(None, None, True) == "eager" and step_kind((1, 0, 0), (2, 0, 0), False) == "chunk"
    plan = SystemPlan(depths=(2, 10))
    eng = {"graphs": {d: {8: 1.0 + 0.2 * d, 64: 1.2 + 0.3 * d} for d in plan.depths},
           "first": {2: {8: 3.0, 64: 4.0}, 10: {8: 9.0, 64: 12.0}}}
    assert fit_system(eng, {}, lambda b: 0.25e-3, lambda rows: 0.0, plan)["engine"]["static_eager_layer_ms"] == 1.0

    prof = profile()
    prof["system"]["engine"].update(eager_layer_ms=3.0, eager_step_extra_ms=2.0)
    prof["system"]["runtime"].update(eager_layer_ms=5.0, eager_step_extra_ms=2.0)
    eng_l, col, layers = L.engine_layout(), L.colocated(1, 1), QWEN.num_moe_layers
    first = model(prof).eager_step(eng_l, 64, 0.0, 64, 64, 1, decode_ctx=500.0, rows=64)
    assert first == pytest.approx(layers * 3.0e-3 + 2.0e-3)  # no static measurement: the graphs-off layer
    assert model(prof).eager_step(col, 64, 0.0, 64, 64, 1, decode_ctx=500.0, rows=64) == pytest.approx(
        layers * 5.0e-3 + model(prof)._step_extras(col, 64, eager=True))
    prof["system"]["engine"]["static_eager_layer_ms"] = 4.0
    sm = model(prof)
    for lay in (eng_l, col):
        extras = sm._step_extras(lay, 64, eager=True)
        assert sm.eager_step(lay, 64, 0.0, 64, 64, 1, decode_ctx=500.0, rows=64) == pytest.approx(
            layers * 4.0e-3 + extras)
        # graphs off (no bucket rows): the mode's own eager metadata path
        own = 3.0e-3 if lay is eng_l else 5.0e-3
        assert sm.eager_step(lay, 64, 0.0, 64, 64, 1, decode_ctx=500.0) == pytest.approx(layers * own + extras)
        replay = sm.decode_step(lay, 64, 1, 500.0).step_s
        assert sm.capture_step(lay, 64, 1, 500.0) == pytest.approx(QWEN.num_layers * 4.0e-3 + 2.0e-3 + replay)


def test_mixed_steps_price_decode_rows_from_the_mixed_points():
    """The profile's mixed points (a prompt piece plus k decode rows, and the piece alone, GPU time) give what one
    decode row adds: per query block of the longest piece (the grid's programs that exit at once), per key tile
    of its context, fixed; a chunk step then prices only the prompt pieces on tiles and adds that per decode row.
    Without the points every row goes on the tiles, as before."""
    from types import SimpleNamespace

    from afsplit.planner.fitting import flash_tile_pairs
    from afsplit.planner.simulate import GraphCacheModel, _step_time

    row_ms = lambda n, c: 0.002 * math.ceil(n / 128) + 0.003 * math.ceil(c / 128) + 0.001  # noqa: E731
    prof = profile()
    prof["attention_mixed"] = {"decodes": 4, "points": [
        {"prompt_len": n, "decode_ctx": c, "alone_ms": 1.0, "ms": 1.0 + 4 * row_ms(n, c)}
        for n in (512, 2048) for c in (512, 2048)]}
    b = BlockTimes(prof, QWEN)
    # (less the 4 rows' share of the GEMMs and per-token kernels: a few ns here)
    assert b._mixed_fit == pytest.approx((2e-6, 3e-6, 1e-6), rel=1e-3, abs=1e-8)
    assert b.mixed_decode_row(512, 1000) == pytest.approx(row_ms(512, 1000) * 1e-3, rel=1e-3, abs=1e-8)

    seqs = [SimpleNamespace(num_computed_tokens=p, num_tokens=t) for p, t in ((0, 512), (700, 701), (900, 901))]
    batch = SimpleNamespace(seqs=seqs, num_tokens=[512, 1, 1])
    col = L.colocated(1, 1)
    for prof_, mixed in ((prof, True), (profile(), False)):
        sm = model(prof_)
        kind, t = _step_time(sm, col, batch, 1, None, True, "direct", GraphCacheModel(), True)
        bm, bn = sm.blocks.prefill_tiles
        piece = flash_tile_pairs(512, 0, bm, bn)
        if mixed:
            extra = sm.blocks.mixed_decode_row(512, 700) + sm.blocks.mixed_decode_row(512, 900)
            want = sm.eager_step(col, 514, piece, 3, 3, 1, "direct", attention_extra=extra)
            assert extra == pytest.approx((row_ms(512, 700) + row_ms(512, 900)) * 1e-3, rel=1e-3, abs=2e-8)
        else:
            tiles = piece + flash_tile_pairs(1, 700, bm, bn) + flash_tile_pairs(1, 900, bm, bn)
            want = sm.eager_step(col, 514, tiles, 3, 3, 1, "direct")
        assert kind == "chunk" and t == pytest.approx(want)


def test_shapes_and_padded_exchange_bytes():
    assert QWEN.routed_expert_bytes_total == 128 * 48 * 3 * 2048 * 768 * 2
    assert QWEN.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2
    assert QWEN.dispatch_row_bytes() == 2048 * 2 + 8 * 8 and QWEN.combine_row_bytes() == 4096
    ds = resolve_shape("deepseek-v3")
    assert not ds.runnable and ds.kv_bytes_per_token_layer == (512 + 64) * 2 and ds.num_moe_layers == 58
    lay = L.af_per_node(2, 6, 1)
    assert exchange_bytes_per_sender(lay, 24, QWEN) == 6 * 24 * QWEN.dispatch_row_bytes()  # P rows to every expert rank
    assert exchange_bytes_per_sender(L.colocated(8, 1), 24, QWEN) == 7 * 24 * QWEN.dispatch_row_bytes()
    assert rows_per_pair(lay, 20, 24, 8, "padded") == 24
    assert rows_per_pair(lay, 20, 24, 8, "exact") == pytest.approx(20 * (1 - (5 / 6) ** 8))
    assert [bucket(n) for n in (1, 3, 5, 9, 17, 64, 65)] == [1, 4, 8, 16, 24, 64, 72]
    with pytest.raises(ConfigError, match="not a preset"):
        resolve_shape("no-such-model")


def test_exchange_links_and_two_phase():
    """direct within a node is one NVLink stage; across nodes two_phase sends fewer, larger messages."""
    from afsplit.planner.profile_data import Link

    shape = QWEN

    intra, inter = Link(2e-6, 200e9), Link(5e-6, 50e9, 4e-6)
    one = L.af_per_node(2, 2, 1)
    d, c = exchange_times(one, 8, shape, intra, inter, 1e-5, "direct")
    assert d == pytest.approx(1e-5 + 2e-6 + 2 * 8 * shape.dispatch_row_bytes() / 200e9)
    assert c == pytest.approx(1e-5 + 2e-6 + 2 * 8 * shape.combine_row_bytes() / 200e9)
    assert exchange_times(one, 8, shape, intra, inter, 1e-5, "two_phase") == (d, c)  # one node: the same
    wide = L.af_across_nodes(4, 4, 8)  # 32 attention ranks x 32 expert ranks, every pair crosses the network
    dd, _ = exchange_times(wide, 1, shape, intra, inter, 1e-6, "direct")
    tp, _ = exchange_times(wide, 1, shape, intra, inter, 1e-6, "two_phase")
    assert dd == pytest.approx(1e-6 + 5e-6 + 32 * 4e-6 + 32 * shape.dispatch_row_bytes() / 50e9)
    assert tp < dd  # 4 packets per gateway instead of 32 messages per rank
    single = L.colocated(1, 1)
    assert exchange_times(single, 64, shape, intra, inter, 3e-5, "direct") == (3e-5, 3e-5)  # own region: no link


def test_pingpong_rule_is_megascale_infers():
    """With Ta = Te = Tf and D = C = Tc <= Tf the layer is m Tf exactly when m >= 2 (Tf + Tc) / Tf."""
    for tf, tc in ((1.0, 0.25), (1.0, 1.0), (0.5, 0.1)):
        for m in range(1, 7):
            layer, neck = pingpong_layer("af", m, tf, tf, tc, tc)
            hidden = m >= 2 * (tf + tc) / tf
            assert layer == pytest.approx(m * tf if hidden else 2 * tf + 2 * tc)
            assert (neck == "round trip") == (m * tf < 2 * tf + 2 * tc)
    # a link slower than the compute: the channels' occupancy m Tc bounds the layer instead
    assert pingpong_layer("af", 4, 0.3, 0.3, 0.7, 0.7) == (pytest.approx(2.8), "exchange")
    assert pingpong_layer("colocated", 2, 1.0, 2.0, 0.1, 0.1) == (6.0, "compute")
    assert pingpong_layer("engine", 3, 1.0, 2.0, 9.0, 9.0) == (9.0, "compute")


def test_flat_profile_step_times_are_exact():
    """1 ms attention and 1 ms experts per micro-batch, 0.25 ms per exchange call, free links."""
    sm = model(profile())
    layers = QWEN.num_moe_layers
    af = L.af_per_node(1, 1, 1)
    for m, per_layer in ((1, 2.5), (2, 2.5), (3, 3.0), (4, 4.0)):
        r = sm.decode_step(af, 64, m, 500)
        assert r.step_s == pytest.approx(layers * per_layer * 1e-3), m
    assert sm.decode_step(af, 64, 1, 500).bottleneck == "round trip"
    assert sm.decode_step(af, 64, 3, 500).bottleneck in ("attention", "experts")
    assert sm.decode_step(L.colocated(1, 1), 64, 1, 500).step_s == pytest.approx(layers * 2.5e-3)
    assert sm.decode_step(L.engine_layout(), 64, 1, 500).step_s == pytest.approx(layers * 2.0e-3)
    r = sm.decode_step(af, 64, 3, 500)
    assert r.tokens_per_s_per_gpu == pytest.approx(64 / r.step_s / 2)


def test_linear_profile_af_step_by_hand():
    """Linear tables (interpolation is exact on them): an AF 2A+2E step computed by hand."""
    att = lambda b, c: 0.05 + 0.002 * b + 1e-6 * b * c  # noqa: E731
    moe = lambda s, n: 0.02 + 0.004 * s + 0.0005 * n  # noqa: E731
    prof = profile(att=att, moe=moe, call_ms=0.1, overhead_ms=1.5, intra=(3.0, 300e9))
    sm = model(prof)
    lay, B, m, ctx = L.af_per_node(2, 2, 1), 64, 2, 700.0
    rows, k, E = 32, QWEN.top_k, QWEN.num_experts
    ta, te = att(rows, ctx), moe(E // 2, 2 * rows * k / 2)
    d = 0.1 + 3e-3 + 1e3 * 2 * rows * QWEN.dispatch_row_bytes() / 300e9
    c = 0.1 + 3e-3 + 1e3 * 2 * rows * QWEN.combine_row_bytes() / 300e9
    layer = max(m * ta, m * te, m * d, m * c, ta + d + te + c)
    r = sm.decode_step(lay, B, m, ctx)
    assert r.moe_layer_s == pytest.approx(layer * 1e-3, rel=1e-9)
    assert r.step_s == pytest.approx((QWEN.num_moe_layers * layer + 1.5) * 1e-3, rel=1e-6)


def test_imbalance_is_the_balancers_with_a_routing_floor():
    bal = {"expert_ranks": [1, 4, 16], "max_over_mean": [1.0, 1.2, 1.5], "round_robin": [1.0, 1.5, 2.5],
           "spare_fraction": 0.25, "source": "test"}
    sm = model(profile(balancer=bal), imbalance=None)
    rr = model(profile(balancer=bal), imbalance=None)
    rr.balancer = "none"
    assert sm.imbalance(4, 1e9) == pytest.approx(1.2) and rr.imbalance(4, 1e9) == pytest.approx(1.5)
    assert sm.spare_slots(L.af_per_node(2, 6, 1)) == math.ceil(0.25 * 128 / 6) and rr.spare_slots(L.colocated(8, 1)) == 0
    assert sm.spare_slots(L.colocated(1, 1)) == 0
    assert sm.imbalance(8, 1e9) == pytest.approx(1.35)  # interpolated in log2(ranks)
    assert sm.imbalance(16, 4.0) == pytest.approx(poisson_max_over_mean(16, 4.0))  # few tokens: routing noise
    assert poisson_max_over_mean(1, 3.0) == 1.0
    _, pairs = sm.expert_time(L.af_per_node(2, 6, 1), 30)  # 2 x 30 tokens x 8 / 6 ranks, 22 of 128 / 6 slots
    mean = 2 * 30 * 8 / 6
    assert pairs == pytest.approx(mean * (22 * 6 / 128) * sm.imbalance(6, mean))


def test_memory_and_kv_capacity():
    blocks = BlockTimes(profile(memory_gb=100.0), QWEN)
    lay = L.af_per_node(2, 6, 1)
    att, exp = role_memory(QWEN, lay, 10, 1000, 1, 8, blocks)
    assert exp.weights == 22 * 48 * QWEN.expert_bytes
    assert att.kv == 10 * 1000 * QWEN.kv_bytes_per_token and att.weights == QWEN.attention_weight_bytes_total
    why = memory_problem(QWEN, L.engine_layout(), 1000, 1300, 1, 1000, blocks)
    assert why and "engine GPU needs weights 61.1 GB + KV 127.8 GB (1000 seqs x 1300 tokens x 96 KiB)" in why
    assert "> 89.0 GB usable (100.0 GB x 0.95 - 6 GB reserve)" in why
    assert memory_problem(QWEN, lay, 10, 1000, 1, 8, blocks) is None


# ----------------------------------------------------------------------------------------------
# search and CLI


def test_cluster_arithmetic_and_layouts():
    with pytest.raises(ConfigError, match=r"--gpus 12 is not a whole number of nodes .*12 = 1 x 8 \+ 4"):
        check_cluster(12, 8)
    assert check_cluster(4, 8) == (1, 4) and check_cluster(64, 8) == (8, 8)
    labels = [lay.label() for lay, _ in instance_layouts(16, 8)]
    assert "AF 2A+6E x 2" in labels and "AF 8A x 1, 8E x 1" in labels and "colocated 8/node x 2" in labels
    assert "single GPU (engine)" in labels
    insts = dict((lay.label(), n) for lay, n in instance_layouts(16, 8))
    assert insts["AF 2A+6E x 1"] == 2 and insts["colocated 8/node x 2"] == 1
    assert sum(1 for lay, _ in instance_layouts(8192, 8)) < 500  # thousands of GPUs: a bounded search


def test_search_sizes_the_heavy_side_and_reports_rejections():
    """Expensive experts, cheap attention: the best AF layout gives the experts more GPUs."""
    prof = profile(att=lambda b, c: 0.05 + 0.0005 * b, moe=lambda s, n: 0.05 + 0.05 * s + 0.0005 * n, call_ms=0.01)
    sm = model(prof)
    res = Planner(sm, 8, 8, Workload(512, 128)).search(tpot_ms=200.0)
    af = [c for c in res.candidates if c.layout.kind == "af"]
    assert af and af[0].layout.num_expert_ranks > af[0].layout.num_attention_ranks
    assert res.best_colocated is not None and res.best.gain == pytest.approx(
        res.best.tokens_per_s_per_gpu / res.best_colocated.tokens_per_s_per_gpu)
    wide = Planner(sm, 256, 8, Workload(512, 128)).search(tpot_ms=200.0)
    assert "experts" in wide.rejected and "expert ranks > 128 experts" in wide.examples["experts"]
    tight = Planner(sm, 8, 8, Workload(512, 128)).search(tpot_ms=0.001)
    assert not tight.candidates and "TPOT" in tight.examples


def test_plan_cli_writes_a_config_check_config_accepts(tmp_path, capsys):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(h200_estimate(QWEN)))
    out = tmp_path / "plan.yaml"
    rc = main(["plan", "--model", "qwen3-30b-a3b", "--profile", str(prof), "--gpus", "16", "--gpus-per-node", "8",
               "--tpot-ms", "50", "--ttft-ms", "5000", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "TPOT ms" in text and "gain" in text and f"wrote {out}" in text
    assert main(["check-config", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["model"]["preset"] == "qwen3-30b-a3b" and cfg["runtime"]["max_num_seqs"] >= 1
    assert main(["plan", "--model", "qwen3-30b-a3b", "--profile", str(prof), "--gpus", "12", "--gpus-per-node", "8",
                 "--tpot-ms", "50"]) == 2
    assert "12 = 1 x 8 + 4" in capsys.readouterr().err
    assert main(["plan", "--model", "deepseek-v3", "--profile", str(prof), "--gpus", "8", "--tpot-ms", "50"]) == 2
    err = capsys.readouterr().err
    assert "no plan for deepseek-v3 on 8 GPUs" in err and "GB usable" in err
    assert main(["plan", "--model", "deepseek-v3", "--profile", str(prof), "--gpus", "64", "--tpot-ms", "200",
                 "--out", str(tmp_path / "ds.yaml")]) == 2
    assert "a config needs a model afsplit can serve" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "afsplit-profile/1", "model": {}}))
    assert main(["plan", "--model", "qwen3-30b-a3b", "--profile", str(bad), "--gpus", "8", "--tpot-ms", "50"]) == 2
    assert "missing section(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# simulation and validation


def _run_files(tmp_path, prof_dict, runs):
    """A config (Qwen3 shapes, random weights: only the shape is read) and one stats JSON per run."""
    cfg = tmp_path / "q.yaml"
    cfg.write_text("model: {weights: random, preset: qwen3-30b-a3b, dtype: bfloat16, max_model_len: 4096}\n"
                   "topology: {device: cuda, nodes: [{colocated: 1}]}\n"
                   "runtime: {max_num_seqs: 64, kv_cache_memory_gb: 8, max_num_batched_tokens: 2048}\n"
                   "comm: {transport: direct, metadata: padded}\n")
    prof = tmp_path / "prof.json"
    prof.write_text(json.dumps(prof_dict))
    d = tmp_path / "runs"
    d.mkdir()
    for name, body in runs.items():
        (d / f"{name}.json").write_text(json.dumps({"config": str(cfg), "overrides": [], "steps": 1, **body}))
    return prof, d


def test_simulated_run_follows_the_scheduler(tmp_path):
    """16 requests of 512 tokens, budget 2048 tokens: the prompts' 8192 tokens take 5 steps (running decodes
    go first, so later prompts are cut into chunks; the last samples its first token in step 5), then 7
    decode steps; flat 1 ms blocks make every graphed decode step 48 x 2.5 ms."""
    from afsplit.config import load_config
    from afsplit.planner.simulate import predict_run

    prof, _ = _run_files(tmp_path, profile(), {})
    cfg = load_config(tmp_path / "q.yaml")
    sm = model(json.loads(prof.read_text()))
    pred = predict_run(sm, L.colocated(1, 1), cfg, 16, 512, 8, 1, graphs=True)
    assert pred.generated_tokens == 16 * 8
    assert pred.decode_step_ms_median == pytest.approx(48 * 2.5)
    assert pred.steps == 5 + 7
    assert set(pred.kinds) == {"admit", "chunk", "eager_decode", "capture", "replay"}
    warm = predict_run(sm, L.colocated(1, 1), cfg, 16, 512, 8, 1, graphs=True, warm_start=True)
    assert set(warm.kinds) == {"admit", "chunk", "replay"} and not warm.captured  # every bucket captured at start
    assert warm.kinds["replay"][0] == 7 and warm.steps == pred.steps


def test_validate_prints_each_runs_error_and_the_max_last(tmp_path, capsys):
    from afsplit.planner.validate import RecordedRun, predict

    prof_dict = h200_estimate(QWEN)
    prof, runs = _run_files(tmp_path, prof_dict, {})
    wl = {"input_len": 256, "output_len": 32, "num_requests": 8}
    run = RecordedRun("x", str(tmp_path / "q.yaml"), [], "runtime", 256, 32, 8, 1.0, 1.0)
    pred, _, _ = predict(run, prof_dict)
    exact = {"workload": wl, "decode_step_ms_median": pred.decode_step_ms_median,
             "tokens_per_s_per_gpu": pred.tokens_per_s_per_gpu}
    (runs / "a.json").write_text(json.dumps({"config": str(tmp_path / "q.yaml"), "overrides": [], "steps": 1, **exact}))
    off = dict(exact, decode_step_ms_median=pred.decode_step_ms_median / 1.1)
    (runs / "b.json").write_text(json.dumps({"config": str(tmp_path / "q.yaml"), "overrides": [], "steps": 1, **off}))
    (runs / "c.json").write_text(json.dumps({"config": "q.yaml", "overrides": [], "steps": 3,
                                             "decode_step_ms_median": 1.0, "tokens_per_s_per_gpu": 1.0}))
    pred_e, layout, _ = predict(replace(run, mode="engine"), prof_dict)
    assert layout.kind == "engine" and pred_e.decode_step_ms_median < pred.decode_step_ms_median  # no exchange
    eng = dict(exact, mode="engine", decode_step_ms_median=pred_e.decode_step_ms_median,
               tokens_per_s_per_gpu=pred_e.tokens_per_s_per_gpu * 1.05)
    (runs / "d.json").write_text(json.dumps({"config": str(tmp_path / "q.yaml"), "overrides": [], "steps": 1, **eng}))
    assert main(["plan", "validate", "--profile", str(prof), str(runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "max relative error 0.100 over 3 runs"
    assert any("skipped" in ln and "c.json" in ln and "no workload" in ln for ln in lines)
    assert any("a.json" in ln and "+0.0%" in ln for ln in lines)
    assert any("d.json" in ln and "engine" in ln and "-4.8%" in ln for ln in lines)


def test_fit_system_recovers_overheads_and_exchange_cost():
    from afsplit.planner.system_runs import SystemPlan, fit_system

    plan = SystemPlan(depths=(2, 10))
    layer = {8: 0.4, 128: 0.6}  # ms per layer in the engine; the tables say 0.5 at both
    eng = {"graphs": {d: {b: 1.0 + 0.01 * b + d * layer[b] for b in layer} for d in plan.depths},
           "eager": {2: 5.0, 10: 13.0}}
    rt = {d: {b: 1.5 + 0.01 * b + d * (layer[b] + 0.2) for b in layer} for d in plan.depths}
    sysd = fit_system(eng, rt, layer_table=lambda b: 0.5e-3, head=lambda rows: 0.2e-3, plan=plan)
    assert sysd["engine"]["layer_scale"] == pytest.approx([0.8, 1.2])
    assert sysd["engine"]["step_overhead_ms"] == pytest.approx([1.08 - 0.2, 2.28 - 0.2])
    assert sysd["engine"]["eager_layer_ms"] == pytest.approx(1.0)
    assert sysd["runtime"]["exchange_call_ms"] == pytest.approx([0.1, 0.1])
    assert sysd["runtime"]["step_overhead_ms"] == pytest.approx([1.58 - 0.2, 2.78 - 0.2])


def test_deep_point_is_the_models_own_depth_where_it_fits(tmp_path):
    """The whole runs' deeper copy is the model's own 48 layers when weights + KV fit in 80% of the GPU (the
    slope from 2 layers is then the mean of all its layers), else the plan's 16."""
    from afsplit.config import load_config
    from afsplit.planner.system_runs import FULL, deep_plan

    cfg_path = tmp_path / "q.yaml"
    cfg_path.write_text("model: {weights: random, preset: qwen3-30b-a3b, dtype: bfloat16}\n"
                        "topology: {device: cuda, nodes: [{colocated: 1}]}\n")
    cfg = load_config(cfg_path)
    # 48 layers of Qwen3-30B-A3B: ~61 GB of weights + ~37 GB of KV for the plan's runs
    assert deep_plan(cfg, FULL, 143.8e9).depths == (2, 48)
    assert deep_plan(cfg, FULL, 110e9).depths == FULL.depths == (2, 16)


def test_work_outside_steps_is_measured_per_prompt_token_and_added_to_the_wall(tmp_path):
    """The runs' wall time minus their steps' is the driver's and coordinator's work per prompt token (both
    modes measure their own); a predicted run's wall time (and so its tokens/s) adds it, its steps do not."""
    from afsplit.config import load_config
    from afsplit.planner.simulate import predict_run
    from afsplit.planner.system_runs import SystemPlan, fit_system, runtime_gap

    plan = SystemPlan(depths=(2, 10))
    layer = {8: 0.4, 128: 0.6}
    eng = {"graphs": {d: {b: 1.0 + d * layer[b] for b in layer} for d in plan.depths},
           "gap": {d: {8: [0.001, 1024], 128: [0.003, 16384]} for d in plan.depths}}
    rt = {d: {b: 1.5 + d * layer[b] for b in layer} for d in plan.depths}
    rt_gap = {d: {8: [0.002, 1024], 128: [0.012, 16384]} for d in plan.depths}
    sysd = fit_system(eng, rt, layer_table=lambda b: 0.5e-3, head=lambda rows: 0.0, plan=plan, rt_gap=rt_gap)
    assert sysd["engine"]["admit_us_per_prompt_token"] == pytest.approx(1e6 * 0.004 / 17408)
    assert sysd["runtime"]["admit_us_per_prompt_token"] == pytest.approx(1e6 * 0.014 / 17408)
    # a 1-rank runtime's stats: its phases per MoE layer and step add up to its steps' time
    stats = {"wall_s": 1.0, "steps": 10, "per_layer_ms": {"attention": {"attention": 2.0, "dispatch": 1.0}}}
    assert runtime_gap(stats, 30) == pytest.approx(1.0 - 1e-3 * 3.0 * 10 * 30)

    prof, _ = _run_files(tmp_path, profile(), {})
    cfg = load_config(tmp_path / "q.yaml")
    base = predict_run(model(json.loads(prof.read_text())), L.colocated(1, 1), cfg, 16, 512, 8, 1, graphs=True)
    with_admit = json.loads(prof.read_text())
    with_admit["system"]["runtime"]["admit_us_per_prompt_token"] = 2.0
    with_admit["system"]["engine"]["admit_us_per_prompt_token"] = 7.0  # the engine's: not the runtime's
    pred = predict_run(model(with_admit), L.colocated(1, 1), cfg, 16, 512, 8, 1, graphs=True)
    assert pred.wall_s == pytest.approx(base.wall_s + 2e-6 * 16 * 512)
    assert pred.decode_step_ms_median == base.decode_step_ms_median and pred.kinds["admit"][0] == 1
    assert pred.tokens_per_s_per_gpu == pytest.approx(16 * 8 / pred.wall_s)


@pytest.mark.slow
def test_profile_on_cpu_tiny_model_end_to_end(tmp_path, capsys):
    """`afsplit profile --quick` on the CPU: kernel tables, engine and 1-rank runtime runs of shallow copies;
    the profile feeds `afsplit plan` for the tiny model's directory."""
    from afsplit.config import load_config
    from afsplit.engine import resolve_model

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(f"model: {{path: {tmp_path / 'tiny'}, tiny: qwen3_moe, dtype: float32}}\n"
                        "topology: {device: cpu, nodes: [{colocated: 1}]}\n"
                        "runtime: {num_kv_blocks: 64, max_num_seqs: 4, max_num_batched_tokens: 128}\n")
    resolve_model(load_config(cfg_path))
    out = tmp_path / "prof.json"
    assert main(["profile", "--config", str(cfg_path), "--out", str(out), "--quick"]) == 0
    prof = json.loads(out.read_text())
    check_profile(prof)
    pts = prof["system"]["points"]
    # both depths ran in both modes (timings on a busy CPU are noise: only the mechanics are checked)
    assert set(pts["engine"]["graphs"]) == {"1", "2"} and set(pts["engine"]["eager"]) == {"1", "2"}
    assert set(pts["runtime"]) == {"1", "2"}, prof["system"].get("errors")
    assert set(pts["engine"]["long"]) == {"1", "2"} and set(pts["runtime_eager"]) == {"1", "2"}
    assert len(prof["attention_mixed"]["points"]) == 4, prof["attention_mixed"].get("error")
    assert set(pts["engine"]["gap"]) == {"1", "2"} and set(pts["runtime_gap"]) == {"1", "2"}
    capsys.readouterr()
    assert main(["plan", "--model", str(tmp_path / "tiny"), "--profile", str(out), "--gpus", "2",
                 "--tpot-ms", "1e9", "--max-batch", "8"]) == 0
    assert "tables of this model" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# the shipped H200 measurement (docs/benchmarks/planner-h200: launch/planner_runs.sh on 1 H200)

SHIPPED = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "planner-h200"
EARLIER = SHIPPED.parent / "planner-h200-116c55e"  # the first measurement (the runtime of commit 116c55e)
REPEAT = SHIPPED.parent / "planner-h200-fb94180"  # the same day's repeat on the commit before the prefill changes
# (folder, runtime runs, runs, max error): what docs/benchmarks/planner-h200.md reports with each folder's own
# profile (0.115 over 10 runs; the repeat 0.108; the first measurement 0.162), with rounding room
MEASUREMENTS = [(SHIPPED, 5, 10, 0.12), (REPEAT, 5, 10, 0.115), (EARLIER, 5, 10, 0.165)]


@pytest.mark.parametrize("where,runtime_runs,_runs,_max_err", MEASUREMENTS)
def test_graph_cache_replay_matches_the_runtime_logs(where, runtime_runs, _runs, _max_err):
    """The lazy CUDA-graph cache replayed through the scheduler (warm-up, then the run) captures exactly the
    (m, bucket) graphs each shipped runtime run logged, in order; engine runs of one process inherit the
    graphs of the runs before them (their order from the engine log)."""
    from afsplit.planner.profile_data import load_profile
    from afsplit.planner.validate import find_runs, predict

    prof = load_profile(where / "profile.json")
    runs, _ = find_runs([str(where / "runs")])
    seen = 0
    for run in runs:
        name = Path(run.where).stem
        if run.mode == "engine":
            order = ["8x512x128", "64x512x128", "256x512x64", "64x2048x128", "32x4096x64"]  # ENGINE_RUNS
            mine = f"{run.num_requests}x{run.input_len}x{run.output_len}"
            assert [f"{b}x{i}x{o}" for b, i, o in run.earlier] == order[:order.index(mine)]
            continue
        lines = (where / "logs" / f"{name}.log").read_text().splitlines()
        after_warmup = lines[next(i for i, ln in enumerate(lines) if "run stats" in ln):]
        logged = [tuple(map(int, re.search(r"captured for \((\d+), (\d+)\)", ln).groups()))
                  for ln in after_warmup if "graph captured for" in ln]
        pred, _, _ = predict(run, prof)
        assert pred.captured == logged, name
        seen += 1
    assert seen == runtime_runs


@pytest.mark.parametrize("where,_runtime_runs,runs,max_err", MEASUREMENTS)
def test_shipped_h200_profile_and_runs_validate_within_the_reached_error(capsys, where, _runtime_runs, runs, max_err):
    assert main(["plan", "validate", "--profile", str(where / "profile.json"), str(where)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    got = re.fullmatch(r"max relative error ([0-9.]+) over (\d+) runs", last)
    assert got and int(got.group(2)) == runs and float(got.group(1)) <= max_err, last
