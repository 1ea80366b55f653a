"""End-to-end benchmark sweep: run a grid of afsplit (and DeepSpeed-MoE) runs, one JSON line per point.

    python3 launch/sweep.py configs/sweeps/cpu-tiny.yaml --output docs/benchmarks/e2e-cpu/sweep.jsonl
    python3 launch/sweep.py configs/sweeps/h200x4-qwen3.yaml --output results/h200x4.jsonl
    python3 launch/sweep.py SWEEP.yaml --dry-run        # validate every point's config, print the commands

A sweep file (see configs/sweeps/) names a base config, the splits (topology + mode), the workload
axes and the engine axes::

    base_config: ../tiny.yaml            # relative to the sweep file
    overrides: {runtime.num_kv_blocks: 512}
    splits:                              # mode: af | colocated (from the nodes) | deepspeed
      - {name: AF 1A+2E, nodes: [{attention: 1, expert: 2}]}
      - {name: colocated 3, nodes: [{colocated: 3}]}
      - {name: deepspeed 2, mode: deepspeed, nodes: [{colocated: 2}]}
    workload: {input_len: [32], output_len: [16], batch_size: [2, 8]}   # or batch_size: {start: 8, factor: 2, max: 1024}
    engine: {micro_batches: [1, 2], transport: [direct], replicas: [none]}   # afsplit modes only
    offline: {requests_per_batch: 2}     # throughput run: B * 2 requests at once, at most B running
    latency: {requests_per_batch: 1}     # latency run: concurrency B, B requests (one wave, no queueing)
    stop: {tpot_ms: 100}                 # batch swept upwards until median TPOT exceeds this
    timeout_s: 900                       # per run

Each point = (split, input_len, output_len, engine values, batch size B). Both runs set
``runtime.max_num_seqs = ceil(B / attention ranks)`` so at most B sequences decode together. The
offline run's numbers are the point's top-level metrics (vLLM benchmark names: output_throughput,
total_token_throughput, mean_/median_/p99_ of ttft_ms, tpot_ms, itl_ms, e2el_ms), the latency
run's are under ``"latency"``. A failing run is recorded with ``"status": "error"`` and its error;
the sweep goes on. Batch sizes of a series are skipped (not recorded) once a point's median TPOT
exceeded ``stop.tpot_ms``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python3 launch/sweep.py` from anywhere
    sys.path.insert(0, str(REPO))

LATENCY_NAMES = [f"{s}_{m}" for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms") for s in ("mean", "median", "p99")]
RUN_KEYS = ["output_throughput", "total_token_throughput", "tokens_per_s_per_gpu", "gpus", "num_requests",
            "generated_tokens", "wall_s", "steps", "decode_step_ms_mean", "decode_step_ms_median", *LATENCY_NAMES,
            "per_layer_ms"]
ENGINE_AXES = {"micro_batches": "runtime.micro_batches", "transport": "comm.transport", "replicas": "balancer.replicas"}
MODES = ("af", "colocated", "deepspeed")


class SweepError(Exception):
    pass


@dataclass
class Split:
    name: str
    mode: str
    nodes: list  # topology.nodes, as in the YAML

    @property
    def world_size(self) -> int:
        return sum(sum(int(v) for v in n.values()) for n in self.nodes)

    @property
    def attention_ranks(self) -> int:
        """Ranks that hold requests (attention, or every rank when colocated / DeepSpeed)."""
        att = sum(int(n.get("attention", 0)) + int(n.get("colocated", 0)) for n in self.nodes)
        return att if self.mode != "deepspeed" else self.world_size

    def node_spec(self) -> str:
        """launch.local_cluster's --nodes syntax: '1A+2E', '4C', '2A,2E'."""
        parts = []
        for n in self.nodes:
            items = [f"{int(n[k])}{k[0].upper()}" for k in ("attention", "expert", "colocated") if int(n.get(k, 0))]
            parts.append("+".join(items))
        return ",".join(parts)

    def nodes_yaml(self) -> str:
        return "[" + ", ".join("{" + ", ".join(f"{k}: {int(v)}" for k, v in n.items()) + "}" for n in self.nodes) + "]"


