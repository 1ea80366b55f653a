"""The disaggregated runtime on CPU (gloo, real torchrun processes) against the single-process engine.

Each case is a topology x model family x micro-batches x transport; greedy tokens must be identical
to the reference engine's and logits must agree to fp32 tolerance.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from afsplit import LLM, SamplingParams
from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
from tests.helpers.runtime_case import record_logits

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    # name: (family, nodes, micro_batches, transport, balancer)
    "qwen3-1A2E-m2": ("qwen3_moe", [{"attention": 1, "expert": 2}], 2, "direct", {}),
    "qwen2-2nodes-2A|2E-two_phase": ("qwen2_moe", [{"attention": 2}, {"expert": 2}], 1, "two_phase", {}),
    "mixtral-3A1E-m3-padded": ("mixtral", [{"attention": 3, "expert": 1}], 3, "direct_padded", {}),
    "olmoe-colocated3-m2": ("olmoe", [{"colocated": 3}], 2, "direct", {}),
    "qwen3-2nodes-mixed-replicas-adaptive": ("qwen3_moe", [{"attention": 1, "expert": 1}, {"attention": 1, "expert": 2}],
                                             2, "adaptive", {"replicas": "auto", "spare_slots_per_rank": 2}),
    "qwen3-2nodes-colocated-two_phase-auto_m": ("qwen3_moe", [{"colocated": 2}, {"colocated": 1}], "auto", "two_phase", {}),
    # the CUDA-graph decode path (bucket-padded static inputs, masked padding rows), run uncaptured on CPU
    "qwen3-2A2E-m2-padded-static": ("qwen3_moe", [{"attention": 2, "expert": 2}], 2, "direct_padded", {}, True),
    "olmoe-colocated2-padded-static": ("olmoe", [{"colocated": 2}], 1, "direct_padded", {}, True),
}

PROMPT_LENS = [3, 17, 1, 9, 24]


def reference(model_dir, prompts):
    llm = LLM(model=model_dir, num_kv_blocks=256, block_size=4)
    logits: dict = {}
    record_logits(llm.engine, logits)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], logits


def run_env(**extra):
    """The ranks import afsplit from this checkout, installed or not."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def launch(cfg_path, args, timeout=240, **env):
    cmd = [sys.executable, "-m", "launch.local_cluster", "--config", str(cfg_path), "--", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=run_env(**env))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_runtime_matches_single_process_engine(case, tmp_path):
    from afsplit.models.tiny import make_tiny

    family, nodes, m, transport, balancer, *static = CASES[case]
    model_dir = str(make_tiny(family, tmp_path / "model", seed=5))
    g = torch.Generator().manual_seed(len(case))
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cfg = {"model": {"path": model_dir}, "topology": {"nodes": nodes},
           "runtime": {"num_kv_blocks": 256, "block_size": 4, "micro_batches": m, "max_num_batched_tokens": 32},
           "comm": {"transport": transport.replace("_padded", ""), "timeout_s": 60,
                    "metadata": "padded" if transport.endswith("_padded") else "counts"},
           "balancer": balancer}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {STATIC_ON_CPU_ENV: "1"} if static else {}
    proc = launch(cfg_path, ["tests/helpers/runtime_case.py", str(cfg_path), str(tmp_path / "prompts.json"), str(tmp_path)],
                  **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    static_steps = [json.loads(f.read_text()) for f in tmp_path.glob("static-steps-rank*.json")]
    assert static_steps and all(n > 0 if static else n == 0 for n in static_steps), static_steps
    ref_tokens, ref_logits = reference(model_dir, prompts)
    got = json.loads((tmp_path / "tokens.json").read_text())
    assert [got[str(i)] for i in range(len(prompts))] == ref_tokens
    logits: dict = {}
    for f in tmp_path.glob("logits-rank*.pt"):
        logits.update(torch.load(f))
    for rid, steps in ref_logits.items():
        a, b = torch.stack(logits[rid]).double(), torch.stack(steps).double()
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-5, f"request {rid}: logits relative error {err:.2e}"


@pytest.mark.slow
def test_overlap_check_runs():
    """The ping-pong benchmark runs end to end (tiny settings; the ratio itself is measured, not asserted)."""
    cmd = [sys.executable, "-m", "launch.overlap_check", "--m", "1,2", "--layers", "2", "--requests", "2",
           "--new-tokens", "3", "--cost-ms", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "outputs identical across m: True" in lines
    assert lines[-1].startswith("overlap m2/m1 = ") and float(lines[-1].split("= ")[1]) > 0


MATRIX_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


@pytest.mark.slow
@pytest.mark.parametrize("family", MATRIX_FAMILIES)
def test_every_exchange_combination_matches_the_engine(family, tmp_path):
    """transport x metadata x static decode x replicas x micro-batches, over one world of 2 nodes x (1A + 1E):
    every combination's greedy tokens equal the single-process engine's."""
    from afsplit.models.tiny import make_tiny
    from tests.helpers import runtime_matrix

    model_dir = str(make_tiny(family, tmp_path / "model", seed=11))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 1, 19, 8)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cfg = {"model": {"path": model_dir}, "topology": {"nodes": [{"attention": 1, "expert": 1}] * 2},
           "runtime": {"num_kv_blocks": 256, "block_size": 4, "max_num_batched_tokens": 16},
           "comm": {"timeout_s": 60}, "balancer": {"spare_slots_per_rank": 1}}
    cfg_path = tmp_path / "base.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    out.mkdir()
    proc = launch(cfg_path, ["tests/helpers/runtime_matrix.py", str(cfg_path), str(tmp_path / "prompts.json"),
                             str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    llm = LLM(model=model_dir, num_kv_blocks=256, block_size=4)
    ref = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=runtime_matrix.NEW_TOKENS, ignore_eos=True), use_tqdm=False)]
    names = [c[0] for c in runtime_matrix.combos()]
    bad = []
    for name in names:
        res = json.loads((out / f"{name}.json").read_text())
        if res["tokens"] != ref:
            bad.append(f"{name}: tokens differ")
        attention_calls = [c for c in res["static_calls"] if c is not None]
        if ("padded_static" in name) != (bool(attention_calls) and all(c > 0 for c in attention_calls)):
            bad.append(f"{name}: static decode steps {attention_calls}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_killed_expert_rank_fails_the_job_naming_it(tmp_path):
    from afsplit.models.tiny import make_tiny

    model_dir = str(make_tiny("qwen3_moe", tmp_path / "model", seed=5))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"path": model_dir}, "topology": {"nodes": [{"attention": 1}, {"expert": 2}]},
                                        "runtime": {"num_kv_blocks": 64}, "comm": {"timeout_s": 15}}))
    start = time.monotonic()
    cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", str(cfg_path), "--prompt", "hello",
           "--max-tokens", "64", "--ignore-eos", "--no-progress"]
    env = run_env(AFSPLIT_FAULT_EXIT_RANK="2", AFSPLIT_FAULT_AFTER_STEPS="3")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 2" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120


