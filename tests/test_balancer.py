"""Expert placement, planner, least-loaded replica selection and statistics (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from afsplit.config import BalancerConfig
from afsplit.errors import ConfigError
from afsplit.placement_file import plan_experts_main, read_placement, resolve_placement, write_placement
from comm.balancer import LeastLoadedBalancer, StaticBalancer, gather_counts, local_counts
from comm.expert_stats import ExpertStatsRecorder, load_stats
from comm.placement import Placement, default_capacity
from comm.replica_planner import plan_placement, predicted_imbalance, uniform_placement
from comm.topology import NodeSpec, Topology
from launch.balancer_bench import balance_case


def topo_af(attention: int, expert_per_node: list[int]) -> Topology:
    return Topology((NodeSpec(attention=attention),) + tuple(NodeSpec(expert=n) for n in expert_per_node))


def skewed_counts(L: int, E: int, seed: int, s: float = 1.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(1, E + 1, dtype=torch.float64) ** -s * 10_000
    return torch.stack([base[torch.randperm(E, generator=g)].round() for _ in range(L)])


def random_topk(T: int, E: int, K: int, g: torch.Generator, skew: float = 1.0) -> torch.Tensor:
    logits = -skew * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=g, dtype=torch.float64)))
    return (logits + gumbel).topk(K, dim=1).indices


def check_served_by_replica(placement: Placement, layer: int, ids_TK, dest_TK, slot_TK) -> None:
    assert dest_TK.dtype == torch.int32 and slot_TK.dtype == torch.int32
    for e, j, s in zip(ids_TK.flatten().tolist(), dest_TK.flatten().tolist(), slot_TK.flatten().tolist()):
        assert placement.slots(layer, j)[s] == e


# ----------------------------------------------------------------------------------------------
# Placement and files


def test_round_robin_uneven():
    p = Placement.round_robin(2, 10, 4)
    assert p.layers[0] == ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
    assert p.layers[1] == p.layers[0] and not p.has_replicas()
    assert p.replicas(0, 7) == ((2, 1),)
    p.validate(capacity=default_capacity(10, 4))


def test_planner_capacity_and_coverage():
    for E, nodes, spare, distinct in [(16, [4], 2, False), (10, [2, 2], 1, True), (128, [8, 8], 2, True),
                                      (7, [3], 0, False), (12, [1, 1, 1], 5, True)]:
        topo = topo_af(2, nodes)
        n = len(topo.expert_ranks)
        counts = skewed_counts(3, E, seed=E)
        p = plan_placement(counts, topo, spare, distinct)
        cap = default_capacity(E, n, spare)
        p.validate(capacity=cap)  # every expert placed, no duplicates, capacity respected
        for l in range(p.num_layers):
            assert sum(p.num_replicas(l)) == E + min(n * spare, E * (n - 1))
            assert max(len(s) for s in p.layers[l]) <= cap
        if distinct and len(nodes) > 1:
            node_of_j = [topo.node_of(r) for r in topo.expert_ranks]
            for l in range(p.num_layers):
                for e in range(E):
                    nodes_used = [node_of_j[j] for j, _ in p.replicas(l, e)]
                    if len(nodes_used) <= len(nodes):
                        assert len(set(nodes_used)) == len(nodes_used), (E, l, e, nodes_used)


def test_planner_balances_prediction():
    topo = topo_af(2, [8])
    counts = skewed_counts(2, 64, seed=3, s=1.0)
    before = predicted_imbalance(Placement.round_robin(2, 64, 8), counts)
    after = predicted_imbalance(plan_placement(counts, topo, 2), counts)
    after_ll = predicted_imbalance(plan_placement(counts, topo, 2), counts, "least_loaded")
    assert max(after) < 1.02 < max(before)
    assert max(after_ll) < 1.02


def test_placement_file_roundtrip(tmp_path):
    topo = topo_af(2, [2, 2])
    planned = plan_placement(skewed_counts(5, 12, seed=1), topo, 2, True)
    same = Placement.round_robin(6, 12, 4)
    mixed = Placement(12, same.layers[:3] + planned.layers[:2] + same.layers[:1])
    for p in (planned, same, mixed):
        path = tmp_path / "p.yaml"
        write_placement(p, path, topology=topo, header="test")
        q = read_placement(path, p.num_layers, 12, topo, spare_slots_per_rank=2)
        assert q == p
        text = path.read_text()
        write_placement(q, path, topology=topo, header="test")
        assert path.read_text() == text
    assert "default:" in (tmp_path / "p.yaml").read_text()  # mixed: the common layer is the default
    write_placement(same, tmp_path / "s.yaml")
    assert "\nlayers:" not in (tmp_path / "s.yaml").read_text()


def _write(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, match", [
    ("default: {0: [0, 1], 1: [2, 3], 2: [0]}", r"default: expert rank 2 does not exist \(2 expert ranks by index: 0=rank 1, 1=rank 2\)"),
    ("default: {0: [0, 1], 1: [2]}", r"layer 0: expert 3 has no replica"),
    ("default: {0: [0, 1, 2, 3], 1: [2, 3]}", r"layer 0: expert rank 0 holds 4 experts > capacity 3"),
    ("slots_per_rank: 2\ndefault: {0: [0, 1, 2], 1: [3]}", r"expert rank 0 holds 3 experts > capacity 2 \(the file"),
    ("default: {0: [0, 1, 9], 1: [2, 3]}", r"layer 0: expert rank 0 slot 2: unknown expert id 9"),
    ("default: {0: [0, 1, 1], 1: [2, 3]}", r"expert rank 0 holds expert 1 twice"),
    ("layers: {0: {0: [0, 1], 1: [2, 3]}}", r"layer 1: not listed under `layers` and no `default`"),
    ("default: {0: [0, 1], 1: [2, 3]}\nlayers: {0: {0: [0, 1, 2, 3]}, 1: {0: [0, 1], 1: [2, 3, 0]}}",
     r"layer 0: expert rank 0 holds 4 experts > capacity 3"),
    ("default: {0: [0, 1], 1: [2, 3]}\nlayers: {2: {0: [0, 1, 2, 3]}}", r"layer 2 does not exist"),
    ("num_experts: 5\ndefault: {0: [0, 1], 1: [2, 3]}", r"num_experts: file says 5, the model/topology has 4"),
    ("defualt: {0: [0, 1], 1: [2, 3]}", r"unknown key 'defualt'"),
])
def test_placement_file_errors(tmp_path, text, match):
    topo = topo_af(1, [2])
    with pytest.raises(ConfigError, match=match):
        read_placement(_write(tmp_path, text), 2, 4, topo, spare_slots_per_rank=1)


# ----------------------------------------------------------------------------------------------
# Selection


def test_assignment_consistent_across_attention_ranks():
    """Every attention rank computes the same quotas; its share is its slice of the global
    assignment; the union of all shares realises the quotas exactly; each (token, k) goes to a
    replica of its logical expert."""
    g = torch.Generator().manual_seed(0)
    E, K, A = 32, 4, 3
    topo = topo_af(A, [2, 2, 2])
    placement = plan_placement(skewed_counts(2, E, seed=5), topo, 3, True)
    bal = LeastLoadedBalancer(placement, "cpu")
    for layer in range(2):
        ids = [random_topk(T, E, K, g, skew=1.1) for T in (37, 5, 64)]
        counts_AE = torch.stack([local_counts(x, E) for x in ids])
        q = bal.quotas(layer, counts_AE)
        assert torch.equal(q.sum(1), counts_AE.sum(0).long())  # rows sum to the totals
        held = bal.t.held_LEn[layer]
        assert not (q.bool() & ~held).any()  # only ranks that hold the expert
        shares = [bal.assign(layer, x, counts_AE.clone(), a) for a, x in enumerate(ids)]
        for a in range(A):  # recomputed "on another rank": bit-identical
            again = LeastLoadedBalancer(placement, "cpu").assign(layer, ids[a], counts_AE, a)
            assert torch.equal(again[0], shares[a][0]) and torch.equal(again[1], shares[a][1])
            check_served_by_replica(placement, layer, ids[a], *shares[a])
        # one rank holding every token (in attention-rank order) gets the concatenated shares
        glob = bal.assign(layer, torch.cat(ids), counts_AE.sum(0, keepdim=True), 0)
        assert torch.equal(glob[0], torch.cat([s[0] for s in shares]))
        assert torch.equal(glob[1], torch.cat([s[1] for s in shares]))
        union = torch.zeros_like(q).index_put_(
            (torch.cat(ids).flatten(), torch.cat([s[0] for s in shares]).flatten().long()),
            torch.ones(sum(x.numel() for x in ids), dtype=q.dtype), accumulate=True)
        assert torch.equal(union, q)


def test_fast_path_and_static():
    g = torch.Generator().manual_seed(1)
    p = Placement.round_robin(1, 10, 3)
    ids = random_topk(20, 10, 3, g)
    counts = local_counts(ids, 10)[None]
    d, s = LeastLoadedBalancer(p).assign(0, ids, counts, 0)
    ds, ss = StaticBalancer(p).assign(0, ids)
    assert torch.equal(d, ds) and torch.equal(s, ss)
    check_served_by_replica(p, 0, ids, d, s)
    q = plan_placement(skewed_counts(1, 10, 2), topo_af(1, [3]), 2)
    d, s = StaticBalancer(q).assign(0, ids)
    check_served_by_replica(q, 0, ids, d, s)
    assert all(j == q.replicas(0, e)[0][0] for e, j in zip(ids.flatten().tolist(), d.flatten().tolist()))


def test_inconsistent_counts_still_valid():
    """Counts that disagree with the tokens (a runtime bug) still map to real replicas."""
    g = torch.Generator().manual_seed(2)
    p = plan_placement(skewed_counts(1, 8, 4), topo_af(1, [4]), 2)
    ids = random_topk(16, 8, 2, g)
    bogus = torch.ones(2, 8, dtype=torch.int32)
    check_served_by_replica(p, 0, ids, *LeastLoadedBalancer(p).assign(0, ids, bogus, 1))


def test_even_split_iters0():
    g = torch.Generator().manual_seed(3)
    p = plan_placement(skewed_counts(1, 8, 4), topo_af(1, [4]), 2)
    bal = LeastLoadedBalancer(p, iters=0)
    ids = random_topk(50, 8, 2, g)
    counts = local_counts(ids, 8)[None]
    q = bal.quotas(0, counts)
    nrep = torch.tensor(p.num_replicas(0))
    assert torch.equal(q.sum(1), counts[0].long())
    assert ((q.max(1).values - torch.where(q.bool() | (nrep[:, None] == 0), q, 1 << 30).min(1).values) <= 1).all()
    check_served_by_replica(p, 0, ids, *bal.assign(0, ids, counts, 0))


def _swiglu_moe(x_TH, ids_TK, w_TK, w13_XIH, w2_XHI, index_TK):
    """Tiny reference MoE: every (token, k) through expert weights picked by index_TK."""
    T, K = ids_TK.shape
    w13 = w13_XIH[index_TK.flatten()]  # [T*K, 2I, H]
    w2 = w2_XHI[index_TK.flatten()]  # [T*K, H, I]
    xk = x_TH.repeat_interleave(K, 0)[:, :, None]  # [T*K, H, 1]
    gate, up = torch.bmm(w13, xk).chunk(2, dim=1)
    y = torch.bmm(w2, torch.nn.functional.silu(gate) * up)[..., 0]  # [T*K, H]
    return (y.view(T, K, -1) * w_TK[..., None]).sum(1)


def test_model_output_invariant_to_replica_choice():
    torch.manual_seed(0)
    E, H, I, K, T, A = 8, 16, 24, 2, 24, 2
    topo = topo_af(A, [3])
    p = plan_placement(skewed_counts(1, E, 7, s=1.5), topo, 2)
    assert p.has_replicas()
    w13_EIH = torch.randn(E, 2 * I, H, dtype=torch.float64)
    w2_EHI = torch.randn(E, H, I, dtype=torch.float64)
    # physical weights: every rank stacks the experts its slots name; flattened [rank, slot]
    cap = p.slots_per_rank
    phys13 = torch.zeros(3 * cap, 2 * I, H, dtype=torch.float64)
    phys2 = torch.zeros(3 * cap, H, I, dtype=torch.float64)
    for j in range(3):
        for s, e in enumerate(p.slots(0, j)):
            phys13[j * cap + s], phys2[j * cap + s] = w13_EIH[e], w2_EHI[e]
    xs = [torch.randn(T, H, dtype=torch.float64) for _ in range(A)]
    logits = [torch.randn(T, E, dtype=torch.float64) + torch.log(torch.arange(1, E + 1.0)) * -1.5 for _ in range(A)]
    routed = [torch.softmax(lg, -1).topk(K, dim=1) for lg in logits]
    counts_AE = torch.stack([local_counts(r.indices, E) for r in routed])
    outs = {}
    for name, bal in (("least", LeastLoadedBalancer(p)), ("static", StaticBalancer(p))):
        outs[name] = []
        for a in range(A):
            ids, w = routed[a].indices, routed[a].values
            d, s = bal.assign(0, ids, counts_AE, a)
            outs[name].append(_swiglu_moe(xs[a], ids, w, phys13, phys2, d.long() * cap + s.long()))
    for a in range(A):
        ref = _swiglu_moe(xs[a], routed[a].indices, routed[a].values, w13_EIH, w2_EHI, routed[a].indices)
        assert torch.equal(outs["least"][a], ref) and torch.equal(outs["static"][a], ref)


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("s", [1.0, 1.5])
def test_zipf_balance(s, n):
    """Planner + least-loaded selection keep max/mean expert-rank load <= 1.10 under Zipf routing
    (128 experts, 4096 tokens x top-8 per micro-batch over 4 attention ranks, 32 spare slots in
    all = 32 / n per rank, i.e. 25% more expert memory)."""
    r = balance_case(s=s, num_expert_ranks=n, spare_total=32, seed=0)
    print(f"\nZipf s={s} n={n}: max/mean round-robin {r['round_robin']:.3f}, planned no spare "
          f"{r['planned_no_spare']:.3f}, planned+spare static {r['planned_static']:.3f}, even "
          f"{r['planned_even']:.3f}, least-loaded {r['least_loaded']:.3f}")
    assert r["least_loaded"] <= 1.10


def test_least_loaded_adapts_to_drift():
    """Statistics from one routing, traffic from another: least-loaded beats the even split."""
    r = balance_case(s=1.2, num_expert_ranks=8, spare_total=32, seed=1, drift=True)
    assert r["least_loaded"] <= r["planned_even"] + 1e-9


# ----------------------------------------------------------------------------------------------
# Statistics, config resolution, CLI


def test_stats_record_dump_load(tmp_path):
    g = torch.Generator().manual_seed(4)
    p = plan_placement(skewed_counts(2, 8, 4), topo_af(1, [2]), 1)
    bal = LeastLoadedBalancer(p)
    rec = ExpertStatsRecorder(2, 8, 2)
    total = torch.zeros(2, 8, dtype=torch.int64)
    path = tmp_path / "stats.jsonl"
    for step in range(3):
        for layer in range(2):
            ids = random_topk(10, 8, 2, g)
            d, _ = bal.assign(layer, ids, local_counts(ids, 8)[None], 0)
            rec.record(layer, ids, d)
            total[layer] += torch.bincount(ids.flatten(), minlength=8)
        if step != 1:
            rec.dump(path)
    rec.dump(path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) == {"layer", "expert_counts", "rank_counts", "tokens"}
    assert sum(x["tokens"] for x in lines) == 3 * 2 * 10
    assert all(sum(x["rank_counts"]) == sum(x["expert_counts"]) for x in lines)
    assert torch.equal(load_stats(path), total)
    assert load_stats(path, num_layers=4).shape == (4, 8)
    with pytest.raises(ConfigError, match=r"stats.jsonl:\d+: layer 1 out of range"):
        load_stats(path, num_layers=1)
    (tmp_path / "bad.jsonl").write_text('{"layer": 0, "expert_counts": [1, 2]}\n{"layer": 1, "expert_counts": [1]}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: layer 1: 1 expert counts, expected 2"):
        load_stats(tmp_path / "bad.jsonl")


def test_resolve_placement(tmp_path):
    topo = topo_af(1, [2, 2])
    none = resolve_placement(BalancerConfig(), 3, 16, topo)
    assert none == Placement.round_robin(3, 16, 4)
    auto = resolve_placement(BalancerConfig(replicas="auto", spare_slots_per_rank=1,
                                            replicas_on_distinct_nodes=True), 3, 16, topo)
    assert auto == uniform_placement(3, 16, topo, 1, True) and sum(auto.num_replicas(0)) == 20
    assert auto.replicas(0, 0)[0][0] // 2 != auto.replicas(0, 0)[1][0] // 2  # different nodes
    stats = tmp_path / "s.jsonl"
    stats.write_text("".join(json.dumps({"layer": l, "expert_counts": skewed_counts(1, 16, l)[0].long().tolist()}) + "\n"
                             for l in range(3)))
    planned = resolve_placement(BalancerConfig(replicas="auto", spare_slots_per_rank=2, stats_path=str(stats)), 3, 16, topo)
    assert planned == plan_placement(load_stats(stats), topo, 2)
    write_placement(planned, tmp_path / "p.yaml")
    assert resolve_placement(BalancerConfig(replicas=str(tmp_path / "p.yaml"), spare_slots_per_rank=2), 3, 16, topo) == planned
    with pytest.raises(ConfigError, match="capacity 4"):
        resolve_placement(BalancerConfig(replicas=str(tmp_path / "p.yaml")), 3, 16, topo)


def test_plan_experts_cli(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {path: /nonexistent}\n"
                   "topology: {nodes: [{attention: 2}, {expert: 2}, {expert: 2}]}\n"
                   "balancer: {replicas: auto, spare_slots_per_rank: 1}\n")
    stats = tmp_path / "stats.jsonl"
    counts = skewed_counts(3, 32, seed=9)
    stats.write_text("".join(json.dumps({"layer": l, "expert_counts": counts[l].long().tolist(),
                                         "rank_counts": [], "tokens": 1}) + "\n" for l in range(3)))
    out = tmp_path / "placement.yaml"
    assert plan_experts_main(["--stats", str(stats), "--topology", str(cfg), "--out", str(out),
                              "--spare-slots", "2", "--distinct-nodes"]) == 0
    printed = capsys.readouterr().out
    assert "round-robin" in printed and "worst" in printed
    topo = topo_af(2, [2, 2])
    p = read_placement(out, 3, 32, topo, spare_slots_per_rank=2)
    assert p == plan_placement(counts, topo, 2, True)
    assert "global rank 2, node 1" in out.read_text()
    with pytest.raises(ConfigError, match="cannot read expert statistics"):
        plan_experts_main(["--stats", str(tmp_path / "missing"), "--topology", str(cfg), "--out", str(out)])


def _gather_worker(rank: int, world: int, store_path: str, result_path: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        counts = torch.arange(5, dtype=torch.int32) * (rank + 1)
        out = gather_counts(counts)
        torch.save(out, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_counts_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "res")), nprocs=2, join=True)
    want = torch.stack([torch.arange(5, dtype=torch.int32) * (r + 1) for r in range(2)])
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"res.{r}"), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_graph_capture():
    g = torch.Generator().manual_seed(5)
    p = plan_placement(skewed_counts(1, 64, 6), topo_af(4, [8]), 4)
    ids = [random_topk(256, 64, 8, g) for _ in range(4)]
    ids[2][200:] = -1  # CUDA-graph padding rows: routed nowhere
    counts = torch.stack([local_counts(x, 64) for x in ids])
    cpu = LeastLoadedBalancer(p, "cpu").assign(0, ids[2], counts, 2)
    assert (cpu[0][200:] == -1).all() and (cpu[1][200:] == -1).all() and (cpu[0][:200] >= 0).all()
    gpu_bal = LeastLoadedBalancer(p, "cuda")
    gpu = gpu_bal.assign(0, ids[2].cuda(), counts.cuda(), 2)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    static_ids, static_counts = ids[2].cuda(), counts.cuda()
    for _ in range(2):
        gpu_bal.assign(0, static_ids, static_counts, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu_bal.assign(0, static_ids, static_counts, 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0].cpu(), cpu[0]) and torch.equal(out[1].cpu(), cpu[1])


def test_padding_ids_go_nowhere_and_are_not_counted():
    """Slots with id -1 (rows of a CUDA-graph bucket beyond the batch) get dest = slot = -1, change nothing for
    the real rows, and are not counted by local_counts or the statistics recorder."""
    g = torch.Generator().manual_seed(9)
    p = plan_placement(skewed_counts(1, 32, 4), topo_af(2, [4]), 3)
    assert p.has_replicas(0)
    real = random_topk(40, 32, 4, g)
    padded = torch.cat([real[:25], torch.full((7, 4), -1), real[25:]])
    counts = torch.stack([local_counts(real, 32), local_counts(random_topk(30, 32, 4, g), 32)])
    assert torch.equal(local_counts(padded, 32), counts[0])
    bal = LeastLoadedBalancer(p, "cpu")
    want_dest, want_slot = bal.assign(0, real, counts, 0)
    dest, slot = bal.assign(0, padded, counts, 0)
    keep = torch.ones(47, dtype=torch.bool)
    keep[25:32] = False
    assert (dest[~keep] == -1).all() and (slot[~keep] == -1).all()
    assert torch.equal(dest[keep], want_dest) and torch.equal(slot[keep], want_slot)
    rec = ExpertStatsRecorder(1, 32, 4)
    rec.record(0, padded, dest)
    assert int(rec.tokens_L[0]) == 40 and int(rec.expert_counts_LE.sum()) == 160 and int(rec.rank_counts_LR.sum()) == 160


def test_stats_every_steps_appends_counts_that_add_up(tmp_path):
    """balancer.stats_every_steps: the device counters are read (and reset) every N steps; the lines still sum
    to every computed token's top-k slots."""
    from afsplit import LLM, SamplingParams
    from afsplit.models.tiny import make_tiny

    model = make_tiny("qwen3_moe", tmp_path / "m", seed=2)
    stats = tmp_path / "stats.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"path": str(model)}, "runtime": {"num_kv_blocks": 64, "block_size": 4},
                               "balancer": {"stats_path": str(stats), "stats_every_steps": 2}}))
    prompts = [[3, 4, 5], [9] * 7]
    LLM(config=str(cfg)).generate([{"prompt_token_ids": p} for p in prompts],
                                  SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    lines = [json.loads(l) for l in stats.read_text().splitlines()]
    assert len(lines) > 2  # more than one dump per MoE layer
    computed = sum(len(p) + 4 for p in prompts)  # every prompt token and every decode but the last sampled token
    assert int(load_stats(stats).sum()) == 2 * 2 * computed  # 2 MoE layers x top-2
    assert sum(l["tokens"] for l in lines) == 2 * computed