@dataclass
class Point:
    split: Split
    input_len: int
    output_len: int
    engine: dict  # micro_batches, transport, replicas (afsplit modes) or {} (deepspeed)
    batch_size: int
    series: tuple = field(default=())  # points of one series differ only in batch size

    def params(self) -> dict:
        return {"mode": self.split.mode, "split": self.split.name, "nodes": self.split.nodes,
                "batch_size": self.batch_size, "input_len": self.input_len, "output_len": self.output_len,
                **self.engine}


# ----------------------------------------------------------------------------------------------
# sweep file


def _as_list(v, key: str) -> list:
    if isinstance(v, list):
        if not v:
            raise SweepError(f"{key}: empty list")
        return v
    return [v]


def batch_sizes(spec, key: str = "workload.batch_size") -> list[int]:
    """A list, one int, or {start, factor, max} (geometric: start, start*factor, ... <= max)."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"start", "factor", "max"}
        if unknown or "start" not in spec or "max" not in spec:
            raise SweepError(f"{key}: expected {{start: N, factor: F, max: M}}, got {spec}")
        out, b, f = [], int(spec["start"]), float(spec.get("factor", 2))
        if b < 1 or f <= 1:
            raise SweepError(f"{key}: start must be >= 1 and factor > 1")
        while b <= int(spec["max"]):
            out.append(b)
            b = max(b + 1, int(round(b * f)))
        return out
    vals = [int(b) for b in _as_list(spec, key)]
    if any(b < 1 for b in vals):
        raise SweepError(f"{key}: batch sizes must be >= 1")
    return sorted(set(vals))


def load_sweep(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        sw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: cannot read sweep file ({e})") from None
    known = {"name", "description", "base_config", "overrides", "splits", "workload", "engine", "offline", "latency",
             "stop", "timeout_s", "seed"}
    unknown = set(sw) - known
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
    if "base_config" not in sw:
        raise SweepError(f"{path}: base_config is required (a config YAML, relative to the sweep file)")
    base = Path(sw["base_config"])
    sw["base_config"] = str(base if base.is_absolute() else (path.parent / base).resolve())
    sw.setdefault("name", path.stem)
    sw["overrides"] = dict(sw.get("overrides") or {})
    splits = []
    for i, s in enumerate(_as_list(sw.get("splits"), "splits")):
        nodes = s.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise SweepError(f"{path}: splits[{i}].nodes: expected a list like [{{attention: 1, expert: 2}}]")
        colocated = all(set(n) <= {"colocated"} for n in nodes)
        mode = s.get("mode", "colocated" if colocated else "af")
        if mode not in MODES:
            raise SweepError(f"{path}: splits[{i}].mode: {mode!r} is not one of {MODES}")
        if mode == "deepspeed" and not colocated:
            raise SweepError(f"{path}: splits[{i}]: deepspeed runs every rank as attention + experts; "
                             "give nodes as [{colocated: N}]")
        split = Split(name=str(s.get("name", f"{mode} {i}")), mode=mode, nodes=nodes)
        if split.world_size < 2:
            raise SweepError(f"{path}: splits[{i}]: needs at least 2 ranks (one rank runs the single-process "
                             "engine, which writes no stats)")
        splits.append(split)
    sw["splits"] = splits
    wl = sw.get("workload") or {}
    sw["workload"] = {"input_len": [int(x) for x in _as_list(wl.get("input_len", 128), "workload.input_len")],
                      "output_len": [int(x) for x in _as_list(wl.get("output_len", 32), "workload.output_len")],
                      "batch_size": batch_sizes(wl.get("batch_size", [1, 8]))}
    eng = sw.get("engine") or {}
    bad = set(eng) - set(ENGINE_AXES)
    if bad:
        raise SweepError(f"{path}: engine: unknown axis {sorted(bad)}; valid: {sorted(ENGINE_AXES)}")
    sw["engine"] = {k: _as_list(eng[k], f"engine.{k}") for k in ENGINE_AXES if k in eng}
    sw["offline"] = {"requests_per_batch": 1, **(sw.get("offline") or {})}
    sw["latency"] = {"enabled": True, "requests_per_batch": 1, **(sw.get("latency") or {})}
    sw["stop"] = {"tpot_ms": None, **(sw.get("stop") or {})}
    sw["timeout_s"] = float(sw.get("timeout_s", 900))
    sw["seed"] = int(sw.get("seed", 0))
    return sw


def grid(sw: dict) -> list[Point]:
    """Every point, series by series, batch sizes ascending inside a series (the stop rule needs that)."""
    points = []
    eng_keys = list(sw["engine"])
    for split in sw["splits"]:
        combos = [dict(zip(eng_keys, vals)) for vals in itertools.product(*(sw["engine"][k] for k in eng_keys))]
        if split.mode == "deepspeed":
            combos = [{}]  # micro-batches, transports and replicas are afsplit's
        for il, ol, eng in itertools.product(sw["workload"]["input_len"], sw["workload"]["output_len"], combos):
            series = (split.name, il, ol, tuple(sorted(eng.items())))
            for b in sw["workload"]["batch_size"]:
                points.append(Point(split, il, ol, dict(eng), b, series))
    return points


def _yaml_value(v) -> str:
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)


def point_overrides(sw: dict, p: Point, concurrency: int) -> list[str]:
    sets = [f"{k}={_yaml_value(v)}" for k, v in sw["overrides"].items()]
    sets.append(f"topology.nodes={p.split.nodes_yaml()}")
    sets.append(f"runtime.max_num_seqs={math.ceil(concurrency / p.split.attention_ranks)}")
    sets += [f"{ENGINE_AXES[k]}={v}" for k, v in p.engine.items()]
    return sets


# ----------------------------------------------------------------------------------------------
# running one point


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name (asked in a subprocess, so this process never holds a CUDA context), or 'cpu'."""
    if device != "cuda":
        return "cpu"
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "cuda (unknown)"
    except (OSError, subprocess.SubprocessError):
        return "cuda (unknown)"


