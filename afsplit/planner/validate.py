"""``afsplit plan validate``: predict every recorded run and print how far off the model is.

A run is a stats JSON (``afsplit generate --stats-json`` from the runtime, or
:mod:`afsplit.planner.engine_runs` for the single-GPU engine) that names its config and overrides
and holds a ``workload`` ({input_len, output_len, num_requests}); sweep JSON lines
(launch/sweep.py) carry the same in ``params`` and ``offline_command``. Runs without a workload are
listed as skipped. Each run is replayed through the scheduler step by step (simulate.py), after what
ran before it on the same engine: its ``--warmup`` and, for engine runs of one process, the earlier
runs (``earlier_runs`` in the run, else the order of engine_runs.py's log beside it), which set the
lazy CUDA-graph cache. Per run: wall time, the median decode step and tokens/s/GPU, measured vs
predicted; the run's error is the larger relative error of the last two. The last line is
``max relative error X over N runs``.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from afsplit.errors import AfsplitError

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RecordedRun:
    where: str
    config_path: str
    overrides: list
    mode: str  # engine | runtime
    input_len: int
    output_len: int
    num_requests: int
    decode_step_ms: float
    tokens_per_s_per_gpu: float
    warmup: bool = True  # ran after --warmup (the same prompts for 3 tokens)
    earlier: tuple = ()  # (num_requests, input_len, output_len) of the runs made before it on the same engine
    wall_s: float | None = None
    warm_start: bool = False  # the engine captured every decode bucket when built (runs recorded from 2026-12-07)


def _resolve_config(path: str, near: Path) -> str:
    for cand in (Path(path), REPO / path, near / path):
        if cand.exists():
            return str(cand)
    return path


def _workload(s: dict) -> dict | None:
    """The run's workload: recorded, or from its token totals when it has them (equal-length requests)."""
    if s.get("workload"):
        return s["workload"]
    n = s.get("num_requests")
    if n and s.get("prompt_tokens") and s.get("generated_tokens"):
        return {"input_len": round(s["prompt_tokens"] / n), "output_len": round(s["generated_tokens"] / n),
                "num_requests": n}
    return None


ENGINE_LOG_LINE = re.compile(r"^(\S+\.json): decode step")


def _engine_log_order(path: Path) -> list[str] | None:
    """File names in the order engine_runs.py made them in one process, from its log next to the runs
    (logs/engine.log beside or above the folder; launch/planner_runs.sh writes it), or None."""
    for log in (path.parent / "engine.log", path.parent / "logs" / "engine.log", path.parent.parent / "logs" / "engine.log"):
        if log.exists():
            names = [m.group(1) for m in map(ENGINE_LOG_LINE.match, log.read_text().splitlines()) if m]
            if path.name in names:
                return names
    return None


def _earlier_runs(path: Path, s: dict) -> tuple:
    """What ran before this run on the same engine (its graph cache): recorded in the run (engine_runs.py
    writes ``earlier_runs``), else the order of its engine log; a runtime run starts a fresh process."""
    if "earlier_runs" in s:
        return tuple(tuple(int(v) for v in w) for w in s["earlier_runs"])
    if s.get("mode") != "engine":
        return ()
    names = _engine_log_order(path) or []
    out = []
    for name in names[:names.index(path.name)] if path.name in names else []:
        try:
            wl = _workload(json.loads((path.parent / name).read_text()))
        except (OSError, json.JSONDecodeError):
            wl = None
        if wl:
            out.append((int(wl.get("num_requests", 0)), int(wl["input_len"]), int(wl["output_len"])))
    return tuple(out)


def _from_stats(path: Path, s: dict) -> RecordedRun | str:
    wl = _workload(s)
    if not wl:
        return "no workload (input_len, output_len) recorded"
    if s.get("decode_step_ms_median") is None or not s.get("tokens_per_s_per_gpu"):
        return "no decode step time or throughput"
    return RecordedRun(str(path), _resolve_config(s["config"], path.parent), list(s.get("overrides", [])),
                       s.get("mode", "runtime"), int(wl["input_len"]), int(wl["output_len"]),
                       int(wl.get("num_requests", s.get("num_requests", 0))), float(s["decode_step_ms_median"]),
                       float(s["tokens_per_s_per_gpu"]), bool(s.get("warmup", True)), _earlier_runs(path, s),
                       s.get("wall_s"), bool(s.get("warm_start", False)))


def _from_sweep(path: Path, n: int, r: dict) -> RecordedRun | str:
    if r.get("status") != "ok" or r.get("mode") == "deepspeed":
        return "not an afsplit run that succeeded"
    argv = shlex.split(r.get("offline_command", ""))
    if "--config" not in argv or r.get("decode_step_ms_median") is None:
        return "no config or decode step time recorded"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    p = r["params"]
    return RecordedRun(f"{path}:{n}", _resolve_config(argv[argv.index("--config") + 1], path.parent), sets, "runtime",
                       int(p["input_len"]), int(p["output_len"]), int(r.get("num_requests", p["batch_size"])),
                       float(r["decode_step_ms_median"]), float(r["tokens_per_s_per_gpu"]), "--warmup" in argv)


