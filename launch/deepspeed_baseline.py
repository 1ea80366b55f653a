"""The DeepSpeed-MoE expert-parallel baseline on afsplit's model and weights.

    torchrun --nproc-per-node 4 launch/deepspeed_baseline.py --config configs/qwen3-30b-a3b-colocated4.yaml \
        --prompts-file prompts.jsonl --output out.jsonl --stats-json stats.json
    python3 launch/deepspeed_baseline.py --config configs/tiny.yaml --set 'topology.nodes=[{colocated: 2}]' ...
        (started plainly it launches topology.nodes' ranks itself, like `afsplit generate`)

Every rank is data-parallel for attention and expert-parallel for the routed experts (GShard /
DeepSpeed-MoE): the attention part is afsplit's own (``AttentionModel`` with the engine's paged KV
cache, scheduler and greedy sampler, so attention costs the same as in afsplit), and each MoE layer
is a ``deepspeed.moe.layer.MoE`` with ``ep_size`` = world size: DeepSpeed's ``TopKGate`` (its
router weight = the model's router weight), its all-to-all dispatch into ``[experts, capacity, H]``
buffers, its ``Experts`` (SwiGLU modules holding exactly the model's expert weights, the global
expert ids ``rank * E_local ... + E_local - 1`` on each rank) and its all-to-all combine.

Routing matches the model's: DeepSpeed >= 0.14 has a general ``topkgating`` (k > 2) besides top-1
and top-2; all renormalise the top-k gates except top-1, so models with ``norm_topk_prob: false``
and k >= 2 (or ``true`` and k = 1) are refused. ``drop_tokens=False`` (capacity = the largest
expert load over the EP group, no token dropped), no noise, no random token selection, and
``top2_2nd_expert_sampling=False``. Random-weight benchmarks with ``model.routing_skew`` add the
same Zipf bias to the gate logits as afsplit (by wrapping the gate's forward). DeepSpeed computes
gate logits in float32 while afsplit computes them in the model dtype, so in bf16 a token near a
routing tie can pick a different expert; in float32 (the CPU tests) the greedy tokens equal the
single-process engine's.

Ranks run in lockstep: a rank with no work still joins every MoE all-to-all (with one dummy token).
Rank 0 writes ``--output`` (JSON lines, like ``afsplit generate``) and ``--stats-json`` with
afsplit's names (output_throughput, tokens_per_s_per_gpu, mean_/median_/p99_ ttft/tpot/itl/e2el ms,
per_layer_ms = {attention: {attention, moe}}: ``moe`` is DeepSpeed's whole MoE layer, gate +
all-to-all + experts + all-to-all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("afsplit.deepspeed")


def parse_args(argv):
    ap = argparse.ArgumentParser(description="DeepSpeed-MoE expert-parallel baseline on an afsplit config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--prompts-file", required=True, help="JSON lines, as for afsplit generate")
    ap.add_argument("--output", help="results as JSON lines (rank 0)")
    ap.add_argument("--stats-json", help="run measurements (rank 0)")
    ap.add_argument("--no-progress", action="store_true", help="accepted for symmetry with afsplit generate")
    ap.add_argument("--warmup", action="store_true", help="as afsplit generate --warmup (kernels compiled first)")
    return ap.parse_args(argv)


class SwiGLUExpert(torch.nn.Module):
    """One routed expert, as DeepSpeed's `Experts` wants it: a module mapping [..., H] -> [..., H]."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w13 = torch.nn.Parameter(w13, requires_grad=False)  # [2I, H] gate rows then up rows
        self.w2 = torch.nn.Parameter(w2, requires_grad=False)  # [H, I]

    def forward(self, x):
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2)


