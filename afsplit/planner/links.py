"""The one place the profiler measures links: message size -> time, independent of the exchange's code.

With two or more GPUs in this process, ``cuda:0 -> cuda:1`` copies over NVLink give the intra-node
latency and bandwidth (a straight line through time vs size). The network cannot be measured from
one host: its numbers come from ``afsplit plan``'s flags, and are recorded here as assumed. The
exchange's own fixed cost per call is measured in whole runs (system_runs.py), not here.
"""

from __future__ import annotations

import statistics
import time

import torch

from afsplit.planner.fitting import fit_linear
from afsplit.planner.profile_data import DEFAULT_INTER_GAP_US

# DESIGN.md (4x H200, NCCL 2.28.9, 64 MiB): NVLink all_to_all 361 GB/s; latency assumed
ASSUMED_INTRA = {"alpha_us": 3.0, "GBps": 361.0, "gap_us": 0.0,
                 "source": "assumed: DESIGN.md NVLink all_to_all 361 GB/s (4x H200), 3 us latency"}
ASSUMED_INTER = {"alpha_us": 5.0, "GBps": 50.0, "gap_us": DEFAULT_INTER_GAP_US,
                 "source": "assumed: 400 Gb/s, 5 us per GPU NIC (afsplit plan --inter-node-* override it)"}
SIZES = [4 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20]


def _copy_time(src: torch.Tensor, dst: torch.Tensor, reps: int = 10) -> float:
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_links(device: torch.device) -> dict:
    """{"intra": {...}, "inter": {...}} in the profile's format (alpha_us, GBps, gap_us, source)."""
    intra = dict(ASSUMED_INTRA)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        pts = []
        for n in SIZES:
            a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
            b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
            pts.append((float(n), _copy_time(a, b)))
            del a, b
        c, s = fit_linear(pts)
        if s > 0:
            intra = {"alpha_us": c * 1e6, "GBps": 1e-9 / s, "gap_us": 0.0,
                     "source": "measured: cuda:0 -> cuda:1 copies, 4 KiB-64 MiB", "points": pts}
    return {"intra": intra, "inter": dict(ASSUMED_INTER)}
