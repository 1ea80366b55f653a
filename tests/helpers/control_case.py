"""Ranks of the control-plane test (tests/test_reliability.py): run by torch.multiprocessing.spawn."""

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from comm.control import ControlPlane
from comm.errors import CommError

ROLES = ["attention", "attention", "expert"]


def run(rank: int, scenario: str, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=30))
    plane = ControlPlane(dist.new_group(backend="gloo"), rank, 3, root=0, timeout_s=2.0, role_of=ROLES.__getitem__)
    result: dict = {}
    try:
        if scenario == "silent":
            big = {"blob": "x" * 1_000_000, "n": 7} if rank == 0 else None
            got = plane.broadcast(big, what="step plan", timeout_s=None)
            result["broadcast_ok"] = got["n"] == 7 and len(got["blob"]) == 1_000_000
            for step in range(20):  # steps: plan out, reports back; a follower keeps no old sends
                gathered = plane.gather({"rank": rank, "sq": rank * rank + step}, what="step report")
                plane.broadcast(step if rank == 0 else None, what="step plan")
                result["max_sending"] = max(result.get("max_sending", 0), len(plane._sending))
            if rank == 0:
                result["gather"] = [g["sq"] for g in gathered]
            if rank == 2:
                time.sleep(5)  # silent for the next gather
            else:
                start = time.monotonic()
                plane.gather(rank, what="step report")  # rank 1 does not wait: only the root blames
                if rank == 1:
                    time.sleep(4)
        else:  # "dead": rank 1 exits; the root's gather names it, rank 2's wait for a plan names the root
            start = time.monotonic()
            plane.gather(rank, what="step report")
            if rank == 1:
                time.sleep(1)  # let its report go out
                os._exit(0)
            start = time.monotonic()
            if rank == 0:
                try:
                    plane.gather(rank, what="step report")
                finally:
                    time.sleep(4)  # stay: rank 2 must time out waiting for a plan, not see us gone
            else:
                plane.broadcast(None, what="step plan")
    except CommError as e:
        result.update(error=str(e), peer=e.peer, after_s=time.monotonic() - start)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the peers' pairs are broken on purpose: skip the orderly teardown