def model_info(base_config: str, overrides: dict) -> dict:
    """Resolve the model once (writes the tiny checkpoint before any ranks start): spec facts for the records."""
    from afsplit.config import load_config
    from afsplit.engine import resolve_model

    cfg = load_config(base_config, [f"{k}={_yaml_value(v)}" for k, v in overrides.items()])
    spec, _ = resolve_model(cfg)
    m = cfg.model
    name = m.preset if (m.weights == "random" and m.preset and not m.path) else (Path(m.path).name if m.path else "?")
    return {"model": f"{name} ({m.weights} weights)" if m.weights == "random" else name,
            "family": spec.family, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "num_experts": spec.num_experts, "top_k": spec.top_k, "dtype": m.dtype, "vocab_size": spec.vocab_size,
            "device_type": cfg.topology.device, "kv_bytes_per_token": 2 * spec.num_layers * spec.num_kv_heads
            * spec.head_dim * {"float32": 4}.get(m.dtype, 2)}


def kv_capacity_seqs(sw: dict, p: Point) -> int:
    """How many sequences of input_len + output_len tokens one attention rank's KV cache holds at once."""
    from afsplit.config import load_config

    rt = load_config(sw["base_config"], point_overrides(sw, p, p.batch_size)).runtime
    per_block = sw["model"]["kv_bytes_per_token"] * rt.block_size
    blocks = rt.num_kv_blocks or int(rt.kv_cache_memory_gb * 2**30) // per_block
    return blocks // math.ceil((p.input_len + p.output_len) / rt.block_size)


def validate_point(sw: dict, p: Point) -> None:
    """The point's config must load (same checks as `afsplit check-config`), before anything runs."""
    from afsplit.config import load_config

    load_config(sw["base_config"], point_overrides(sw, p, p.batch_size))


