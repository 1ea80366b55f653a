"""The benchmark sweep, its plots and the DeepSpeed-MoE baseline, end to end on CPU (tiny models, gloo)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import sweep  # noqa: E402

VLLM_NAMES = ["output_throughput", "total_token_throughput"] + [
    f"{s}_{m}" for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms") for s in ("mean", "median", "p99")]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _tiny_config(tmp: Path, name: str, nodes: str, **model_overrides) -> Path:
    """A tiny Qwen3-MoE checkpoint (written now) and a CPU config for it."""
    from afsplit.models.tiny import make_tiny

    model = make_tiny("qwen3_moe", tmp / f"model-{name}", **model_overrides)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"""model: {{path: {model}, dtype: float32}}
topology: {{device: cpu, nodes: {nodes}}}
runtime: {{block_size: 16, num_kv_blocks: 64, max_num_seqs: 8, max_num_batched_tokens: 256}}
comm: {{timeout_s: 60}}
""")
    return cfg


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A 1-point sweep (AF 1 attention + 2 expert ranks, batch 2): an offline and a latency run."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = _tiny_config(tmp, "base", "[{attention: 1, expert: 2}]")
    sw = tmp / "mini.yaml"
    sw.write_text(yaml.safe_dump({
        "name": "mini", "base_config": str(cfg),
        "splits": [{"name": "AF 1A+2E", "nodes": [{"attention": 1, "expert": 2}]}],
        "workload": {"input_len": [8], "output_len": [4], "batch_size": [2]},
        "engine": {"micro_batches": [2]}, "offline": {"requests_per_batch": 2}, "stop": {"tpot_ms": 100000},
        "timeout_s": 120}))
    out = tmp / "out.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), str(sw), "--output", str(out),
                           "--no-progress"], cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def test_sweep_writes_vllm_named_records(sweep_run):
    _, recs = sweep_run
    assert len(recs) == 1
    r = recs[0]
    assert r["status"] == "ok", r.get("error")
    for key in VLLM_NAMES + ["tokens_per_s_per_gpu", "gpus", "topology", "model", "device", "date", "git_commit",
                             "per_layer_ms", "params", "mode", "split"]:
        assert key in r, key
    assert r["gpus"] == 3 and r["device"] == "cpu" and r["mode"] == "af"
    assert r["topology"] == [{"attention": 1, "expert": 2}]
    assert r["params"] == {"mode": "af", "split": "AF 1A+2E", "nodes": [{"attention": 1, "expert": 2}], "batch_size": 2,
                           "input_len": 8, "output_len": 4, "micro_batches": 2}
    # offline: 2 x batch requests of 4 tokens; the --warmup run before it (same prompts, 3 tokens) is not counted
    assert "--warmup" in r["offline_command"]
    assert r["num_requests"] == 4 and r["generated_tokens"] == 16
    assert r["total_token_throughput"] > r["output_throughput"] > 0
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["output_throughput"] / 3)
    assert {"attention", "expert"} <= set(r["per_layer_ms"])
    lat = r["latency"]
    assert lat["num_requests"] == 2 and lat["concurrency"] == 2
    for key in VLLM_NAMES:
        assert key in lat, key
    assert "--set runtime.max_num_seqs=2" in r["offline_command"]


def test_plots_from_sweep(sweep_run, tmp_path):
    from launch.plot import plot_all

    out, _ = sweep_run
    paths = plot_all([out], tmp_path / "plots", tpot_line=100)
    assert [p.name for p in paths] == ["pareto.png", "tpot_vs_batch.png", "time_split.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_failing_point_is_recorded_and_stop_rule(tmp_path, monkeypatch):
    """A failing run leaves an error record and the sweep goes on; a series stops past the TPOT limit."""
    cfg = _tiny_config(tmp_path, "fail", "[{attention: 1, expert: 2}]")
    sw = tmp_path / "s.yaml"
    sw.write_text(yaml.safe_dump({
        "base_config": str(cfg), "splits": [{"name": "a", "nodes": [{"attention": 1, "expert": 2}]},
                                            {"name": "c", "nodes": [{"colocated": 2}]}],
        "workload": {"input_len": 4, "output_len": 2, "batch_size": {"start": 1, "factor": 2, "max": 8}},
        "stop": {"tpot_ms": 50}, "latency": {"enabled": False}}))

    def fake_run_once(cmd, log_path, timeout_s):
        if "[{attention: 1, expert: 2}]" in " ".join(cmd):
            return 1, "Traceback ...\nafsplit: error: boom"
        stats = Path(cmd[cmd.index("--stats-json") + 1])
        b = len(Path(cmd[cmd.index("--prompts-file") + 1]).read_text().splitlines())  # = batch size
        stats.write_text(json.dumps({"num_requests": b, "generated_tokens": 2 * b, "wall_s": 1.0,
                                     "output_throughput": 2.0 * b, "median_tpot_ms": 20.0 * b}))
        return 0, ""

    monkeypatch.setattr(sweep, "run_once", fake_run_once)
    recs = sweep.run_sweep(str(sw), str(tmp_path / "o.jsonl"), progress=False)
    assert [(r["split"], r["params"]["batch_size"], r["status"]) for r in recs] == [
        ("a", 1, "error"), ("a", 2, "error"), ("a", 4, "error"), ("a", 8, "error"),
        ("c", 1, "ok"), ("c", 2, "ok"), ("c", 4, "ok")]
    assert "afsplit: error: boom" in recs[0]["error"]
    assert "80.0 ms > 50" in recs[-1]["stop"]  # batch 8 of series c is not run
    assert recs[-1]["total_token_throughput"] == 4 * 4 + 2 * 4  # (prompt + output tokens) / 1 s
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 7


def test_sweep_files_are_valid(capsys):
    """Every point of every checked-in sweep (the 4xH200 grid included) has a valid config."""
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"cpu-tiny.yaml", "h200x4-qwen3.yaml"}
    for f in files:
        sweep.run_sweep(str(f), "/dev/null", dry_run=True)
        assert "every config is valid" in capsys.readouterr().out
    sw = sweep.load_sweep(ROOT / "configs" / "sweeps" / "h200x4-qwen3.yaml")
    assert sw["stop"]["tpot_ms"] == 100
    assert {s.mode for s in sw["splits"]} == {"af", "colocated", "deepspeed"}
    assert all(s.world_size == 4 for s in sw["splits"])


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("top_k", [2, 4])  # DeepSpeed's top2gating and its general topkgating
def test_deepspeed_baseline_matches_engine(tmp_path, top_k):
    """2 gloo ranks, DeepSpeed's gate + all-to-all + experts with the model's weights: the same greedy tokens
    as afsplit's single-process engine (float32, so the gate's float32 logits equal afsplit's)."""
    from afsplit import LLM, SamplingParams

    cfg = _tiny_config(tmp_path, f"ds{top_k}", "[{colocated: 2}]", num_experts_per_tok=top_k)
    prompts = [[5 + i, 17, 3 * i + 1, 40, 99, 7][: 3 + i] for i in range(5)]  # 5 requests, uneven over 2 ranks
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": 6 + i, "ignore_eos": True,
                                      "temperature": 0}) + "\n" for i, p in enumerate(prompts)))
    out, stats = tmp_path / "o.jsonl", tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "deepspeed_baseline.py"), "--config", str(cfg),
                           "--prompts-file", str(pf), "--output", str(out), "--stats-json", str(stats)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    model_dir = yaml.safe_load(cfg.read_text())["model"]["path"]
    llm = LLM(model=model_dir, num_kv_blocks=64)
    ref = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       [SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True) for i in range(5)],
                       use_tqdm=False)
    assert got == [r.outputs[0].token_ids for r in ref]
    s = json.loads(stats.read_text())
    assert s["mode"] == "deepspeed" and s["gpus"] == 2 and s["ep_size"] == 2 and s["num_requests"] == 5
    assert s["generated_tokens"] == sum(6 + i for i in range(5))
    for key in ["output_throughput", "tokens_per_s_per_gpu", "mean_tpot_ms", "median_ttft_ms", "p99_e2el_ms"]:
        assert s[key] > 0, key
    assert set(s["per_layer_ms"]["attention"]) == {"attention", "moe"}
