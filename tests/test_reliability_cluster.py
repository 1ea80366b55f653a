"""The distributed runtime under failure, on configs/cpu-2node.yaml (2 simulated nodes, gloo).

A rank killed or stopped mid-run: ONE error line naming the rank that failed (global rank, role,
node), no traceback or torchrun dump, every process of the job gone within comm.timeout_s + 15 s,
the requests finished so far kept in --output, and `--resume` finishes the job (nothing computed
twice, the same tokens as the single-process engine). Bad requests fail alone with their file line;
sampled tokens depend only on the request's seed, whatever the layout or --warmup.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from afsplit import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10  # comm.timeout_s of these runs (ranks must also start within it on a busy 2-core machine)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_cfg(tmp_path_factory):
    """configs/cpu-2node.yaml on its own tiny checkpoint, without failover."""
    from afsplit.models.tiny import make_tiny

    tmp = tmp_path_factory.mktemp("cluster")
    data = yaml.safe_load((ROOT / "configs" / "cpu-2node.yaml").read_text())
    data["model"] = {"path": str(make_tiny("qwen3_moe", tmp / "model", seed=5)), "dtype": "float32"}
    data["comm"]["timeout_s"] = TIMEOUT_S
    data["comm"]["failover"] = False  # these tests are about a job that stops (tests/test_failover.py: one that goes on)
    cfg = tmp / "cpu-2node.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def start(cfg, args, tag):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "AFSPLIT_TEST_TAG": tag}
    cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", str(cfg), "--no-progress", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tagged(tag: str) -> dict[int, dict]:
    """pid -> environment of every live process of the job (they all inherit AFSPLIT_TEST_TAG)."""
    from launch.local_cluster import processes_with_env

    return processes_with_env("AFSPLIT_TEST_TAG", tag)


def rank_pid(tag: str, rank: int) -> int:
    for pid, env in tagged(tag).items():
        if env.get(b"RANK") == str(rank).encode() and b"LOCAL_RANK" in env:
            return pid
    raise AssertionError(f"rank {rank} not found")


def wait_for_lines(path: Path, n: int, proc, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


def gone_within(tag: str, proc, seconds: float) -> float:
    """Seconds until no process of the job is left (the launcher included); fails past `seconds`."""
    start = time.monotonic()
    while tagged(tag) or proc.poll() is None:
        assert time.monotonic() - start < seconds, f"still running after {seconds} s: {sorted(tagged(tag))}"
        time.sleep(0.2)
    return time.monotonic() - start


def error_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if "error" in l.lower() or "Traceback" in l or "Failed" in l]


def prompts_file(path: Path, n: int, max_tokens: int):
    """n sampled requests without seeds (derived from the index), finishing at different steps."""
    g = torch.Generator().manual_seed(1)
    rows = [{"prompt_token_ids": torch.randint(0, 256, (2 + i % 7,), generator=g).tolist(),
             "max_tokens": 2 + (i * 5) % max_tokens, "temperature": 0.8, "top_k": 50, "ignore_eos": True}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def reference_tokens(cfg, rows) -> list[list[int]]:
    """The single-process engine's tokens (LLM: one process whatever the topology), same derived seeds."""
    llm = LLM(config=str(cfg))
    outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in rows],
                        [SamplingParams(**{k: v for k, v in r.items() if k != "prompt_token_ids"}) for r in rows],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_bad_requests_fail_alone_and_tokens_match_every_layout(cluster_cfg, tmp_path):
    """One cluster run with --warmup: bad lines fail alone (one line each, exit 2), every good one
    gives the single-process engine's (and the single-process CLI's) sampled tokens."""
    from afsplit.cli import main

    rows = prompts_file(tmp_path / "good.jsonl", 6, 8)
    bad = {1: ('{"prompt_token_ids": [1, 2], "temperature": NaN}', "temperature must be a finite number >= 0, got nan"),
           3: ("{oops", "not valid JSON (Expecting property name enclosed in double quotes); each line must be one "
                        "JSON object"),
           4: ('{"prompt_token_ids": []}', "empty prompt; give at least one token"),
           6: ('{"prompt_token_ids": [1], "top_k": -5}', "top_k must be an integer: -1 or 0 (all tokens) or >= 1, got -5")}
    lines, good = [], iter(rows)
    for i in range(len(rows) + len(bad)):
        lines.append(bad[i][0] if i in bad else json.dumps(next(good)))
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = start(cluster_cfg, ["--prompts-file", src, "--output", out, "--warmup"], uuid.uuid4().hex)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert sorted(error_lines(err)) == sorted(f"afsplit: error: {src} line {i + 1}: {m}" for i, (_, m) in bad.items()), \
        err[-3000:]
    got = {r["index"]: r for r in (json.loads(l) for l in out.read_text().splitlines())}
    assert sorted(got) == list(range(len(lines)))
    good_idx = [i for i in range(len(lines)) if i not in bad]
    # the reference sees the same indices: placeholders where the bad lines are
    ref_rows = [json.loads(lines[i]) if i not in bad else {"prompt_token_ids": [1], "max_tokens": 1}
                for i in range(len(lines))]
    ref = reference_tokens(cluster_cfg, ref_rows)
    assert [got[i]["token_ids"] for i in good_idx] == [ref[i] for i in good_idx]

    single = tmp_path / "single.jsonl"
    assert main(["generate", "--config", str(cluster_cfg), "--set", "topology.nodes=[{colocated: 1}]",
                 "--set", "runtime.micro_batches=1", "--prompts-file", str(src), "--output", str(single),
                 "--no-progress"]) == 2
    assert [json.loads(l).get("token_ids") for l in single.read_text().splitlines()] == \
        [got[i].get("token_ids") for i in range(len(lines))]