def _biased_gate_forward(gate, bias: torch.Tensor):
    """TopKGate.forward with `bias` added to the float32 logits (afsplit's routing_skew); same gating calls."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    def forward(input, used_token=None, sparse_routes=False, use_tutel=False):
        logits = F.linear(input.float(), gate.wg.weight.float()) + bias
        cf = gate.eval_capacity_factor
        if gate.k == 1:
            return top1gating(logits, cf, gate.min_capacity, used_token, None, gate.drop_tokens, gate.use_rts,
                              gate.ep_group, sparse_routes, use_tutel)
        if gate.k == 2:
            return top2gating(logits, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                              gate.top2_2nd_expert_sampling, sparse_routes)
        return topkgating(logits, gate.k, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                          sparse_routes=sparse_routes)

    return forward


def build_moe_layers(spec, source, attn_weights, router_bias, dtype, device, rank: int, world: int) -> dict:
    """MoE layer id -> deepspeed.moe.layer.MoE holding this rank's experts and the model's router."""
    from deepspeed.moe.layer import MoE

    from afsplit.models.weights import load_expert_weights

    if spec.num_experts % world:
        raise SystemExit(f"deepspeed baseline: {spec.num_experts} experts do not split over ep_size = {world} ranks "
                         f"({spec.num_experts} % {world} = {spec.num_experts % world}); use a world size dividing it")
    if spec.top_k >= 2 and not spec.norm_topk_prob or spec.top_k == 1 and spec.norm_topk_prob:
        raise SystemExit(f"deepspeed baseline: DeepSpeed's top-{spec.top_k} gate "
                         f"{'renormalises' if spec.top_k >= 2 else 'does not renormalise'} the gates, the model "
                         f"(norm_topk_prob={spec.norm_topk_prob}) does not; routing would differ")
    e_local = spec.num_experts // world
    mine = list(range(rank * e_local, (rank + 1) * e_local))  # DeepSpeed's layout: [ep_size, E_local, C, H]
    H, I = spec.hidden_size, spec.moe_intermediate_size
    layers = {}
    for layer in spec.moe_layer_ids:
        template = SwiGLUExpert(torch.empty(2 * I, H, device="meta"), torch.empty(H, I, device="meta"))
        moe = MoE(hidden_size=H, expert=template, num_experts=spec.num_experts, ep_size=world, k=spec.top_k,
                  capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                  noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        moe.set_deepspeed_parallelism()
        w = load_expert_weights(source, spec, dtype, device, {layer: mine})
        experts = moe.deepspeed_moe.experts.deepspeed_experts
        for j in range(e_local):
            experts[j] = SwiGLUExpert(w.w13[layer][j], w.w2[layer][j])
        gate = moe.deepspeed_moe.gate
        gate.wg.weight = torch.nn.Parameter(attn_weights.layers[layer].gate_w.detach().float().clone(),
                                            requires_grad=False)
        gate.to(device)
        if router_bias is not None:
            gate.forward = _biased_gate_forward(gate, router_bias[layer].float().to(device))
        moe.eval()
        layers[layer] = moe
    return layers


def make_exchange(layers: dict, times):
    from afsplit.models.moe_model import MoEBackend

    class DeepSpeedExchange(MoEBackend):
        """afsplit's MoE hook -> DeepSpeed's MoE layer (its own gate: afsplit's ids/weights are not used)."""

        def __init__(self):
            self._out = {}

        def send(self, layer, micro_batch, x, ids, weights):
            T = x.shape[0]
            inp = x if T else x.new_zeros(1, x.shape[1])  # an idle rank still joins both all-to-alls
            with times.phase("moe"):
                out, _, _ = layers[layer](inp)
            self._out[micro_batch] = out[:T].to(x.dtype)

        def recv(self, layer, micro_batch):
            return self._out.pop(micro_batch)

    return DeepSpeedExchange()


def step_until_done(engine, ctrl):
    """Step in lockstep with the other ranks until none has work: (step seconds, decode-only step
    seconds, ids of the finished requests) of this rank."""
    import torch.distributed as dist

    step_times, decode_step_s, finished = [], [], []
    last = None  # (step seconds, had prefill, had decodes) of the previous step on this rank
    while True:
        prefill = int(last is not None and last[1])
        decodes = int(last is not None and last[2])
        flags = torch.tensor([int(engine.scheduler.has_work()), prefill, decodes], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctrl)
        if last is not None and not flags[1] and flags[2]:
            decode_step_s.append(last[0])
        if not flags[0]:
            return step_times, decode_step_s, finished
        t0 = time.perf_counter()
        finished += [u.request_id for u in engine.step(lockstep=True) if u.finish_reason]
        step_s = time.perf_counter() - t0
        step_times.append(step_s)
        tokens, dec = engine.last_step
        last = (step_s, tokens != dec, dec > 0)


def run(args) -> int:
    import deepspeed
    import torch.distributed as dist

    from afsplit.batch import REQUEST_KEYS, read_requests
    from afsplit.config import load_config
    from afsplit.engine import DTYPES, LLMEngine, resolve_model
    from afsplit.runtime.timing import PhaseTimes
    from afsplit.runtime.stats import RunStats
    from afsplit.sampling_params import SamplingParams

    config = load_config(args.config, args.overrides)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = config.topology.device == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not cuda:  # DeepSpeed JIT-builds a shared-memory allreduce op for CPU (~80 s the first time); the MoE
        import deepspeed.comm.torch as ds_torch  # all-to-all does not use it

        ds_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    ctrl = dist.new_group(backend="gloo") if cuda else dist.group.WORLD  # flags and results travel on the CPU

    spec, source = resolve_model(config)
    dtype = DTYPES[config.model.dtype]
    times = PhaseTimes(device, sync=config.runtime.profile)
    layers = {}  # filled once the engine has loaded the attention weights (the routers live there)
    engine = LLMEngine(config, build_moe=lambda *_: make_exchange(layers, times), device=device, micro_batches=1,
                       spec_and_source=(spec, source))
    layers.update(build_moe_layers(spec, source, engine.model.w, engine.model.router_bias, dtype, device, rank, world))

    requests = [(r.fields, r.error) for r in read_requests(args.prompts_file, dict(max_tokens=32, temperature=1.0))]
    mine = [i for i, (req, err) in enumerate(requests) if req is not None and i % world == rank]
    prompts = {i: {"prompt_token_ids": requests[i][0]["prompt_token_ids"]} if "prompt_token_ids" in requests[i][0]
               else requests[i][0]["prompt"] for i in mine}
    if args.warmup:  # as `afsplit generate --warmup`: the same prompts for 3 tokens, then forget the timings
        from afsplit.cuda_graphs import warm_up_requests

        warm, warm_params = warm_up_requests(list(prompts.values()))
        for prompt in warm:
            try:
                engine.add_request(prompt, warm_params)
            except Exception:  # noqa: BLE001 -- a bad request fails (and is reported) in the real run
                pass
        step_until_done(engine, ctrl)
        times.take()
    dist.barrier(group=ctrl)
    seqs, added = {}, {}
    failed = {}
    for i in mine:
        req, prompt = requests[i][0], prompts[i]
        params = SamplingParams(**{k: req[k] for k in REQUEST_KEYS - {"prompt", "prompt_token_ids"} if k in req})
        try:
            seq = engine.add_request(prompt, params)
            seqs[seq.request_id], added[seq.request_id] = i, seq
        except Exception as e:  # RequestError: reported, the others run
            failed[i] = str(e)
    start = time.perf_counter()
    step_times, decode_step_s, finished = step_until_done(engine, ctrl)
    wall = time.perf_counter() - start
    moe_s = times.take().get("moe", 0.0)
    mine_out = [(seqs[r], engine.request_output(added[r]), added[r].latency_metrics()) for r in finished]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"out": mine_out, "failed": failed, "moe_s": moe_s, "busy_s": sum(step_times)},
                           group=ctrl)
    if rank == 0:
        stats = RunStats(world_size=world, num_moe_layers=spec.num_moe_layers)
        stats.ranks = {"attention": world, "expert": 0}
        stats.steps, stats.wall_s, stats.decode_step_s = len(step_times), wall, decode_step_s
        results = [{"error": err} for _, err in requests]
        for g in gathered:
            for i, out, lat in g["out"]:
                c = out.outputs[0]
                results[i] = {"prompt": out.prompt, "token_ids": c.token_ids, "text": c.text,
                              "finish_reason": c.finish_reason}
                stats.requests.append(lat)
                stats.generated_tokens += len(c.token_ids)
                stats.prompt_tokens += len(out.prompt_token_ids)
            for i, err in g["failed"].items():
                results[i] = {"error": err}
        total_moe = sum(g["moe_s"] for g in gathered)
        stats.phase_s = {"attention": {"moe": total_moe,
                                       "attention": max(0.0, sum(g["busy_s"] for g in gathered) - total_moe)},
                         "expert": {}}
        summary = stats.summary()
        log.info("run stats: %s", summary)
        if args.output:
            with open(args.output, "w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump({"config": args.config, "overrides": args.overrides, "mode": "deepspeed",
                           "deepspeed_version": deepspeed.__version__, "ep_size": world,
                           "gate": f"deepspeed TopKGate k={spec.top_k}, drop_tokens=False", **summary}, f, indent=1)
    dist.barrier(group=ctrl)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:  # started plainly: launch the ranks like `afsplit generate` does
        from afsplit.config import load_config
        from afsplit.engine import resolve_model
        from launch.local_cluster import launch_local_cluster

        config = load_config(args.config, args.overrides)
        resolve_model(config)
        return launch_local_cluster(config.topology.topology, [sys.executable, str(Path(__file__).resolve()), *argv],
                                    device=config.topology.device, out=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
