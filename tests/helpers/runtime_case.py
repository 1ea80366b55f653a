"""Run under torchrun (via launch.local_cluster): generate with the runtime and dump tokens + logits.

    python -m launch.local_cluster --config CFG -- tests/helpers/runtime_case.py CFG PROMPTS.json OUT_DIR

Every attention rank writes OUT_DIR/logits-rank{r}.pt ({request_id: [step logits]}); the
coordinator writes OUT_DIR/tokens.json ({request_id: token_ids}); every rank writes
OUT_DIR/mover-rank{r}.txt (the exchange's mover: nccl, gloo or symm_mem).
"""

import json
import sys
from pathlib import Path

import torch

from afsplit.config import load_config
from afsplit.runtime.worker import RankRuntime
from afsplit.sampling_params import SamplingParams
from comm.groups import leave_process


def record_logits(engine, sink: dict) -> None:
    run = engine.runner.run

    def recording_run(batch, feed=None):
        logits, sampling = run(batch, feed)
        for row, i in enumerate(sampling):
            sink.setdefault(batch.seqs[i].request_id, []).append(logits[row].cpu().clone())
        return logits, sampling

    engine.runner.run = recording_run


def main(cfg_path, prompts_path, out_dir):
    out = Path(out_dir)
    runtime = RankRuntime(load_config(cfg_path))
    (out / f"mover-rank{runtime.rank}.txt").write_text(runtime.exchange.mover.name)  # which mover the exchange chose
    logits: dict = {}
    try:
        if runtime.engine is not None:
            record_logits(runtime.engine, logits)
        if runtime.rank == runtime.coordinator:
            prompts = [{"prompt_token_ids": p} for p in json.loads(Path(prompts_path).read_text())]
            params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
            outs = runtime.generate(prompts, params, use_tqdm=False)
            (out / "tokens.json").write_text(json.dumps({o.request_id: o.outputs[0].token_ids for o in outs}))
        else:
            runtime.serve()
        if runtime.engine is not None:
            torch.save(logits, out / f"logits-rank{runtime.rank}.pt")
            static = runtime.engine.runner.static
            (out / f"static-steps-rank{runtime.rank}.json").write_text(json.dumps(static.graphs.calls if static else 0))
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process(0)  # as a rank of `afsplit generate` does (comm/groups.py says why)