def fail_one_rank(cfg, src: Path, out: Path, rank: int, sig: int, resume: bool) -> list[dict]:
    """Run the job, send `sig` to `rank` once a new result is on disk; check the one line and that
    nothing of the job is left within comm.timeout_s + 15 s. Returns the records kept."""
    before = len(out.read_text().splitlines()) if out.exists() else 0
    tag = uuid.uuid4().hex
    proc = start(cfg, ["--prompts-file", src, "--output", out] + (["--resume"] if resume else []), tag)
    wait_for_lines(out, before + 1, proc)
    os.kill(rank_pid(tag, rank), sig)
    gone_within(tag, proc, TIMEOUT_S + 15)
    _, err = proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    expected = {signal.SIGKILL: f"afsplit: error: rank {rank} (expert, node 1) died (SIGKILL); all ranks stopped",
                signal.SIGSTOP: f"afsplit: error: rank {rank} (attention, node 0) is stopped (SIGSTOP?) and stopped "
                                f"answering; its peers gave up after comm.timeout_s = {TIMEOUT_S} s; all ranks stopped"}
    assert error_lines(err) == [expected[sig]], err[-3000:]
    assert "ChildFailedError" not in err and "Traceback" not in err
    return [json.loads(l) for l in out.read_text().splitlines()]


def test_a_failed_rank_is_one_line_leaves_nothing_and_resume_finishes(cluster_cfg, tmp_path):
    """SIGKILL of rank 3 (expert, node 1) mid-run, then SIGSTOP of rank 1 (attention, node 0) in the
    resumed run, then a resumed run that finishes: every request once, the reference's tokens."""
    src = tmp_path / "prompts.jsonl"
    rows = prompts_file(src, 24, 24)
    out = tmp_path / "out.jsonl"
    after_kill = fail_one_rank(cluster_cfg, src, out, 3, signal.SIGKILL, resume=False)
    after_stop = fail_one_rank(cluster_cfg, src, out, 1, signal.SIGSTOP, resume=True)
    assert 1 <= len(after_kill) < len(after_stop) < len(rows)
    by_index = lambda recs: {r["index"]: r for r in recs}  # noqa: E731 -- finish order is timing-dependent
    assert len(by_index(after_stop)) == len(after_stop)  # nothing twice
    assert {i: r for i, r in by_index(after_stop).items() if i in by_index(after_kill)} == by_index(after_kill)

    stats = tmp_path / "stats.json"
    proc = start(cluster_cfg, ["--prompts-file", src, "--output", out, "--resume", "--stats-json", stats],
                 uuid.uuid4().hex)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads(stats.read_text())
    assert s["num_requests"] == len(rows) - len(after_stop) and s["kv_blocks_in_use_at_end"] == 0  # nothing twice
    final = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["index"] for r in final] == list(range(len(rows)))
    assert [r["token_ids"] for r in final] == reference_tokens(cluster_cfg, rows)
    assert {i: r for i, r in by_index(final).items() if i in by_index(after_stop)} == by_index(after_stop)


def test_start_up_failures_are_one_line(cluster_cfg, tmp_path):
    """A checkpoint that every rank fails to read: one line (exit 2), not one per rank; a taken
    rendezvous port: one line naming the node."""
    import shutil
    import socket

    model = tmp_path / "model"
    shutil.copytree(yaml.safe_load(cluster_cfg.read_text())["model"]["path"], model)
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    data = yaml.safe_load(cluster_cfg.read_text())
    data["model"]["path"] = str(model)
    cfg = tmp_path / "corrupt.yaml"
    cfg.write_text(yaml.safe_dump(data))
    tag = uuid.uuid4().hex
    proc = start(cfg, ["--prompt", "hi"], tag)
    _, err = proc.communicate(timeout=300)
    lines = error_lines(err)
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"afsplit: error: {model / 'model.safetensors'}: "), lines
    assert not tagged(tag)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "launch.local_cluster", "--config", str(cluster_cfg), "--master-port", str(port),
               "--", "-m", "afsplit.cli", "generate", "--config", str(cluster_cfg), "--prompt", "hi"]
        tag = uuid.uuid4().hex
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "AFSPLIT_TEST_TAG": tag})
    lines = error_lines(proc.stdout + proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, (proc.stdout + proc.stderr)[-3000:]
    assert lines[0].startswith("afsplit: error: node 0 (torchrun --node-rank 0) failed: "), lines
    assert not tagged(tag)
