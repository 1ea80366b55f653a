"""Ping-pong proof on CPU: does micro-batch u's exchange and expert work overlap u + 1's attention?

    python -m launch.overlap_check [--m 1,2,3] [--layers 6] [--requests 8] [--new-tokens 12] [--cost-ms 20]
                                   [--out docs/benchmarks/overlap-cpu.json]

Runs the real distributed runtime (torchrun processes, gloo, 2 attention + 2 expert ranks of a
tiny Qwen3-MoE-shaped checkpoint) with an injected compute cost proportional to the tokens each
side processes: an attention rank sleeps ``cost`` per token of the micro-batch in every layer; an
expert rank sleeps ``cost / (A * p_hit)`` per row it serves, so that on average both sides are
equally busy (A attention ranks; p_hit = the chance a token has a slot on a given expert rank).
Sleeping stands in for GPU kernels: it takes no CPU, so what is measured is the schedule. The
same requests run with each m; greedy outputs must be identical across m. The last line printed is
``overlap m2/m1 = R`` with R = median decode step with m = 2 / with m = 1 (1.0: the micro-batches
serialise; 0.5: perfect overlap; the goal is R <= 0.65).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NODES = [{"attention": 2, "expert": 2}]


def _inject(cost_s: float, num_attention: int, p_hit: float) -> None:
    """Wrap the attention block and the expert FFN with sleeps proportional to their tokens."""
    from afsplit.models.moe_model import AttentionModel, ExpertModel

    attention_block = AttentionModel.attention_block
    experts = ExpertModel.__call__

    def slow_attention(self, layer, h, residual, meta, kv):
        out = attention_block(self, layer, h, residual, meta, kv)
        time.sleep(cost_s * h.shape[0])
        return out

    def slow_experts(self, layer, x, ids, weights):
        y = experts(self, layer, x, ids, weights)
        time.sleep(cost_s / (num_attention * p_hit) * int((ids >= 0).any(1).sum()))
        return y

    AttentionModel.attention_block = slow_attention
    ExpertModel.__call__ = slow_experts


def worker(cfg_path: str, prompts_path: str, out_path: str, cost_s: float, p_hit: float) -> None:
    """One rank (under torchrun): generate with injected costs; the coordinator writes tokens + stats."""
    from afsplit.config import load_config
    from afsplit.runtime.worker import RankRuntime
    from afsplit.sampling_params import SamplingParams

    config = load_config(cfg_path)
    _inject(cost_s, len(config.topology.topology.attention_ranks), p_hit)
    runtime = RankRuntime(config)
    try:
        if runtime.rank != runtime.coordinator:
            runtime.serve()
            return
        prompts = [{"prompt_token_ids": p} for p in json.loads(Path(prompts_path).read_text())["prompts"]]
        params = SamplingParams(temperature=0.0, max_tokens=json.loads(Path(prompts_path).read_text())["new_tokens"],
                                ignore_eos=True)
        outs = runtime.generate(prompts, [params] * len(prompts), use_tqdm=False)
        summary = runtime.stats.summary()
        Path(out_path).write_text(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                                              "decode_step_s": runtime.stats.decode_step_s, "summary": summary}))
    finally:
        runtime.shutdown()


def run(args) -> dict:
    from afsplit.models.tiny import make_tiny
    from comm.topology import NodeSpec, Topology
    from launch.local_cluster import launch_local_cluster

    work = Path(args.workdir or tempfile.mkdtemp(prefix="afsplit-overlap-"))
    model = make_tiny("qwen3_moe", work / "model", seed=3, num_hidden_layers=args.layers)
    n_experts, top_k = 8, 2  # the tiny qwen3_moe family
    n_exp_ranks = NODES[0]["expert"]
    # a token has a slot on a given expert rank with this chance (top-k over experts split evenly)
    per_rank = n_experts // n_exp_ranks
    miss = 1.0
    for i in range(top_k):
        miss *= (n_experts - per_rank - i) / (n_experts - i)
    p_hit = 1.0 - miss
    prompts = [[(7 * r + 3 * i) % 250 + 1 for i in range(5 + r % 3)] for r in range(args.requests)]
    (work / "prompts.json").write_text(json.dumps({"prompts": prompts, "new_tokens": args.new_tokens}))
    topo = Topology(tuple(NodeSpec(**n) for n in NODES))
    results = {}
    for m in args.m:
        cfg = {"model": {"path": str(model)}, "topology": {"nodes": NODES},
               "runtime": {"num_kv_blocks": 256, "block_size": 8, "micro_batches": m, "max_num_seqs": 64},
               "comm": {"timeout_s": 120}}
        cfg_path = work / f"m{m}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out = work / f"m{m}.json"
        argv = [sys.executable, "-m", "launch.overlap_check", "--worker", str(cfg_path), str(work / "prompts.json"),
                str(out), "--cost-ms", str(args.cost_ms), "--p-hit", repr(p_hit)]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1"}
        code = launch_local_cluster(topo, argv, device="cpu", env=env, timeout_s=args.timeout, out=sys.stderr)
        if code != 0:
            raise SystemExit(f"overlap_check: the run with m={m} failed (exit {code})")
        res = json.loads(out.read_text())
        steps = res["decode_step_s"]
        results[m] = {"tokens": res["tokens"], "decode_step_ms_median": 1e3 * statistics.median(steps),
                      "decode_steps": len(steps)}
    return {"results": results, "p_hit": p_hit, "workdir": str(work)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.overlap_check", description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=6, help="MoE layers of the tiny model (more layers: less pipeline fill)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--cost-ms", type=float, default=20.0, help="injected attention cost per token per layer")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--workdir", help="keep the model, configs and per-run results here")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", nargs=3, metavar=("CFG", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--p-hit", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker, cost_s=args.cost_ms / 1e3, p_hit=args.p_hit)
        return 0
    if 1 not in args.m or 2 not in args.m:
        ap.error("--m must include 1 and 2 (the ratio compares them)")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rep = run(args)
    res = rep["results"]
    base = res[1]["tokens"]
    same = all(r["tokens"] == base for r in res.values())
    print(f"{'m':>3}  {'decode step (median)':>20}  {'vs m=1':>7}  decode steps")
    for m, r in res.items():
        print(f"{m:>3}  {r['decode_step_ms_median']:>17.1f} ms  {r['decode_step_ms_median'] / res[1]['decode_step_ms_median']:>7.3f}"
              f"  {r['decode_steps']}")
    print(f"outputs identical across m: {same}")
    ratio = res[2]["decode_step_ms_median"] / res[1]["decode_step_ms_median"]
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": started, "command": "python -m launch.overlap_check " + " ".join(argv or sys.argv[1:]),
            "topology": NODES, "layers": args.layers, "requests": args.requests, "new_tokens": args.new_tokens,
            "cost_ms_per_token": args.cost_ms, "p_hit": rep["p_hit"], "outputs_identical": same,
            "ratio_m2_m1": ratio,
            "runs": {str(m): {k: v for k, v in r.items() if k != "tokens"} for m, r in res.items()}}, indent=1))
    if not same:
        print("overlap_check: outputs differ across m", file=sys.stderr)
        print(f"overlap m2/m1 = {ratio:.3f}")
        return 1
    print(f"overlap m2/m1 = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
