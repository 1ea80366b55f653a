"""Single-GPU engine benchmark: decode step time against its weight + KV read floor, and TTFT.

    PYTHONUNBUFFERED=1 python3 launch/engine_bench.py --out $OUT/engine.json [--md $OUT/engine.md] \
        [--requests 64,256] [--input-len 512] [--output-len 128] [--no-warmup] [--set runtime.x=y ...]

Qwen3-30B-A3B shapes with random weights (model.preset qwen3-30b-a3b, weights random, routing
skewed Zipf(1.0) as in configs/qwen3-30b-a3b-*.yaml) in one process on one GPU (the LLMEngine,
CUDA graphs for decode as configured). For each request count N: N requests of `input-len` random
tokens, `output-len` new tokens each (greedy, or `--temperature T [--top-p P]` sampled on the device;
ignore_eos), all arriving at once; with warm-up (the
default) the same prompts first run for 3 tokens (compiles, captures the decode graph of that
batch), then the measured run.

Per decode step (every scheduled sequence decodes one token) the floor is the bytes the step has
to read at least, divided by the read ceiling measured in this process (kernels/bench.py's probe):
  * expert weights actually read: per MoE layer, the experts that got >= 1 token in that step
    (counted on the device by fused_moe's `expert_counts`, inside the graphs, no host sync) x
    3*H*I*dtype bytes;
  * attention-side weights: every tensor of the attention layers (QKV, O, norms, router, shared
    experts) + final norm + lm_head, and the embedding rows of the batch;
  * KV: sum over the batch of (context length) x layers x 2 x kv_heads x head_dim x dtype bytes.
Reported: median decode step time, floor / step (goal >= 0.93 at 64 requests), and mean TTFT
(request arrival to first token), TPOT and output throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

CONFIG_YAML = """\
model:
  weights: random
  preset: qwen3-30b-a3b
  dtype: bfloat16
  max_model_len: {max_model_len}
  routing_skew: 1.0
topology:
  device: cuda
  nodes:
    - {{colocated: 1}}
runtime:
  block_size: 16
  kv_cache_memory_gb: {kv_gb}
  max_num_seqs: {max_seqs}
  max_num_batched_tokens: 8192
  micro_batches: 1
"""


class ExpertHitCounter:
    """Per MoE layer, pairs routed to each expert, accumulated on the device by fused_moe.

    Installed by replacing `kernels.fused_moe` (what afsplit.ops calls) with a wrapper that passes
    the layer's row of one [layers, E] int64 buffer as `expert_counts`; the layer is told apart by
    its w13 tensor. Rows are handed out on first use, which is always an eager call (prefill runs
    eagerly before any decode graph is captured), so the graphs capture the accumulation too.
    """

    def __init__(self, num_layers: int, num_experts: int, device):
        import kernels

        self.kernels = kernels
        self.buf = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.rows: dict[int, int] = {}
        self.missed = 0
        self.orig = kernels.fused_moe
        self.engine = None  # the engine whose steps are counted (attach)
        self._read_hits: list[int] = []

        def counting(x, w13, w2, topk_ids, topk_weights, **kw):
            i = self.rows.get(w13.data_ptr())
            capturing = w13.is_cuda and torch.cuda.is_current_stream_capturing()
            if i is None and len(self.rows) < num_layers and not capturing:
                i = self.rows[w13.data_ptr()] = len(self.rows)
            if i is None:
                self.missed += 1
                return self.orig(x, w13, w2, topk_ids, topk_weights, **kw)
            return self.orig(x, w13, w2, topk_ids, topk_weights, expert_counts=self.buf[i], **kw)

        kernels.fused_moe = counting

    def attach(self, engine) -> None:
        """Count per launched step: a snapshot of the counts is copied out (without a sync) after each launch
        and read when the engine reads that step. With async scheduling the engine launches the next step
        before reading this one, so a copy taken after engine.step() would also count the step ahead (and a
        blocking one would wait for it, taking away the overlap being measured)."""
        if self.engine is engine:
            return
        self.remove_from_engine()
        self.engine = engine
        launch, read = engine._launch, engine._read
        self._last_snapshot = self._snapshot()
        self._read_hits = []

        def counted_launch(batch, feed=None):
            step = launch(batch, feed)
            step.hit_snapshots = (self._last_snapshot, self._snapshot())
            self._last_snapshot = step.hit_snapshots[1]
            return step

        def counted_read(step):
            before, after = step.hit_snapshots
            self._read_hits = ((after.get() - before.get()) > 0).sum(1).tolist()
            return read(step)

        engine._launch, engine._read = counted_launch, counted_read

    def remove_from_engine(self) -> None:
        if self.engine is not None:
            del self.engine._launch, self.engine._read  # the instance attributes: the class's methods again
            self.engine = None

    def _snapshot(self):
        from afsplit.transfers import HostCopy

        return HostCopy(self.buf)

    def step_hits(self) -> list[int]:
        """Experts with >= 1 token per layer in the step the engine read last."""
        return self._read_hits

    def remove(self) -> None:
        self.remove_from_engine()
        self.kernels.fused_moe = self.orig


def tensors_bytes(obj, seen: set) -> int:
    """Bytes of every distinct tensor reachable from obj (dataclasses, dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensors_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensors_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_bytes(v, seen) for v in obj)
    return 0


