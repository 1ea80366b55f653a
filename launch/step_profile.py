"""One replayed decode step per rank under torch.profiler, and its GPU time split (attention, exchange, experts, idle).

    torchrun --nproc-per-node 2 -m launch.step_profile --out DIR [--replay 30] -- generate --config CFG ...
    python -m launch.step_profile --out DIR -- generate --config configs/qwen3-30b-a3b-1gpu.yaml ...

Wraps afsplit's CLI (``afsplit.cli.main`` with the arguments after ``--``) without changing the
runtime: every CUDA-graph replay goes through ``afsplit.cuda_graphs.GraphCache.run``, and the Nth
replay of this process (``--replay``; the warm start's, runtime.capture_at_start, not counted) runs under
``torch.profiler`` (CUDA activity). Every rank
replays exactly once per graphed step (attention ranks their forward, expert ranks their whole
step), so the Nth replay is the same engine step on every rank. The profiler is started (after a
throw-away session one replay earlier, so CUPTI's start-up stays out), the ranks meet at a store
barrier, the replay runs, the device is synchronised and the profile stops. Writes, per rank,

* ``DIR/trace-rank{r}.json.gz``: the chrome trace (chrome://tracing, Perfetto);
* ``DIR/split-rank{r}.json``: the replay's GPU window and its split. Kernels are put in classes by
  name: *experts* (the fused-MoE kernels), *exchange* (NCCL kernels, device copies and memsets,
  symmetric-memory barriers), *compute* (everything else: attention, norms, router, GEMMs, the
  exchange's pack/sum glue). ``split_ms`` is exclusive and sums to the window: at each instant the
  first busy class of experts > compute > exchange, else idle (so exchange = communication not
  hidden behind compute, NCCL kernels spinning on a late peer included); ``busy_ms`` is each class's
  own union.

Run the measured runs without this wrapper: the profiled step is slower than the others.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

EXPERT_KEYS = ("moe",)
EXCHANGE_KEYS = ("nccl", "memcpy", "memset", "barrier_kernel", "symm", "put_signal", "wait_signal")


def kernel_class(name: str, cat: str) -> str:
    low = name.lower()
    if cat in ("gpu_memcpy", "gpu_memset") or any(k in low for k in EXCHANGE_KEYS):
        return "exchange"
    if any(k in low for k in EXPERT_KEYS):
        return "experts"
    return "compute"


def split_trace(events: list[dict]) -> dict:
    """The GPU window of the device events in a chrome trace and its split (see the module docstring)."""
    kern = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), kernel_class(e.get("name", ""), e.get("cat", "")),
             e.get("name", "")) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kern:
        return {"window_ms": 0.0, "kernels": 0}
    lo, hi = min(k[0] for k in kern), max(k[1] for k in kern)
    order = ("experts", "compute", "exchange")
    points = sorted({lo, hi, *(k[0] for k in kern), *(k[1] for k in kern)})
    split = dict.fromkeys((*order, "idle"), 0.0)
    busy = dict.fromkeys(order, 0.0)
    # sweep: per elementary interval, which classes are active (O(n log n) with a running count)
    starts = sorted((k[0], k[2]) for k in kern)
    ends = sorted((k[1], k[2]) for k in kern)
    active = dict.fromkeys(order, 0)
    i = j = 0
    for a, b in zip(points, points[1:]):
        while i < len(starts) and starts[i][0] <= a:
            active[starts[i][1]] += 1
            i += 1
        while j < len(ends) and ends[j][0] <= a:
            active[ends[j][1]] -= 1
            j += 1
        span = b - a
        on = [c for c in order if active[c] > 0]
        split[on[0] if on else "idle"] += span
        for c in on:
            busy[c] += span
    top: dict[str, dict[str, float]] = {c: {} for c in order}
    for s, e, c, name in kern:
        top[c][name] = top[c].get(name, 0.0) + (e - s)
    return {"window_ms": (hi - lo) / 1e3, "kernels": len(kern),
            "split_ms": {k: v / 1e3 for k, v in split.items()}, "busy_ms": {k: v / 1e3 for k, v in busy.items()},
            "top_kernels_ms": {c: dict(sorted(((n[:120], t / 1e3) for n, t in d.items()), key=lambda x: -x[1])[:8])
                               for c, d in top.items()}}


def _barrier(tag: str, timeout_s: float = 60.0) -> bool:
    """All ranks of the torchrun world meet (host only, through the rendezvous store); False on timeout."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    store = dist.distributed_c10d._get_default_store()
    store.add(tag, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(tag, 0) < dist.get_world_size():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def install(out: Path, replay: int) -> None:
    """Patch GraphCache.run so that this process's `replay`-th replay is profiled into `out`."""
    import torch

    from afsplit import cuda_graphs, engine

    orig = cuda_graphs.GraphCache.run
    state = {"replays": 0, "warm_start": False}
    rank = int(os.environ.get("RANK", "0"))
    warm_start = engine.capture_every_bucket

    def warming(e):  # the single-process engine's warm start replays synthetic steps: not the run's, not counted
        state["warm_start"] = True
        try:
            return warm_start(e)
        finally:
            state["warm_start"] = False

    engine.capture_every_bucket = warming

    def run(self, key, fn):
        if key not in self.graphs or state["warm_start"]:
            return orig(self, key, fn)
        state["replays"] += 1
        n = state["replays"]
        if n == replay - 1:  # a throw-away session first: CUPTI's one-time start-up stays out of the step
            warm = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            warm.start()
            warm.stop()
        if n != replay:
            return orig(self, key, fn)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        prof.start()
        torch.cuda.synchronize(self.device)
        met = _barrier(f"afsplit-step-profile-{replay}")  # the trace's window starts at the replay's first kernel
        t0 = time.perf_counter()
        result = orig(self, key, fn)
        torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - t0
        prof.stop()
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"trace-rank{rank}.json"
        prof.export_chrome_trace(str(raw))
        events = json.loads(raw.read_text()).get("traceEvents", [])
        with gzip.open(f"{raw}.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
        raw.unlink()
        summary = {"rank": rank, "name": self.name, "key": list(key), "replay": replay, "wall_ms": wall * 1e3,
                   "ranks_met_before": met, **split_trace(events)}
        (out / f"split-rank{rank}.json").write_text(json.dumps(summary, indent=1))
        print(f"step_profile: rank {rank} {self.name} {key}: window {summary['window_ms']:.2f} ms, split "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary.get("split_ms", {}).items()), flush=True)
        return result

    cuda_graphs.GraphCache.run = run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m launch.step_profile --out DIR [--replay N] -- <afsplit arguments>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="python -m launch.step_profile")
    ap.add_argument("--out", required=True)
    ap.add_argument("--replay", type=int, default=30, help="profile this process's N-th CUDA-graph replay (>= 2)")
    ns = ap.parse_args(argv[:cut])
    if ns.replay < 2:
        ap.error("--replay must be >= 2")
    install(Path(ns.out), ns.replay)
    from afsplit.cli import main as cli_main

    return cli_main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
