"""Run many runtime configurations over ONE torchrun world (process start-up dominates on CPU).

    python -m launch.local_cluster --config BASE.yaml -- tests/helpers/runtime_matrix.py BASE.yaml PROMPTS.json OUT_DIR

For every combination of transport x metadata/static-decode x replicas x micro-batches, every rank
builds a RankRuntime over the same process groups (the config's other keys from BASE.yaml), the
coordinator generates greedily and writes OUT_DIR/<combo>.json with the tokens and, per attention
rank, how many steps took the static (CUDA-graph) decode path.
"""

import itertools
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from afsplit.config import load_config
from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
from afsplit.runtime.worker import RankRuntime
from afsplit.sampling_params import SamplingParams
from comm.groups import init_distributed, leave_process

TRANSPORTS = ("direct", "two_phase", "adaptive")
MODES = ("padded_static", "padded", "counts")  # padded_static: the CUDA-graph decode path, uncaptured on CPU
REPLICAS = ("none", "auto")
MICRO_BATCHES = (1, 2, 3)
NEW_TOKENS = 6


def combos():
    for transport, mode, replicas, m in itertools.product(TRANSPORTS, MODES, REPLICAS, MICRO_BATCHES):
        yield f"{transport}-{mode}-{replicas}-m{m}", transport, mode, replicas, m


def main(base_cfg: str, prompts_path: str, out_dir: str) -> None:
    base = load_config(base_cfg)
    ctx = init_distributed(base.topology.topology, backend="gloo", timeout_s=base.comm.timeout_s)
    prompts = [{"prompt_token_ids": p} for p in json.loads(Path(prompts_path).read_text())]
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)] * len(prompts)
    try:
        for name, transport, mode, replicas, m in combos():
            os.environ[STATIC_ON_CPU_ENV] = "1" if mode == "padded_static" else "0"
            overrides = [f"comm.transport={transport}", f"comm.metadata={mode.replace('_static', '')}",
                         f"balancer.replicas={replicas}", f"runtime.micro_batches={m}"]
            runtime = RankRuntime(load_config(base_cfg, overrides), ctx=ctx)
            static = runtime.engine.runner.static if runtime.engine is not None else None
            if runtime.rank == runtime.coordinator:
                outs = runtime.generate(prompts, params, use_tqdm=False)
                tokens = [o.outputs[0].token_ids for o in outs]
            else:
                runtime.serve()
                tokens = None
            calls = [None] * ctx.world_size
            dist.all_gather_object(calls, static.graphs.calls if static is not None else None, group=ctx.control_group)
            if tokens is not None:
                (Path(out_dir) / f"{name}.json").write_text(json.dumps({"tokens": tokens, "static_calls": calls}))
            runtime.shutdown()
    finally:
        ctx.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process(0)  # as a rank of `afsplit generate` does (comm/groups.py says why)