def find_runs(dirs: list[str]) -> tuple[list[RecordedRun], list[tuple[str, str]]]:
    """(runs, skipped (file, reason)) under the given folders."""
    runs, skipped = [], []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise AfsplitError(f"{d}: no such folder")
        files = [root] if root.is_file() else sorted(root.rglob("*.json")) + sorted(root.rglob("*.jsonl"))
        for f in files:
            if f.suffix == ".jsonl":
                for n, line in enumerate(f.read_text().splitlines(), 1):
                    if line.strip():
                        got = _from_sweep(f, n, json.loads(line))
                        (runs.append(got) if isinstance(got, RecordedRun) else skipped.append((f"{f}:{n}", got)))
                continue
            try:
                s = json.loads(f.read_text())
            except json.JSONDecodeError:
                skipped.append((str(f), "not JSON"))
                continue
            if not isinstance(s, dict) or "config" not in s or "steps" not in s:
                continue  # not a run's stats (profiles, reports)
            got = _from_stats(f, s)
            (runs.append(got) if isinstance(got, RecordedRun) else skipped.append((str(f), got)))
    return runs, skipped


def predict(run: RecordedRun, profile: dict):
    """(prediction, layout, m) of one recorded run."""
    from afsplit.config import load_config
    from afsplit.planner.layouts import layout_from_topology
    from afsplit.planner.profile_data import BlockTimes
    from afsplit.planner.shapes import shape_from_config
    from afsplit.planner.simulate import predict_run
    from afsplit.planner.step_model import StepModel

    cfg = load_config(run.config_path, run.overrides)
    if cfg.runtime.micro_batches == "auto":
        raise AfsplitError("runtime.micro_batches: auto (the probed m is not recorded)")
    m = int(cfg.runtime.micro_batches)
    engine = run.mode == "engine"
    layout = layout_from_topology(cfg.topology.topology, engine=engine)
    shape = shape_from_config(cfg)
    blocks = BlockTimes(profile, shape)
    sm = StepModel(blocks, *blocks.links(), balancer="none" if cfg.balancer.replicas == "none" else "replicas")
    rt = cfg.runtime
    # decode steps run as CUDA graphs unless off, profiling, or (distributed) row counts read on the host
    graphs = rt.cuda_graphs and not rt.profile and (engine or cfg.comm.metadata == "padded")
    pred = predict_run(sm, layout, cfg, run.num_requests, run.input_len, run.output_len, m, graphs,
                       warmup=run.warmup, earlier=run.earlier, warm_start=run.warm_start)
    return pred, layout, m


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def validate_main(args) -> int:
    from afsplit.planner.profile_data import load_profile

    profile = load_profile(args.profile)
    runs, skipped = find_runs(args.dirs)
    print(f"{'run':<44} {'mode':<7} {'layout':<20} {'reqs':>4} {'in/out':>9} {'m':>1}  {'wall s meas/pred':>16}  "
          f"{'step ms meas/pred':>17} {'err':>6}  {'tok/s/GPU meas/pred':>19} {'err':>6}")
    errors = []
    for run in runs:
        try:
            pred, layout, m = predict(run, profile)
        except (AfsplitError, RuntimeError) as e:
            skipped.append((run.where, str(e)))
            continue
        e_step = _rel(pred.decode_step_ms_median, run.decode_step_ms) if pred.decode_step_ms_median else math.inf
        e_tput = _rel(pred.tokens_per_s_per_gpu, run.tokens_per_s_per_gpu)
        errors.append(max(abs(e_step), abs(e_tput)))
        name = run.where if len(run.where) <= 44 else "..." + run.where[-41:]
        wall = f"{run.wall_s:.2f}/{pred.wall_s:.2f}" if run.wall_s else f"-/{pred.wall_s:.2f}"
        print(f"{name:<44} {run.mode:<7} {layout.label()[:20]:<20} {run.num_requests:>4} "
              f"{run.input_len:>4}/{run.output_len:<4} {m:>1}  {wall:>16}  "
              f"{run.decode_step_ms:>8.2f}/{pred.decode_step_ms_median or 0:<8.2f} {e_step:>+6.1%}  "
              f"{run.tokens_per_s_per_gpu:>9.1f}/{pred.tokens_per_s_per_gpu:<9.1f} {e_tput:>+6.1%}")
    for where, why in skipped:
        print(f"skipped {where}: {why}")
    worst = max(errors) if errors else math.nan
    print(f"max relative error {worst:.3f} over {len(errors)} runs")
    return 0 if errors else 1
