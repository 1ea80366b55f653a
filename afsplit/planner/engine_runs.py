"""Single-GPU engine runs with a stats JSON like the runtime's (the CLI writes none for one process).

    python -m afsplit.planner.engine_runs --config C.yaml [--set k=v ...] --runs 8x512x128,64x2048x128 --out-dir DIR

builds the engine once and, per workload BxINxOUT (B requests of IN random prompt tokens, OUT new
tokens each, greedy, ignore_eos, all submitted at once), runs the same prompts for 3 tokens (the
runtime's --warmup) and then the measured run, timing every engine step. Each run's JSON has the
runtime's names (steps, wall_s, generated_tokens, tokens_per_s_per_gpu, decode_step_ms_median, ...)
plus ``mode: engine``, its ``workload``, the config and overrides, ``warmup``, ``warm_start`` (the engine
captured every decode bucket when built: runtime.capture_at_start) and ``earlier_runs`` (the
workloads run before it on the same engine, whose CUDA graphs it inherits), so ``afsplit plan
validate`` can replay it, and each step's time, shape and kind (``step_kinds``: replay, capture, first
visit of a bucket, eager, chunk).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def random_prompts(n: int, input_len: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)]} for _ in range(n)]


def graph_counts(engine) -> tuple[int, int, int] | None:
    """(calls, replays, graphs) of the engine's decode-graph cache, or None without the static path."""
    static = getattr(engine.runner, "static", None)
    g = getattr(static, "graphs", None)
    return None if g is None else (g.calls, g.replays, len(g.graphs))


def step_kind(before, after, decode: bool) -> str:
    """What a step was, from the graph cache's counters around it (cuda_graphs.GraphCache.run): ``replay``,
    ``capture``, ``first`` (a bucket's first visit: the static path run eagerly), ``eager`` (a decode step
    outside the static path) or ``chunk`` (prefill or mixed)."""
    if not decode:
        return "chunk"
    if before is None or after[0] == before[0]:
        return "eager"
    if after[1] == before[1]:
        return "first"
    return "capture" if after[2] > before[2] else "replay"


def measure_engine(engine, num_requests: int, input_len: int, output_len: int, seed: int = 0,
                   warmup: bool = True) -> dict:
    """One measured run on a built LLMEngine: the stats dict (see the module docstring)."""
    from afsplit.cuda_graphs import warm_up_requests
    from afsplit.sampling_params import SamplingParams

    prompts = random_prompts(num_requests, input_len, engine.spec.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    if warmup:
        engine.generate(*warm_up_requests(prompts), use_tqdm=False)
    steps: list[tuple[float, bool]] = []
    shapes: list[list[int]] = []  # [tokens, decodes] per step (what the planner's replay schedules)
    schedule, step = engine.scheduler.schedule, engine.step
    shape = {}

    def seen_schedule(*a, **k):  # admit=False: the step async scheduling launches ahead (afsplit/step_ahead.py)
        batch = schedule(*a, **k)
        shape["decode"] = bool(batch.num_tokens) and all(n == 1 for n in batch.num_tokens)
        shape["tokens"] = [sum(batch.num_tokens), sum(1 for n in batch.num_tokens if n == 1)]
        return batch

    kinds: list[str] = []

    def timed_step(*a, **k):
        before = graph_counts(engine)
        t0 = time.perf_counter()
        out = step(*a, **k)  # sampling reads the logits back: the step's GPU work is done here
        steps.append((time.perf_counter() - t0, shape.get("decode", False)))
        shapes.append(shape.get("tokens", [0, 0]))
        kinds.append(step_kind(before, graph_counts(engine), shape.get("decode", False)))
        return out

    engine.scheduler.schedule, engine.step = seen_schedule, timed_step
    try:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        del engine.scheduler.schedule, engine.step  # back to the class's methods
    generated = sum(len(o.outputs[0].token_ids) for o in outs if not o.error)
    dec = sorted(t for t, d in steps if d)
    return {"mode": "engine", "steps": len(steps), "wall_s": wall, "generated_tokens": generated,
            "output_throughput": generated / wall, "tokens_per_s_per_gpu": generated / wall, "gpus": 1,
            "num_requests": len(outs), "warm_start": getattr(engine, "warm_start", None) is not None,
            "decode_step_ms_mean": 1e3 * statistics.fmean(dec) if dec else None,
            "decode_step_ms_median": 1e3 * dec[len(dec) // 2] if dec else None,
            "workload": {"input_len": input_len, "output_len": output_len, "num_requests": num_requests},
            "step_ms": [round(1e3 * t, 3) for t, _ in steps], "step_tokens": shapes, "step_kinds": kinds}


def parse_runs(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--runs: {item!r} is not BxINxOUT (e.g. 64x512x128)")
        out.append(tuple(int(p) for p in parts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs", required=True, help="comma-separated BxINxOUT workloads")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--prefix", default="engine")
    args = ap.parse_args(argv)
    from afsplit.config import load_config
    from afsplit.engine import LLMEngine

    cfg = load_config(args.config, args.overrides)
    if cfg.topology.topology.world_size != 1:
        raise SystemExit(f"{args.config}: the engine runs one rank; add --set 'topology.nodes=[{{colocated: 1}}]'")
    engine = LLMEngine(cfg)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier: list[list[int]] = []  # runs made before on this engine: its CUDA-graph cache (afsplit plan validate)
    for b, il, ol in parse_runs(args.runs):
        stats = measure_engine(engine, b, il, ol)
        stats.update(config=args.config, overrides=args.overrides, warmup=True, earlier_runs=list(earlier))
        earlier.append([b, il, ol])
        path = out / f"{args.prefix}-b{b}-in{il}-out{ol}.json"
        path.write_text(json.dumps(stats, indent=1))
        print(f"{path.name}: decode step {stats['decode_step_ms_median']:.2f} ms (median), "
              f"{stats['tokens_per_s_per_gpu']:.1f} tok/s/GPU, {stats['steps']} steps, wall {stats['wall_s']:.2f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
