"""Config loading: unknown keys, types, topology arithmetic, overrides, every shipped config passes."""

from pathlib import Path

import pytest

from afsplit.cli import main
from afsplit.config import load_config
from afsplit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))
SWEEPS = sorted(ROOT.joinpath("configs").glob("sweeps/*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_passes_check_config(path, capsys):
    assert main(["check-config", str(path)]) == 0
    assert "rank  node" in capsys.readouterr().out


def test_every_yaml_under_configs_is_an_engine_config_or_a_sweep():
    """Sweep files have their own checker (launch/sweep.py FILE --dry-run, run on each in test_sweep.py)."""
    assert sorted(ROOT.joinpath("configs").rglob("*.y*ml")) == sorted(CONFIGS + SWEEPS)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_check_config_points_sweep_files_to_their_checker(path, capsys):
    rel = path.relative_to(ROOT)
    assert main(["check-config", str(rel)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"afsplit: error: {rel}: this is a sweep file (it has 'base_config'), not an engine config; check it with: "
        f"python3 launch/sweep.py {rel} --dry-run")


def check_config_error(tmp_path, capsys, text: str) -> str:
    p = write(tmp_path, text)
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip().replace(f"{p}: ", "FILE: ")


@pytest.mark.parametrize("text,line", [
    ("model: {path: x, max_model_len: -10}\n",
     "model.max_model_len: must be >= 1, or 0 for the checkpoint's max_position_embeddings, got -10"),
    ("model: {path: x}\nruntime: {kv_cache_memory_gb: -1}\n", "runtime.kv_cache_memory_gb: must be a finite number > 0, got -1.0"),
    ("model: {path: x}\nruntime: {kv_cache_memory_gb: .nan}\n", "runtime.kv_cache_memory_gb: must be a finite number > 0, got nan"),
    ("model: {path: x}\ncomm: {timeout_s: .inf}\n", "comm.timeout_s: must be a finite number of seconds > 0, got inf"),
    ("model: {path: x}\ntopology: {nodes: [{colocated: 2}, {attention: 1, expert: 3}]}\n",
     "topology.nodes: colocated ranks (2) cannot be mixed with attention (1) or expert (3) ranks; use either colocated "
     "or attention + expert"),
])
def test_config_errors_are_one_exact_line(tmp_path, capsys, text, line):
    assert check_config_error(tmp_path, capsys, text) == f"afsplit: error: FILE: {line}"


def test_check_config_checks_balancer_replicas(tmp_path, capsys):
    from afsplit.models.tiny import make_tiny

    model = make_tiny("qwen3_moe", tmp_path / "m", seed=1)
    af = f"model: {{path: {model}}}\ntopology: {{nodes: [{{attention: 1, expert: 2}}]}}\n"
    assert check_config_error(tmp_path, capsys, af + "balancer: {replicas: nope.yaml}\n") == (
        f"afsplit: error: {tmp_path / 'nope.yaml'}: cannot read placement file (No such file or directory); check "
        "balancer.replicas")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_experts: 3\n")
    assert check_config_error(tmp_path, capsys, af + f"balancer: {{replicas: {bad}}}\n") == (
        f"afsplit: error: {bad}: num_experts: file says 3, the model/topology has 8")
    p = write(tmp_path, af + "balancer: {replicas: auto, spare_slots_per_rank: 1}\n")
    assert main(["check-config", str(p)]) == 0
    capsys.readouterr()


def test_unknown_key_names_nearest(tmp_path):
    p = write(tmp_path, "model: {path: x}\nruntime:\n  block_sise: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: runtime.block_sise: unknown key \(did you mean 'block_size'\?\)"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"runtim: unknown key \(did you mean 'runtime'\?\)"):
        load_config(write(tmp_path, "model: {path: x}\nruntim: {}\n"))


def test_wrong_type_and_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime.max_num_seqs: expected an integer, got 'many'"):
        load_config(write(tmp_path, "model: {path: x}\nruntime: {max_num_seqs: many}\n"))
    with pytest.raises(ConfigError, match=r"comm.transport: 'carrier_pigeon' is not one of direct, two_phase, adaptive"):
        load_config(write(tmp_path, "model: {path: x}\ncomm: {transport: carrier_pigeon}\n"))


def test_topology_arithmetic(tmp_path):
    from afsplit.config import validate

    cfg = load_config(write(tmp_path, "model: {path: x}\ntopology:\n  nodes: [{attention: 3}, {expert: 2}]\n"))
    assert cfg.topology.topology.world_size == 5
    with pytest.raises(ConfigError, match=r"topology: 3 attention \+ 2 expert ranks = 5 != 4 processes"):
        validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="AF mode needs at least one attention and one expert rank"):
        load_config(write(tmp_path, "model: {path: x}\ntopology:\n  nodes: [{attention: 2}]\n"))
    with pytest.raises(ConfigError, match=r"topology.nodes\[1\].expert: must be >= 0"):
        load_config(write(tmp_path, "model: {path: x}\ntopology:\n  nodes: [{attention: 1}, {expert: -1}]\n"))


def test_overrides_and_relative_paths(tmp_path):
    p = write(tmp_path, "model: {path: ckpt}\n")
    cfg = load_config(p, ["runtime.max_num_seqs=3", "runtime.chunked_prefill=false", "comm.timeout_s=5"])
    assert (cfg.runtime.max_num_seqs, cfg.runtime.chunked_prefill, cfg.comm.timeout_s) == (3, False, 5.0)
    assert cfg.model.path == str(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["runtime.max_num_seqs"])
    with pytest.raises(ConfigError, match="runtime.max_num_seq: unknown key"):
        load_config(p, ["runtime.max_num_seq=3"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_check_config_error_is_one_line(tmp_path, capsys):
    p = write(tmp_path, "model: {path: x}\nruntime: {block_size: 0}\n")
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runtime.block_size: must be >= 1" in err
