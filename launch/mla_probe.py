"""What limits the MLA decode kernel at batch 64, context 4k, Hq 16 (issue 19): the compiled kernel's
registers / spills / shared memory on this GPU (so programs per SM are known, not assumed from a local
AOT compile), and Nsight Compute's launch, occupancy, memory, scheduler and warp-state sections for one
launch (ncu reads the counters on this workplace's H200 machines: seen 2026-12-04).

    python3 launch/mla_probe.py --out DIR   # writes DIR/mla_probe.json and DIR/ncu.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

R, DR, PAGE, B, HQ, CTX = 512, 64, 16, 64, 16, 4096


def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks = B * CTX // PAGE
    cache = torch.randn(blocks + 1, PAGE, 1, R + DR, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = torch.randperm(blocks, device="cuda", generator=g).view(B, -1).to(torch.int32)
    q = torch.randn(B, HQ, R + DR, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, cache, bt, torch.full((B,), CTX, dtype=torch.int32, device="cuda")


def compiled_info(fn) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of a Triton kernel in this process."""
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for k in kernels.values():
            out.append({"name": k.name, "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                        "shared": k.metadata.shared, "num_warps": k.metadata.num_warps,
                        "num_stages": k.metadata.num_stages})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mla-probe"))
    ap.add_argument("--ncu-target", action="store_true", help="(internal) just run the kernel a few times")
    args = ap.parse_args()
    import importlib

    mod = importlib.import_module("kernels.mla_decode")  # the module (kernels/__init__ re-exports the function)

    q, cache, bt, sl = inputs()
    for _ in range(4):
        mod.mla_decode(q, cache, bt, sl, 0.1352, R)
    torch.cuda.synchronize()
    if args.ncu_target:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "sms": props.multi_processor_count,
           "regs_per_sm": getattr(props, "regs_per_multiprocessor", None),
           "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", None),
           "plan": mod.plan(B, HQ, R, R + DR, CTX, torch.device("cuda"), torch.bfloat16),
           "kernels": compiled_info(mod._mla_decode_kernel)}
    print(json.dumps(res, default=str), flush=True)
    ncu = shutil.which("ncu") or next((str(p) for p in Path("/opt/nvidia").glob("nsight-compute/*/ncu")), None)
    if ncu:
        cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:_mla_decode_kernel", "--launch-skip", "2",
               "--launch-count", "1", "--section", "LaunchStats", "--section", "Occupancy", "--section",
               "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--section", "WarpStateStats",
               "--section", "SchedulerStats", sys.executable, __file__, "--ncu-target"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            (out / "ncu.txt").write_text(p.stdout + "\n--- stderr\n" + p.stderr)
            res["ncu_rc"] = p.returncode
        except subprocess.TimeoutExpired:
            res["ncu_rc"] = "timeout"
    else:
        res["ncu_rc"] = "no ncu"
    (out / "mla_probe.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