@pytest.mark.slow
def test_stats_plan_and_replicas_round_trip(tmp_path):
    """The runtime records expert activations, plan-experts turns them into replicas, and a run served
    by that placement gives the reference engine's tokens; the single-process engine records too."""
    from afsplit.models.tiny import make_tiny

    model_dir = str(make_tiny("qwen3_moe", tmp_path / "model", seed=7))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": 12, "ignore_eos": True,
                                       "temperature": 0}) + "\n" for p in prompts))
    stats = tmp_path / "stats.jsonl"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": model_dir}, "topology": {"nodes": [{"attention": 2}, {"expert": 2}]},
        "runtime": {"num_kv_blocks": 256, "block_size": 4, "micro_batches": 2},
        "comm": {"timeout_s": 60}, "balancer": {"stats_path": str(stats), "spare_slots_per_rank": 2}}))

    def generate(*extra):
        out = tmp_path / "out.jsonl"
        cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", str(cfg), "--prompts-file", str(src),
               "--output", str(out), "--no-progress", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=run_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(l)["token_ids"] for l in out.read_text().splitlines()]

    ref_tokens, _ = reference(model_dir, prompts)
    assert generate() == ref_tokens
    lines = [json.loads(l) for l in stats.read_text().splitlines()]
    assert len(lines) == 2  # one per MoE layer
    total = sum(len(p) + 11 for p in prompts)  # every computed token, prefill and decode
    assert all(sum(l["expert_counts"]) == 2 * total and sum(l["rank_counts"]) == 2 * total for l in lines)

    placement = tmp_path / "placement.yaml"
    proc = subprocess.run([sys.executable, "-m", "afsplit.cli", "plan-experts", "--stats", str(stats),
                           "--topology", str(cfg), "--out", str(placement)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=run_env())
    assert proc.returncode == 0, proc.stderr
    assert generate("--set", f"balancer.replicas={placement}", "--set", "balancer.stats_path=") == ref_tokens

    single_stats = tmp_path / "single.jsonl"
    llm = LLM(config=str(cfg), overrides=[f"balancer.stats_path={single_stats}"])
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12,
                                                                           ignore_eos=True), use_tqdm=False)
    assert [json.loads(l)["expert_counts"] for l in single_stats.read_text().splitlines()] == \
        [l["expert_counts"] for l in lines]


def test_micro_batch_tuner_keeps_the_fastest_measured_m():
    from afsplit.runtime.micro_batches import MEASURED_STEPS, WARM_STEPS, MicroBatchTuner, fixed_micro_batches

    assert fixed_micro_batches("3", distributed=True) == 3
    assert fixed_micro_batches("auto", distributed=False) == 1 and fixed_micro_batches("auto", True) is None
    step_ms = {1: 10.0, 2: 7.0, 3: 7.0}  # m=2 and 3 tie: fewer micro-batches wins
    tuner, why = MicroBatchTuner((1, 2, 3)), None
    for _ in range(100):
        m = tuner.current
        assert tuner.observe(m, decode_only=False, step_s=1.0) is None  # prefill steps do not count
        why = tuner.observe(m, True, step_ms[m] / 1e3 + (1.0 if tuner.seen[m] < WARM_STEPS else 0.0))
        if why:
            break
    assert tuner.chosen == 2 and "-> m=2" in why, why
    assert all(len(t) == MEASURED_STEPS for t in tuner.times.values())
    assert tuner.current == 2 and tuner.observe(2, True, 0.0) is None