def run_command(sw: dict, p: Point, concurrency: int, prompts: str, out: str, stats: str, timeout_s: float) -> list[str]:
    """The command line of one run: launch.local_cluster starts one torchrun per node, as `afsplit generate` does."""
    sets = [a for s in point_overrides(sw, p, concurrency) for a in ("--set", s)]
    device = sw["model"]["device_type"]
    if p.split.mode == "deepspeed":
        prog = [str(REPO / "launch" / "deepspeed_baseline.py"), "--config", sw["base_config"], *sets]
    else:
        prog = ["-m", "afsplit.cli", "generate", "--config", sw["base_config"], *sets, "--no-progress"]
    # --warmup: kernel compilation and CUDA graph capture for this batch size happen before the clock starts
    prog += ["--prompts-file", prompts, "--output", out, "--stats-json", stats, "--warmup"]
    return [sys.executable, "-m", "launch.local_cluster", "--nodes", p.split.node_spec(), "--device", device,
            "--timeout", str(int(timeout_s)), "--", *prog]


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Interrupt the launcher (its `finally` stops every node it started), then kill its group."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_once(cmd: list[str], log_path: Path, timeout_s: float) -> tuple[int, str]:
    """Run `cmd` (its own session, output to log_path); (exit code, tail of the log). 124 on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s + 60)  # the launcher's own --timeout fires first
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = 124
    tail = log_path.read_text(errors="replace")[-3000:]
    return rc, tail


def _error_line(tail: str) -> str:
    """The most telling line of a failed run's log."""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    for key in ("afsplit: error", "Error", "error", "failed", "timeout"):
        hits = [ln for ln in lines if key in ln]
        if hits:
            return hits[-1][-500:]
    return lines[-1][-500:] if lines else "no output"


def one_run(sw: dict, p: Point, kind: str, concurrency: int, num_requests: int, workdir: Path, log_dir: Path,
            tag: str) -> dict:
    """One afsplit/DeepSpeed run; the metrics dict (vLLM names) or {'error': ...}."""
    from launch.make_prompts import make_prompts

    vocab = sw["model"]["vocab_size"]
    prompts = workdir / f"{tag}-{kind}-prompts.jsonl"
    with open(prompts, "w") as f:
        for r in make_prompts(num_requests, p.input_len, p.output_len, vocab, seed=sw["seed"]):
            f.write(json.dumps(r) + "\n")
    out, stats = workdir / f"{tag}-{kind}-out.jsonl", workdir / f"{tag}-{kind}-stats.json"
    cmd = run_command(sw, p, concurrency, str(prompts), str(out), str(stats), sw["timeout_s"])
    t0 = time.perf_counter()
    rc, tail = run_once(cmd, log_dir / f"{tag}-{kind}.log", sw["timeout_s"])
    res = {"command": " ".join(cmd[cmd.index("--") + 1:]), "concurrency": concurrency, "run_s": time.perf_counter() - t0}
    if rc != 0 or not stats.exists():
        why = f"timeout after {sw['timeout_s']:.0f} s" if rc == 124 else f"exit code {rc}"
        res["error"] = f"{kind} run failed ({why}): {_error_line(tail)}"
        return res
    s = json.loads(stats.read_text())
    res.update({k: s.get(k) for k in RUN_KEYS if k in s})
    if s.get("wall_s"):
        res["total_token_throughput"] = (s.get("num_requests", num_requests) * p.input_len
                                         + s.get("generated_tokens", 0)) / s["wall_s"]
    if s.get("num_requests", num_requests) != num_requests:
        res["warning"] = f"{num_requests - s.get('num_requests', 0)} of {num_requests} requests failed"
    return res