def attention_weight_bytes(w, batch: int) -> int:
    """Attention-side weights one decode step reads: the layers, final norm, lm_head, embedding rows."""
    seen: set = set()
    n = tensors_bytes(w.layers, seen) + tensors_bytes(w.final_norm, seen) + tensors_bytes(w.lm_head, seen)
    if (w.embed.data_ptr(), w.embed.numel()) not in seen:  # untied: only the batch's rows are read
        n += batch * w.embed.shape[1] * w.embed.element_size()
    return n


SAMPLING = {"temperature": 0.0, "top_p": 1.0}  # --temperature / --top-p: greedy unless asked (seeds derived)


def bench_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int):
    """(prompts, params) of n random prompts of input_len tokens, output_len new tokens each (ignore_eos;
    SAMPLING's temperature and top_p): what every run here generates (the same seed gives the same prompts)."""
    from afsplit.sampling_params import SamplingParams

    from launch.make_prompts import make_prompts

    prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in
               make_prompts(n, input_len, output_len, vocab_size, seed=seed)]
    return prompts, SamplingParams(**SAMPLING, max_tokens=output_len, ignore_eos=True)


def run_requests(engine, n: int, input_len: int, output_len: int, counter, read_GBps: float, log) -> dict:
    from afsplit.sequence import SeqStatus

    spec = engine.spec
    prompts, params = bench_requests(n, input_len, output_len, spec.vocab_size, seed=n)
    dt_bytes = torch.tensor([], dtype=engine.dtype).element_size()
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * dt_bytes
    expert_bytes = 3 * spec.hidden_size * spec.moe_intermediate_size * dt_bytes
    counter.attach(engine)
    _, seqs, _ = engine.admit(prompts, params)
    for s in seqs:
        engine.scheduler.add(s)
    steps = []
    attn_bytes = {}  # batch -> bytes (the walk over the weights is done once per batch size)
    t_start = time.time()
    while engine.has_unfinished_requests():
        # decoding: one token to compute, or none when it was launched ahead (async scheduling); then the context
        # counted is that of the step ahead, one token more per sequence than the step this call reads
        decoding = [s for s in seqs if s.status == SeqStatus.RUNNING and s.num_uncomputed <= 1]
        ctx = sum(s.num_tokens for s in decoding)
        t0 = time.perf_counter()
        engine.step()
        ms = (time.perf_counter() - t0) * 1e3
        tokens, decodes = engine.last_step
        hits = counter.step_hits()
        st = dict(tokens=tokens, decodes=decodes, ms=ms, experts_hit=sum(hits))
        if tokens == decodes == len(decoding) and tokens > 0:
            if tokens not in attn_bytes:
                attn_bytes[tokens] = attention_weight_bytes(engine.model.w, tokens)
            b = {"experts": sum(hits) * expert_bytes, "attention": attn_bytes[tokens], "kv": ctx * kv_per_token}
            st.update(batch=tokens, bytes=b, floor_ms=sum(b.values()) / (read_GBps * 1e9) * 1e3)
        steps.append(st)
    wall = time.time() - t_start
    dec = [s for s in steps if "floor_ms" in s]
    full = [s for s in dec if s["batch"] == n] or dec
    ttft = [1e3 * (s.token_times[0] - s.arrival_time) for s in seqs if s.token_times]
    tpot = [1e3 * (s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in seqs
            if len(s.token_times) > 1]
    res = dict(requests=n, input_len=input_len, output_len=output_len, wall_s=wall, steps=len(steps),
               decode_steps=len(dec), prefill_or_mixed_steps=len(steps) - len(dec),
               output_tokens=sum(len(s.output_token_ids) for s in seqs),
               mean_ttft_ms=statistics.mean(ttft) if ttft else None,
               median_ttft_ms=statistics.median(ttft) if ttft else None,
               mean_tpot_ms=statistics.mean(tpot) if tpot else None,
               missed_counter_calls=counter.missed)
    other = [s["ms"] for s in steps if "floor_ms" not in s]
    res["prefill_or_mixed_step_ms_mean"] = statistics.mean(other) if other else None
    res["tokens"] = [list(s.output_token_ids) for s in seqs]
    res["output_tok_per_s"] = res["output_tokens"] / wall
    if full:
        res.update(
            decode_step_ms_median=statistics.median(s["ms"] for s in full),
            decode_step_ms_mean=statistics.mean(s["ms"] for s in full),
            floor_ms_mean=statistics.mean(s["floor_ms"] for s in full),
            experts_hit_per_step_mean=statistics.mean(s["experts_hit"] for s in full),
            bytes_mean={k: statistics.mean(s["bytes"][k] for s in full) for k in ("experts", "attention", "kv")},
            full_batch_steps=len(full))
        res["floor_over_step"] = res["floor_ms_mean"] / res["decode_step_ms_median"]
        res["expert_weights_only_floor_ms"] = res["bytes_mean"]["experts"] / (read_GBps * 1e9) * 1e3
    res["per_step"] = steps
    log(fmt(res))
    return res


def warm_up(engine, n: int, input_len: int, output_len: int, vocab_size: int, prefill_ab: bool) -> None:
    """The measured run's own prompts and lengths, before it: every kernel shape, decode-graph bucket and
    piecewise-prefill bucket the run meets is compiled and captured here. Passes: prefill eager (when the
    A/B runs it), then twice with piecewise graphs (a token bucket is run eagerly the first time it is seen
    and captured the second). A 3-token warm-up (cuda_graphs.warm_up_requests) misses the shapes of the
    run's tail: the 2026-12-04 20:44 run spent 0.4-1.2 s in first-use compiles inside the measured steps."""
    prompts, params = bench_requests(n, input_len, output_len, vocab_size, seed=n)  # run_requests' prompts
    piecewise = engine.runner.piecewise
    passes = [piecewise] * (1 if piecewise is None else 2)
    if piecewise is not None and prefill_ab:
        passes.insert(0, None)
    try:
        for pw in passes:
            engine.runner.piecewise = pw
            engine.generate(prompts, params, use_tqdm=False)
    finally:
        engine.runner.piecewise = piecewise


def measure(engine, n, input_len, output_len, counter, read_GBps, log, prefill_ab: bool,
            async_ab: bool = False) -> dict:
    """run_requests with the engine as configured; with piecewise prefill graphs and `prefill_ab`, a
    baseline run with prefill and mixed steps eager first (same engine, same prompts), its TTFT and
    step times under "eager_prefill", the TTFT gain and whether the tokens are identical. With
    `async_ab` (and runtime.async_scheduling on), likewise a baseline that reads every step before
    launching the next, under "sync_decode"."""
    piecewise = engine.runner.piecewise
    sync = None
    if async_ab and engine.async_scheduling:
        engine.async_scheduling = False
        log("async scheduling off (baseline):")
        try:
            sync = run_requests(engine, n, input_len, output_len, counter, read_GBps, log)
        finally:
            engine.async_scheduling = True
        log("async scheduling on:")
    base = None
    if piecewise is not None and prefill_ab:
        engine.runner.piecewise = None
        log("prefill eager (baseline):")
        try:
            base = run_requests(engine, n, input_len, output_len, counter, read_GBps, log)
        finally:
            engine.runner.piecewise = piecewise
        log("prefill as piecewise CUDA graphs:")
    r = run_requests(engine, n, input_len, output_len, counter, read_GBps, log)
    if base is not None:
        e = r["eager_prefill"] = {k: base.get(k) for k in (
            "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "wall_s", "output_tok_per_s",
            "prefill_or_mixed_step_ms_mean", "decode_step_ms_median")}
        e["per_step_ms"] = [st["ms"] for st in base["per_step"]]
        r["mean_ttft_gain"] = base["mean_ttft_ms"] / r["mean_ttft_ms"]
        r["tokens_identical_to_eager_prefill"] = base["tokens"] == r["tokens"]
        log(f"mean TTFT {base['mean_ttft_ms']:.1f} ms eager prefill -> {r['mean_ttft_ms']:.1f} ms piecewise graphs "
            f"({r['mean_ttft_gain']:.2f}x); tokens identical: {r['tokens_identical_to_eager_prefill']}")
    if sync is not None and "decode_step_ms_median" in sync and "decode_step_ms_median" in r:
        r["sync_decode"] = {k: sync.get(k) for k in (
            "decode_step_ms_median", "floor_over_step", "mean_tpot_ms", "mean_ttft_ms", "output_tok_per_s", "wall_s")}
        r["decode_step_gain_vs_sync"] = sync["decode_step_ms_median"] / r["decode_step_ms_median"]
        r["tokens_identical_to_sync"] = sync["tokens"] == r["tokens"]
        log(f"decode step {sync['decode_step_ms_median']:.2f} ms reading every step -> {r['decode_step_ms_median']:.2f} "
            f"ms launching ahead ({r['decode_step_gain_vs_sync']:.3f}x); tokens identical: {r['tokens_identical_to_sync']}")
    r.pop("tokens")
    return r


def profile_steps(engine, n: int, input_len: int, path: str, log) -> None:
    """torch.profiler tables (CUDA time per kernel, top 30) of the prefill/mixed steps and of 8 full decode
    steps of n fresh requests, written to `path` (what limits a step: the answer the goals' misses need)."""
    from torch.profiler import ProfilerActivity, profile

    from afsplit.sequence import SeqStatus

    _, seqs, _ = engine.admit(*bench_requests(n, input_len, 16, engine.spec.vocab_size, seed=n + 1))
    for s in seqs:
        engine.scheduler.add(s)
    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = []

    def all_decoding():
        return all(s.status == SeqStatus.RUNNING and s.num_uncomputed <= 1 for s in seqs)

    for name, cond, limit in (("prefill/mixed steps", lambda: not all_decoding(), 64),
                              ("decode steps", all_decoding, 8)):
        with profile(activities=acts) as prof:
            k = 0
            t0 = time.perf_counter()
            while engine.has_unfinished_requests() and cond() and k < limit:
                engine.step()
                k += 1
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
        out.append(f"== {name}: {k} steps of {n} requests x {input_len} in, {ms:.1f} ms wall\n{table}\n")
        log(out[-1][:4000])
    while engine.has_unfinished_requests():
        engine.step()
    with open(path, "w") as f:
        f.write("\n".join(out))


def fmt(r: dict) -> str:
    if "decode_step_ms_median" not in r:
        return f"{r['requests']} requests: no full decode step measured"
    b = r["bytes_mean"]
    return (f"{r['requests']} x ({r['input_len']} in, {r['output_len']} out): decode step {r['decode_step_ms_median']:.2f} ms "
            f"(median of {r['full_batch_steps']}), floor {r['floor_ms_mean']:.2f} ms = {r['floor_over_step']:.3f} of the "
            f"step [experts {b['experts'] / 1e9:.2f} GB ({r['experts_hit_per_step_mean']:.0f} hit), attention weights "
            f"{b['attention'] / 1e9:.2f} GB, KV {b['kv'] / 1e9:.2f} GB]; mean TTFT {r['mean_ttft_ms']:.0f} ms, "
            f"TPOT {r['mean_tpot_ms']:.2f} ms, {r['output_tok_per_s']:.0f} tok/s")


def _ab_cells(r: dict) -> str:
    e = r.get("eager_prefill")
    if not e:
        return " | | |"
    return (f"{e['mean_ttft_ms']:.0f} | {r['mean_ttft_gain']:.2f}x | {r['prefill_or_mixed_step_ms_mean']:.1f} / "
            f"{e['prefill_or_mixed_step_ms_mean']:.1f} | {r['tokens_identical_to_eager_prefill']}")


def _async_cells(r: dict) -> str:
    e = r.get("sync_decode")
    if not e:
        return " | |"
    return f"{e['decode_step_ms_median']:.2f} | {r['decode_step_gain_vs_sync']:.3f}x | {r['tokens_identical_to_sync']}"


def markdown(res: dict) -> str:
    out = [f"Device {res.get('device')}, {res.get('date')}, commit {res.get('commit')}; read ceiling "
           f"{res.get('read_GBps', 0):.0f} GB/s ({res.get('read_probe')}); config: {res.get('config_summary')}.", "",
           "| requests x (in, out) | decode step (ms, median) | floor (ms) | floor / step | experts hit / step | "
           "experts GB | attn weights GB | KV GB | mean TTFT (ms) | TPOT (ms) | output tok/s | "
           "mean TTFT, prefill eager (ms) | TTFT gain | prefill/mixed step ms (graphs / eager) | tokens identical | "
           "decode step, each step read before the next (ms) | async scheduling gain | tokens identical |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("runs", []):
        if "decode_step_ms_median" not in r:
            out.append(f"| {r.get('requests')} | {r.get('error', 'no decode step')} | | | | | | | | | |")
            continue
        b = r["bytes_mean"]
        out.append(f"| {r['requests']} x ({r['input_len']}, {r['output_len']}) | {r['decode_step_ms_median']:.2f} | "
                   f"{r['floor_ms_mean']:.2f} | {r['floor_over_step']:.3f} | {r['experts_hit_per_step_mean']:.0f} | "
                   f"{b['experts'] / 1e9:.2f} | {b['attention'] / 1e9:.2f} | {b['kv'] / 1e9:.2f} | "
                   f"{r['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.2f} | {r['output_tok_per_s']:.0f} | "
                   + _ab_cells(r) + " | " + _async_cells(r) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results (rewritten after every request count)")
    ap.add_argument("--md", help="also write a markdown table here")
    ap.add_argument("--requests", default="64,256", help="comma-separated request counts, run in this order")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-gb", type=float, default=20.0)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (on the device) instead of greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--no-prefill-ab", dest="prefill_ab", action="store_false",
                    help="skip the baseline run with prefill and mixed steps eager (default: run it first, same engine)")
    ap.add_argument("--no-async-ab", dest="async_ab", action="store_false",
                    help="skip the baseline run that reads every step before launching the next (default: run it)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the runs, torch.profiler tables of N requests' prefill and decode steps "
                         "(written beside --out as profile-N.txt)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override (repeatable), e.g. --set runtime.cuda_graphs=false")
    args = ap.parse_args()
    logging_setup()

    def log(s):
        print(s, flush=True)

    from afsplit.config import load_config
    from afsplit.engine import LLMEngine

    from kernels.bench import READ_PROBE, read_ceiling_GBps, run_info, save_results

    counts = [int(c) for c in args.requests.split(",") if c.strip()]
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p)
    res = dict(run_info(), kind="engine_bench", requests=counts, warmup=args.warmup, overrides=args.overrides,
               sampling=dict(SAMPLING),
               tuning_table=os.environ.get("AFSPLIT_KERNEL_TUNING") or None, runs=[])

    def save():
        save_results(res, args.out, args.md, markdown)

    res["read_GBps"] = read_ceiling_GBps()
    res["read_probe"] = READ_PROBE
    log(f"read ceiling {res['read_GBps']:.0f} GB/s ({READ_PROBE})")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG_YAML.format(max_model_len=args.max_model_len, kv_gb=args.kv_gb, max_seqs=max(counts)))
        cfg_path = f.name
    config = load_config(cfg_path, args.overrides)
    os.unlink(cfg_path)
    res["config"] = config.to_dict()
    res["config_summary"] = (f"qwen3-30b-a3b random weights (routing_skew 1.0), bf16, 1 GPU, "
                             f"cuda_graphs={config.runtime.cuda_graphs}, micro_batches={config.runtime.micro_batches}, "
                             f"prefill_graphs={config.runtime.prefill_graphs}, async_scheduling={config.runtime.async_scheduling}, "
                             f"max_model_len={config.model.max_model_len}, warm-up={'on' if args.warmup else 'off'}")
    t0 = time.time()
    # the warm start waits until the expert counter wraps fused_moe: graphs captured before would not count
    engine = LLMEngine(dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, capture_at_start=False)))
    res["engine_build_s"] = time.time() - t0
    spec = engine.spec
    counter = ExpertHitCounter(spec.num_moe_layers, spec.num_experts, engine.device)
    if config.runtime.capture_at_start and engine.start_warm() is not None:
        res["warm_start"] = dataclasses.asdict(engine.warm_start)
        log(f"warm start: {engine.warm_start.seconds:.1f} s (decode buckets {engine.warm_start.decode_buckets}, "
            f"{len(engine.warm_start.prefill_buckets)} prefill token buckets, left {engine.warm_start.skipped_prefill})")
    piecewise = engine.runner.piecewise
    res["prefill_graphs"] = piecewise is not None
    save()
    try:
        for n in counts:
            run = dict(requests=n)
            try:
                if args.warmup:
                    t1 = time.time()
                    warm_up(engine, n, args.input_len, args.output_len, spec.vocab_size, args.prefill_ab)
                    run["warmup_s"] = time.time() - t1
                run.update(measure(engine, n, args.input_len, args.output_len, counter, res["read_GBps"], log,
                                   args.prefill_ab, args.async_ab))
            except Exception as e:  # noqa: BLE001
                import traceback

                run["error"] = repr(e)[:300]
                run["traceback"] = traceback.format_exc()[-2000:]
                log(f"{n} requests FAILED: {run['traceback']}")
            res["runs"].append(run)
            save()
        if args.profile:
            profile_steps(engine, args.profile, args.input_len,
                          os.path.join(os.path.dirname(os.path.abspath(args.out)), f"profile-{args.profile}.txt"), log)
    finally:
        counter.remove()
    print(markdown(res))
    res["date_end"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save()


def logging_setup():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
