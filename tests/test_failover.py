"""Surviving the death of an expert rank (afsplit/runtime/failover.py), on CPU over gloo.

The cluster tests run `afsplit generate` under the cluster simulation (one torchrun per node, real
processes, real signals: an expert rank SIGKILLs or SIGSTOPs itself in the middle of a step via
AFSPLIT_FAULTS) and check that every request completes exactly once with the tokens of a run
without the failure (greedy), and that the stats JSON reports the failover.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from comm.placement import Placement
from comm.topology import NodeSpec, Topology

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 40


# -- the pieces ------------------------------------------------------------------------------------


def test_topology_without_renumbers_in_order_and_drops_empty_nodes():
    topo = Topology((NodeSpec(attention=2), NodeSpec(expert=1), NodeSpec(expert=2)))
    left, kept = topo.without([2, 3])
    assert kept == [0, 1, 4]
    assert left.nodes == (NodeSpec(attention=2), NodeSpec(expert=1))
    assert left.attention_ranks == (0, 1) and left.expert_ranks == (2,)


def test_after_loss_keeps_survivors_slots_and_reloads_only_the_lost():
    # 4 experts on 3 ranks; rank 1's experts: 1 is replicated on rank 2, 2 is not
    p = Placement(4, (((0, 3), (1, 2), (1,)),))
    left, reloads, lost = p.after_loss([0, 2], capacity=3)
    assert not lost
    assert left.layers == (((0, 3), (1, 2)),)  # expert 2 into a spare slot of the rank with the fewest
    assert reloads == {1: {0: [(1, 2)]}}
    assert all(left.replicas(0, e) for e in range(4))


def test_after_loss_uses_the_rank_with_fewest_slots_then_slots_of_replicated_experts():
    p = Placement(4, (((0, 1), (2, 3), (0, 1)),))
    left, reloads, lost = p.after_loss([0, 2], capacity=3)  # experts 2, 3 lost; one spare slot on each
    assert not lost and reloads == {0: {0: [(2, 2)]}, 1: {0: [(2, 3)]}}
    full = Placement(4, (((0, 1), (2, 3), (0, 1)),))
    left, reloads, lost = full.after_loss([0, 2], capacity=2)  # no spare: over replicas of 0 and 1
    assert not lost and sorted(e for row in left.layers[0] for e in row) == [0, 1, 2, 3]
    left.validate()


def test_after_loss_reports_what_fits_nowhere():
    p = Placement(4, (((0, 1), (2, 3)),))
    _left, _reloads, lost = p.after_loss([0], capacity=2)
    assert lost == [(0, 2), (0, 3)]


# -- the cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from launch.make_prompts import make_prompts

    path = tmp_path_factory.mktemp("failover") / "prompts.jsonl"
    rows = make_prompts(N_PROMPTS, 12, 16, vocab=200, seed=3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, experts: int, replicas: str, spare: int) -> Path:
    """An attention node and `experts` one-rank expert nodes, with the repo's tiny qwen3_moe checkpoint."""
    cfg = yaml.safe_load((ROOT / "configs" / "cpu-failover.yaml").read_text())
    cfg["model"]["path"] = str(ROOT / ".cache" / "tiny-qwen3_moe")
    cfg["topology"]["nodes"] = [{"attention": 1}] + [{"expert": 1}] * experts
    cfg["balancer"] = {"replicas": replicas, "spare_slots_per_rank": spare,
                       "replicas_on_distinct_nodes": replicas == "auto"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def generate(cfg: Path, prompts: Path, tmp_path: Path, faults: str = "", name: str = "run"):
    out, stats = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-stats.json"
    env = dict(os.environ, AFSPLIT_FAULTS=faults, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", str(cfg), "--prompts-file", str(prompts),
           "--output", str(out), "--stats-json", str(stats), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    rows = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
    st = json.loads(stats.read_text()) if stats.exists() else None
    return proc, {r["index"]: r.get("token_ids") for r in rows}, st


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
    """Tokens of the same prompts from the single-process engine (greedy)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-1proc.yaml").read_text())
    cfg["model"]["path"] = str(ROOT / ".cache" / "tiny-qwen3_moe")
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc, tokens, _ = generate(path, prompts, tmp)
    assert proc.returncode == 0 and len(tokens) == N_PROMPTS, proc.stderr[-3000:]
    return tokens


def check_survived(proc, tokens, stats, reference, failovers: int, dead: list[list[int]]):
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tokens == reference  # every request once, the tokens of a run without the failure
    assert stats["num_requests"] == N_PROMPTS and stats["kv_blocks_in_use_at_end"] == 0
    recs = stats["failovers"]
    assert len(recs) == failovers and [r["dead_ranks"] for r in recs] == dead, recs
    for r in recs:
        assert r["recovery_s"] > 0 and r["detection_s"] >= 0 and r["requests_failed"] == 0
    assert stats["failover_throughput"]["after_tok_s"] > 0
    assert "were lost on the way" in proc.stderr
    return recs


@pytest.mark.slow
def test_sigkill_of_an_expert_node_mid_step_loses_nothing(prompts, reference, tmp_path):
    cfg = write_config(tmp_path, experts=2, replicas="auto", spare=4)
    proc, tokens, stats = generate(cfg, prompts, tmp_path, faults="2@8:KILL")
    recs = check_survived(proc, tokens, stats, reference, 1, [[2]])
    assert recs[0]["requests_replayed"] > 0 and recs[0]["reloaded_experts"] == 0  # every expert had a replica


@pytest.mark.slow
def test_a_silent_expert_rank_is_detected_by_heartbeat_and_fenced(prompts, reference, tmp_path):
    cfg = write_config(tmp_path, experts=2, replicas="auto", spare=4)
    proc, tokens, stats = generate(cfg, prompts, tmp_path, faults="1@10:STOP")
    recs = check_survived(proc, tokens, stats, reference, 1, [[1]])
    assert recs[0]["detection_s"] >= 1.5  # comm.peer_timeout_s = 2: nothing closed, only the heartbeat told
    assert "is stopped past comm.peer_timeout_s: killing it" in proc.stderr


@pytest.mark.slow
def test_experts_without_a_surviving_replica_are_reloaded_into_spare_slots(prompts, reference, tmp_path):
    cfg = write_config(tmp_path, experts=2, replicas="none", spare=4)
    proc, tokens, stats = generate(cfg, prompts, tmp_path, faults="2@6:KILL")
    recs = check_survived(proc, tokens, stats, reference, 1, [[2]])
    assert recs[0]["reloaded_experts"] == 8  # 4 experts x 2 MoE layers of the tiny model


@pytest.mark.slow
def test_a_second_failure_after_the_first(prompts, reference, tmp_path):
    cfg = write_config(tmp_path, experts=3, replicas="auto", spare=6)
    proc, tokens, stats = generate(cfg, prompts, tmp_path, faults="2@6:KILL,3@16:KILL")
    # launch-time ranks 2 and 3; the second recovery names them by launch-time rank too
    check_survived(proc, tokens, stats, reference, 2, [[2], [3]])


@pytest.mark.slow
def test_lost_experts_with_no_spare_slot_stop_the_job_in_one_line(prompts, tmp_path):
    cfg = write_config(tmp_path, experts=2, replicas="none", spare=0)
    proc, tokens, _ = generate(cfg, prompts, tmp_path, faults="2@6:KILL")
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.startswith("afsplit: error:")]
    assert len(lines) == 1 and "rank 2 (expert, node 2)" in lines[0], proc.stderr[-3000:]
    assert "only replicas of layer 0 expert 4" in lines[0] and "spare_slots_per_rank" in lines[0], lines


@pytest.mark.slow
def test_a_dead_attention_rank_fails_its_requests_alone(prompts, reference, tmp_path):
    """Out of the issue's scope but defined: attention rank 1 (its own node) dies; its requests get error
    records, the coordinator's complete with the reference tokens, nothing is lost."""
    cfg = write_config(tmp_path, experts=2, replicas="auto", spare=4)
    data = yaml.safe_load(cfg.read_text())
    data["topology"]["nodes"] = [{"attention": 1}, {"attention": 1}, {"expert": 1}, {"expert": 1}]
    cfg.write_text(yaml.safe_dump(data))
    proc, tokens, stats = generate(cfg, prompts, tmp_path, faults="1@6:KILL")
    assert proc.returncode == 2, proc.stderr[-3000:]  # some requests failed
    rows = [json.loads(l) for l in (tmp_path / "run.jsonl").read_text().splitlines()]
    failed = [r for r in rows if "error" in r]
    assert len(rows) == N_PROMPTS and 0 < len(failed) < N_PROMPTS
    assert all("its attention rank died" in r["error"] for r in failed)
    assert all(r["token_ids"] == reference[r["index"]] for r in rows if "error" not in r)
    assert [f["dead_roles"] for f in stats["failovers"]] == [["attention"]]
    assert stats["failovers"][0]["requests_failed"] == len(failed)


@pytest.mark.slow
def test_the_server_keeps_serving_through_a_failover(tmp_path):
    """`afsplit serve` on the 3-node layout: expert rank 2 dies mid-step while 8 streams run; every request
    completes with the reference text and /metrics counts the failover."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from afsplit import LLM, SamplingParams
    from tests.helpers.server_process import ServerProcess

    model = ROOT / ".cache" / "tiny-qwen3_moe"  # written by the server's start-up if it is not there yet
    texts = [f"request {i}" for i in range(8)]
    srv = ServerProcess(["--config", str(ROOT / "configs" / "cpu-failover.yaml"), "--set", f"model.path={model}"],
                        tmp_path, env={"AFSPLIT_FAULTS": "2@12:KILL"}, ready_s=240)
    try:
        ref = LLM(model=str(model), num_kv_blocks=128).generate(
            texts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id

        def ask(prompt):
            stream = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in stream)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, texts))
        assert got == [r.outputs[0].text for r in ref]
        m = srv.wait_metrics(lambda m: m.get("afsplit:failovers_total", 0) >= 1)
        assert m["afsplit:failovers_total"] == 1 and m["afsplit:failover_recovery_seconds_count"] == 1, m
        assert client.completions.create(model=name, prompt="after", max_tokens=3).usage.completion_tokens == 3
    finally:
        srv.kill()
    assert "failover 1: ranks [2] (expert) lost" in srv.output()


@pytest.mark.slow
def test_the_coordinators_death_ends_the_job_in_one_line(prompts, tmp_path):
    """Failover cannot survive the coordinator (it decides, and its node hosts the store): one line, no hang."""
    import time

    cfg = write_config(tmp_path, experts=2, replicas="auto", spare=4)
    start = time.monotonic()
    proc, tokens, _ = generate(cfg, prompts, tmp_path, faults="0@6:KILL")
    assert proc.returncode == 1 and time.monotonic() - start < 120
    lines = [l for l in proc.stderr.splitlines() if l.startswith("afsplit: error:")]
    assert len(lines) == 1 and "rank 0 (attention, node 0) died (SIGKILL)" in lines[0], proc.stderr[-3000:]
    assert len(tokens) < N_PROMPTS  # what finished before is kept in --output (resume finishes the rest)


def test_liveness_stop_waits_for_its_thread():
    """stop() returns with the heartbeat thread ended (a daemon thread left inside a store call when the
    process exits can abort it), also while the thread is busy in a slow store call."""
    import threading
    import time

    from comm.liveness import Liveness

    class SlowStore:
        def __init__(self):
            self.values, self.lock = {}, threading.Lock()

        def add(self, key, n):
            time.sleep(0.05)  # a round trip
            with self.lock:
                self.values[key] = self.values.get(key, 0) + n
                return self.values[key]

        def check(self, keys):
            return False

        def set(self, key, value):
            pass

    live = Liveness(SlowStore(), rank=1, ranks=range(3), peer_timeout_s=0.5, watcher=0)
    live.start()
    time.sleep(0.25)  # a few beats, likely mid-call now
    assert live._thread.is_alive() and live.store.values.get("afsplit/hb/1", 0) >= 2
    t0 = time.monotonic()
    live.stop()
    assert not live._thread.is_alive()
    assert time.monotonic() - t0 < 2.0
