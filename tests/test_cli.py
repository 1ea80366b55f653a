"""`afsplit` in one process: every input error is one exact line with exit status 2, results stream
to --output as requests finish, and --resume finishes a job that stopped part way."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from afsplit.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return str(make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3", seed=3))


def write_config(tmp_path, tiny_dir, name="c.yaml", **sections):
    data = {"model": {"path": tiny_dir}, "runtime": {"num_kv_blocks": 64, "block_size": 4}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_each_bad_line_fails_alone_with_its_file_line(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir, model={"max_model_len": 32})
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join([
        '{"prompt": "hi", "max_tokens": 3, "temperature": 0}',
        '{"prompt": "hi", "temperature": NaN}',
        '',
        '{not json',
        '{"prompt": ""}',
        '{"prompt_token_ids": [' + ", ".join(["5"] * 40) + ']}',
        '{"prompt": "hi", "temperature": 1e-45, "max_tokens": 3}',
        '{"prompt": "hi", "temprature": 0.5}',
        '["prompt"]',
        '{"prompt_token_ids": [1, 2], "max_tokens": 2, "seed": 1, "top_k": 0}',
        '{"prompt": "hi", "top_p": 0}',
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", out, "--no-progress")
    expected = {
        1: f"{src} line 2: temperature must be a finite number >= 0, got nan",
        2: f"{src} line 4: not valid JSON (Expecting property name enclosed in double quotes); each line must be one "
           "JSON object",
        3: f"{src} line 5: empty prompt; give at least one token",
        4: f"{src} line 6: prompt has 40 tokens, max_model_len is 32; shorten it or raise model.max_model_len",
        6: f"{src} line 8: unknown field(s) ['temprature']; valid: ['ignore_eos', 'max_tokens', 'prompt', "
           "'prompt_token_ids', 'seed', 'stop_token_ids', 'temperature', 'top_k', 'top_p']",
        7: f"{src} line 9: expected a JSON object with 'prompt' or 'prompt_token_ids'",
        9: f"{src} line 11: top_p must be a number in (0, 1], got 0",
    }
    assert code == 2
    rows = records(out)
    assert [r["index"] for r in rows] == list(range(10))  # the final file is in index order
    assert {r["index"]: r["error"] for r in rows if "error" in r} == expected
    assert sorted(error_lines(err)) == sorted(f"afsplit: error: {m}" for m in expected.values())  # each once
    assert rows[0]["token_ids"] == rows[5]["token_ids"]  # temperature 1e-45 is greedy
    assert len(rows[8]["token_ids"]) == 2 and rows[0]["finish_reason"] in ("length", "stop")


def test_output_is_checked_before_any_model_is_loaded(tiny_dir, tmp_path, capsys, monkeypatch):
    import afsplit.engine

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(afsplit.engine.LLMEngine, "__init__", no_model)
    monkeypatch.setattr(afsplit.engine, "resolve_model", no_model)
    single = write_config(tmp_path, tiny_dir)
    cluster = write_config(tmp_path, tiny_dir, name="cluster.yaml", topology={"nodes": [{"attention": 1}, {"expert": 1}]})
    missing = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    for cfg in (single, cluster):
        code, _, err = run(capsys, "generate", "--config", cfg, "--prompt", "hi", "--output", missing)
        assert code == 2
        assert err.strip() == f"afsplit: error: --output {missing}: directory {missing.parent} does not exist; create it first"
    code, _, err = run(capsys, "generate", "--config", single, "--prompt", "hi", "--stats-json", tmp_path)
    assert (code, err.strip()) == (2, f"afsplit: error: --stats-json {tmp_path}: is a directory; give a file path")
    code, _, err = run(capsys, "generate", "--config", single, "--prompt", "hi", "--resume")
    assert (code, err.strip()) == (2, "afsplit: error: --resume needs --output (the file whose finished requests are "
                                      "skipped)")
    code, _, err = run(capsys, "generate", "--config", single, "--prompts-file", tmp_path / "nope.jsonl")
    assert (code, err.strip()) == (2, f"afsplit: error: {tmp_path / 'nope.jsonl'}: cannot read prompts file (No such "
                                      "file or directory); check the path")
    assert not missing.parent.exists() and not list(tmp_path.glob("*.jsonl"))


def _prompt_lines(n: int) -> str:
    g = torch.Generator().manual_seed(9)
    return "".join(json.dumps({"prompt_token_ids": torch.randint(0, 256, (3 + i % 5,), generator=g).tolist(),
                               "max_tokens": 1 + i % 6, "temperature": 0.8, "ignore_eos": True}) + "\n"
                   for i in range(n))


def test_results_stream_as_they_finish_and_resume_finishes_the_job(tiny_dir, tmp_path, capsys, monkeypatch):
    """A run that dies part way keeps every request finished so far; --resume computes only the
    others (same tokens as one clean run: seeds come from the request index) and nothing twice."""
    import afsplit.engine

    cfg = write_config(tmp_path, tiny_dir)
    src = tmp_path / "prompts.jsonl"
    src.write_text(_prompt_lines(12))
    clean = tmp_path / "clean.jsonl"
    assert run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", clean, "--no-progress")[0] == 0

    out = tmp_path / "out.jsonl"
    real_step, steps = afsplit.engine.LLMEngine.step, []

    def dying_step(self, *a, **k):
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("the machine caught fire")
        return real_step(self, *a, **k)

    monkeypatch.setattr(afsplit.engine.LLMEngine, "step", dying_step)
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", out, "--no-progress")
    assert (code, err.strip()) == (1, "afsplit: error: RuntimeError: the machine caught fire (run with --debug for the "
                                      "traceback)")
    partial = records(out)
    assert 0 < len(partial) < 12  # finished before the failure, already on disk
    with open(out, "a") as f:
        f.write('{"index": 11, "tok')  # a record cut short by the crash: dropped and recomputed
    monkeypatch.setattr(afsplit.engine.LLMEngine, "step", real_step)

    admitted = []
    real_make = afsplit.engine.LLMEngine.make_sequence
    monkeypatch.setattr(afsplit.engine.LLMEngine, "make_sequence",
                        lambda self, prompt, params, where=None, index=None: admitted.append(index) or
                        real_make(self, prompt, params, where, index))
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", out, "--no-progress",
                       "--resume")
    assert code == 0
    assert err.strip() == f"afsplit: warning: {out} line {len(partial) + 1}: not a complete result record; dropped, its " \
                          "request runs again"
    assert sorted(admitted) == sorted(set(range(12)) - {r["index"] for r in partial})  # nothing computed twice
    assert records(out) == records(clean)
    admitted.clear()
    assert run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", out, "--resume")[0] == 0
    assert admitted == [] and records(out) == records(clean)  # all done: nothing to compute

    other = tmp_path / "other.jsonl"
    other.write_text(_prompt_lines(3))
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompts-file", other, "--output", out, "--resume")
    assert (code, err.strip()) == (2, f"afsplit: error: --resume: {out} line 4 has index 3 but {other} has 3 requests; "
                                      "resume with the prompts file that made it, or write a new --output")


def test_warmup_and_micro_batches_do_not_change_sampled_tokens(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir)
    src = tmp_path / "prompts.jsonl"
    src.write_text(_prompt_lines(6))
    outs = []
    for i, extra in enumerate([[], ["--warmup", "--set", "runtime.micro_batches=2", "--set", "runtime.max_num_seqs=2"]]):
        out = tmp_path / f"out{i}.jsonl"
        assert run(capsys, "generate", "--config", cfg, "--prompts-file", src, "--output", out, "--no-progress",
                   *extra)[0] == 0
        outs.append([r["token_ids"] for r in records(out)])
    assert outs[0] == outs[1]


def test_stats_json_works_in_one_process(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir)
    stats = tmp_path / "stats.json"
    code, out, _ = run(capsys, "generate", "--config", cfg, "--prompt", "hello", "--max-tokens", "4", "--ignore-eos",
                       "--stats-json", stats, "--no-progress")
    assert code == 0 and out.strip()
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == 4 and s["num_requests"] == 1 and s["kv_blocks_in_use_at_end"] == 0
    assert s["steps"] == 4 and s["gpus"] == 1 and s["mean_ttft_ms"] > 0


def test_replicas_are_rejected_in_one_process(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir, balancer={"replicas": "auto", "spare_slots_per_rank": 1})
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompt", "hi")
    assert code == 2
    assert err.strip() == (f"afsplit: error: {cfg}: balancer.replicas: 'auto' needs expert ranks: replicas work in the "
                           "distributed runtime (a topology with attention and expert, or several colocated, ranks); "
                           "the single-process engine holds every expert once, so set balancer.replicas: none")
    assert run(capsys, "check-config", cfg)[2].strip() == err.strip()
    from afsplit import LLM
    from afsplit.errors import ConfigError

    with pytest.raises(ConfigError) as e:  # the Python API is the single-process engine too
        LLM(config=cfg)
    assert f"afsplit: error: {e.value}" == err.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir, topology={"device": "cuda"})
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompt", "hi")
    assert code == 2
    assert err.strip() == (f"afsplit: error: {cfg}: topology.device: cuda but no CUDA device is visible (torch "
                           f"{torch.__version__}); use topology.device: cpu or a machine with a GPU")
    cluster = write_config(tmp_path, tiny_dir, name="cl.yaml", topology={"device": "cuda",
                                                                        "nodes": [{"attention": 1, "expert": 1}]})
    code, _, err = run(capsys, "generate", "--config", cluster, "--prompt", "hi")
    assert (code, err.strip()) == (2, f"afsplit: error: {cluster}: topology.device: cuda: the topology has 2 ranks (one "
                                      "GPU each) but 0 GPU(s) are visible; use topology.device: cpu or a machine with "
                                      "more GPUs")


def test_make_tiny_refuses_an_existing_checkpoint(tiny_dir, tmp_path, capsys):
    target = tmp_path / "ckpt"
    assert run(capsys, "make-tiny", "olmoe", target)[0] == 0
    before = (target / "model.safetensors").stat().st_mtime_ns
    code, _, err = run(capsys, "make-tiny", "qwen3_moe", target)
    assert (code, err.strip()) == (2, f"afsplit: error: make-tiny: {target} already holds a checkpoint (config.json); "
                                      "pass --force to overwrite it, or choose another directory")
    assert (target / "model.safetensors").stat().st_mtime_ns == before
    assert run(capsys, "make-tiny", "qwen3_moe", target, "--force")[0] == 0
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_unexpected_errors_are_one_line_unless_debug(tiny_dir, tmp_path, capsys, monkeypatch):
    import afsplit.engine

    def broken(self, *a, **k):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(afsplit.engine.LLMEngine, "step", broken)
    cfg = write_config(tmp_path, tiny_dir)
    code, _, err = run(capsys, "generate", "--config", cfg, "--prompt", "hi", "--no-progress")
    assert (code, err.strip()) == (1, "afsplit: error: ZeroDivisionError: division by zero (run with --debug for the "
                                      "traceback)")
    with pytest.raises(ZeroDivisionError):
        main(["generate", "--config", cfg, "--prompt", "hi", "--no-progress", "--debug"])
    assert not os.environ.get("AFSPLIT_JOB_DIR")