def run_point(sw: dict, p: Point, idx: int, workdir: Path, log_dir: Path) -> dict:
    b = p.batch_size
    rec = {"sweep": sw["name"], "point": idx, "status": "ok", "mode": p.split.mode, "split": p.split.name,
           "topology": p.split.nodes, "params": p.params(), "model": sw["model"]["model"],
           "model_info": {k: v for k, v in sw["model"].items() if k != "model"}, "device": sw["device"],
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": sw["git_commit"]}
    rec["kv_capacity_seqs"] = kv_capacity_seqs(sw, p)  # per attention rank
    if rec["kv_capacity_seqs"] < math.ceil(b / p.split.attention_ranks):
        rec["warning"] = (f"batch {b} needs {math.ceil(b / p.split.attention_ranks)} sequences per attention rank, "
                          f"the KV cache holds {rec['kv_capacity_seqs']}: the rest queue")
    tag = f"p{idx:03d}"
    off = one_run(sw, p, "offline", b, b * int(sw["offline"]["requests_per_batch"]), workdir, log_dir, tag)
    rec["offline_command"] = off.pop("command")
    if "error" in off:
        rec.update(status="error", error=off["error"])
        return rec
    rec.update(off)
    if sw["latency"]["enabled"]:
        lat = one_run(sw, p, "latency", b, b * int(sw["latency"]["requests_per_batch"]), workdir, log_dir, tag)
        rec["latency"] = lat
        if "error" in lat:
            rec.update(status="error", error=lat["error"])
    return rec


# ----------------------------------------------------------------------------------------------


def run_sweep(sweep_path: str, output: str, dry_run: bool = False, log_dir: str | None = None,
              only_splits: list[str] | None = None, progress: bool = True) -> list[dict]:
    sw = load_sweep(sweep_path)
    if only_splits:
        sw["splits"] = [s for s in sw["splits"] if s.name in only_splits]
        if not sw["splits"]:
            raise SweepError(f"--split: none of {only_splits} is a split of {sweep_path}")
    points = grid(sw)
    for p in points:
        validate_point(sw, p)
    if dry_run:
        from afsplit.config import load_config

        cfg = load_config(sw["base_config"], [f"{k}={_yaml_value(v)}" for k, v in sw["overrides"].items()])
        sw["model"] = {"device_type": cfg.topology.device, "vocab_size": 0}
        for i, p in enumerate(points):
            print(f"[{i}] {json.dumps(p.params())}\n    " + " ".join(run_command(sw, p, p.batch_size, "P.jsonl", "O.jsonl",
                                                                                       "S.json", sw["timeout_s"])))
        print(f"{len(points)} points; every config is valid")
        return []
    sw["model"] = model_info(sw["base_config"], sw["overrides"])
    sw["device"] = device_name(sw["model"]["device_type"])
    sw["git_commit"] = git_commit()
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(log_dir) if log_dir else out_path.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    stopped: dict[tuple, str] = {}
    records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(points), desc="sweep", unit="point", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="afsplit-sweep-") as tmp:
        for i, p in enumerate(points):
            if p.series in stopped:
                if bar:
                    bar.update(1)
                continue
            if bar:
                bar.set_postfix_str(f"{p.split.name} B={p.batch_size} in={p.input_len} {p.engine}")
            rec = run_point(sw, p, i, Path(tmp), logs)
            tpot, limit = rec.get("median_tpot_ms"), sw["stop"]["tpot_ms"]
            if limit is not None and tpot is not None and tpot > float(limit):
                stopped[p.series] = f"median TPOT {tpot:.1f} ms > {limit} ms at batch {p.batch_size}"
                rec["stop"] = stopped[p.series]
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            records.append(rec)
            msg = (f"{p.split.name} B={p.batch_size}: " + (f"error: {rec['error']}" if rec["status"] != "ok" else
                   f"{rec.get('tokens_per_s_per_gpu', 0):.1f} tok/s/GPU, median TPOT {rec.get('median_tpot_ms') or 0:.1f} ms"))
            (bar.write if bar else print)(msg + (f"  [stop: {rec['stop']}]" if "stop" in rec else ""))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run an end-to-end benchmark sweep (one JSON line per grid point).")
    ap.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    ap.add_argument("--output", "-o", help="append JSON lines here (default: results/<sweep name>.jsonl)")
    ap.add_argument("--log-dir", help="per-run logs (default: OUTPUT with .logs instead of .jsonl)")
    ap.add_argument("--split", action="append", help="run only this split (by name; repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="validate every point's config and print the commands")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        output = args.output or str(REPO / "results" / f"{Path(args.sweep).stem}.jsonl")
        records = run_sweep(args.sweep, output, args.dry_run, args.log_dir, args.split, not args.no_progress)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a config error (afsplit's ConfigError) names the key already
        if type(e).__name__.endswith("Error") and type(e).__module__.startswith("afsplit"):
            print(f"sweep: error: {e}", file=sys.stderr)
            return 2
        raise
    if not args.dry_run:
        bad = sum(r["status"] != "ok" for r in records)
        print(f"{len(records)} points written to {output}" + (f" ({bad} failed)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
