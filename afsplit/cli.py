"""The `afsplit` command line.

    afsplit generate --config FILE [--set k=v ...] (--prompt TEXT | --prompts-file F.jsonl) [--output OUT.jsonl]
    afsplit serve --config FILE [--set k=v ...] [--host H] [--port P] [--served-model-name N] [--max-waiting N]
    afsplit check-config FILE [--set k=v ...]
    afsplit make-tiny FAMILY DIR [--seed N]
    afsplit plan-experts --stats STATS.jsonl --topology CONFIG.yaml --out PLACEMENT.yaml
    afsplit profile --config FILE --out PROFILE.json
    afsplit plan --model PRESET_OR_DIR --profile PROFILE.json --gpus N --gpus-per-node G --tpot-ms 50 [--out CONFIG.yaml]
    afsplit plan validate --profile PROFILE.json DIR...

Errors caused by input are printed as one line (`afsplit: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from afsplit.errors import AfsplitError, RequestError

REQUEST_KEYS = {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                "stop_token_ids"}


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set runtime.max_num_seqs=8 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afsplit", description="Attention-FFN disaggregated MoE inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate completions for prompts")
    g.add_argument("--config", required=True, help="YAML config (see configs/)")
    _add_overrides(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts-file", help="JSON lines: {prompt | prompt_token_ids, max_tokens?, temperature?, ...}")
    g.add_argument("--output", help="write results as JSON lines here (default: print texts)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--stats-json", help="runtime: write the run's measurements (throughput, TPOT, time split) here")
    g.add_argument("--warmup", action="store_true",
                   help="first run the same prompts for 3 tokens each (compiles kernels, captures the CUDA graphs of "
                        "that batch size); measurements cover the real run only")

    from afsplit.server.serve import add_serve_parser

    add_serve_parser(sub)

    c = sub.add_parser("check-config", help="validate a config and print the rank -> node/role map")
    c.add_argument("config")
    _add_overrides(c)

    t = sub.add_parser("make-tiny", help="write a tiny random Hugging Face checkpoint")
    t.add_argument("family", help="qwen3_moe | qwen2_moe | mixtral | olmoe | deepseek_v2 | deepseek_v3")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)

    pe = sub.add_parser("plan-experts", help="plan expert replicas from recorded activation counts", add_help=False)
    pe.add_argument("rest", nargs=argparse.REMAINDER)
    for name, text in (("profile", "measure the deployment planner's building blocks (GPU)"),
                       ("plan", "size a deployment for a TPOT bound; `plan validate` checks the model")):
        sub.add_parser(name, help=text, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # under torchrun only rank 0 (normally the coordinator) narrates; the others speak up on warnings
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "plan-experts":
        return _plan_experts(argv[1:])
    if argv and argv[0] in ("plan", "profile"):
        return _planner(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args, argv)
        if args.command == "serve":
            from afsplit.server.serve import cmd_serve

            return cmd_serve(args, argv)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "make-tiny":
            from afsplit.models.tiny import make_tiny

            print(make_tiny(args.family, args.out_dir, seed=args.seed))
            return 0
    except AfsplitError as e:
        print(f"afsplit: error: {e}", file=sys.stderr)
        return 2
    return 1


def _plan_experts(argv: list[str]) -> int:
    try:
        from afsplit.placement_file import plan_experts_main
    except ImportError as e:
        print(f"afsplit: error: plan-experts is unavailable ({e})", file=sys.stderr)
        return 2
    try:
        return plan_experts_main(argv)
    except AfsplitError as e:
        print(f"afsplit: error: {e}", file=sys.stderr)
        return 2


def _planner(command: str, argv: list[str]) -> int:
    from afsplit.planner import cli as planner_cli

    try:
        return planner_cli.main(argv) if command == "plan" else planner_cli.profile_main(argv)
    except AfsplitError as e:
        print(f"afsplit: error: {e}", file=sys.stderr)
        return 2


def cmd_check_config(args) -> int:
    from afsplit.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: OK")
    _print_model_summary(config)
    print(config.topology.topology.describe())
    return 0


def _print_model_summary(config) -> None:
    from pathlib import Path

    from afsplit.engine import model_spec

    m = config.model
    if not (m.path and (Path(m.path) / "config.json").exists()) and not (m.weights == "random" and m.preset):
        print(f"model: {m.path} (created on first use)" if m.tiny else f"model: {m.path} (not found yet)")
        return
    spec = model_spec(config)
    print(f"model: {spec.family}, {spec.num_layers} layers ({spec.num_moe_layers} MoE), hidden {spec.hidden_size}, "
          f"{spec.num_experts} experts top-{spec.top_k}, {spec.num_heads}/{spec.num_kv_heads} heads x {spec.head_dim}")


def read_requests(path: str, defaults: dict) -> list[tuple[dict | None, str | None]]:
    """Parse a JSONL prompts file into (request, error) pairs: a malformed line fails alone."""
    out = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise RequestError(f"{path}: cannot read prompts file ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((None, f"{path}:{n}: malformed JSON ({e.msg}); each line must be one JSON object"))
            continue
        if not isinstance(obj, dict) or not ({"prompt", "prompt_token_ids"} & obj.keys()):
            out.append((None, f"{path}:{n}: expected an object with 'prompt' or 'prompt_token_ids'"))
            continue
        unknown = set(obj) - REQUEST_KEYS
        if unknown:
            out.append((None, f"{path}:{n}: unknown field(s) {sorted(unknown)}; valid: {sorted(REQUEST_KEYS)}"))
            continue
        out.append(({**defaults, **obj}, None))
    return out


def cmd_generate(args, argv: list[str]) -> int:
    """Single process when the topology has one rank; otherwise one rank of the runtime under torchrun,
    or (started plainly) launch every rank on this host through the cluster simulation."""
    from afsplit.config import load_config
    from afsplit.cuda_graphs import warm_up_requests

    config = load_config(args.config, args.overrides)
    topology = config.topology.topology
    under_torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if topology.world_size > 1 and not under_torchrun:
        return _launch_ranks(config, argv)
    requests = _read_cli_requests(args)
    prompts, params, index = _to_engine_requests(requests)
    if topology.world_size == 1 and not under_torchrun:
        from afsplit.engine import LLMEngine

        from afsplit.runtime.stats import RunStats

        engine = LLMEngine(config)
        if args.warmup:
            engine.generate(*warm_up_requests(prompts), use_tqdm=False)
        engine.run_stats = RunStats(world_size=1, num_moe_layers=engine.spec.num_moe_layers)
        outs = engine.generate(prompts, params, use_tqdm=not args.no_progress)
        if args.stats_json:
            _write_stats(args, engine.run_stats)
        return _write_results(args, requests, index, outs)
    from afsplit.runtime.worker import RankRuntime

    from comm.errors import CommError

    runtime = RankRuntime(config)
    profiler = _host_profiler()
    try:
        if runtime.rank != runtime.coordinator:
            runtime.serve()
            return 0
        if args.warmup:
            runtime.warm_up(prompts)
        outs = runtime.generate(prompts, params, use_tqdm=not args.no_progress)
        if args.stats_json:
            _write_stats(args, runtime.stats)
        return _write_results(args, requests, index, outs)
    except CommError as e:  # a peer died or went silent: one line naming it, no traceback
        print(f"afsplit: error: rank {runtime.rank}: {e}", file=sys.stderr)
        runtime.shutdown(abort=True)
        return 1
    finally:
        if profiler:
            _dump_host_profile(profiler, runtime.rank)
        runtime.shutdown()


def _write_stats(args, stats) -> None:
    """--stats-json: the run's measurements (throughput, TPOT, time split), with the command that made them."""
    with open(args.stats_json, "w", encoding="utf-8") as f:
        json.dump({"config": args.config, "overrides": args.overrides, **stats.summary()}, f, indent=1)


def _host_profiler():
    """AFSPLIT_HOST_PROFILE=DIR: profile this rank's host (Python) time with cProfile (diagnostics)."""
    if not os.environ.get("AFSPLIT_HOST_PROFILE"):
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _dump_host_profile(profiler, rank: int) -> None:
    import io
    import pstats

    profiler.disable()
    out_dir = os.environ["AFSPLIT_HOST_PROFILE"]
    os.makedirs(out_dir, exist_ok=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(text.getvalue())


def _launch_ranks(config, argv: list[str]) -> int:
    from afsplit.engine import resolve_model
    from launch.local_cluster import launch_local_cluster

    resolve_model(config)  # write a tiny checkpoint once, before the ranks race to do it
    return launch_local_cluster(config.topology.topology, [sys.executable, "-m", "afsplit.cli", *argv],
                                device=config.topology.device, out=sys.stderr,
                                env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _read_cli_requests(args) -> list[tuple[dict | None, str | None]]:
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, ignore_eos=args.ignore_eos)
    if args.prompt is not None:
        return [({**defaults, "prompt": args.prompt}, None)]
    return read_requests(args.prompts_file, defaults)


def _to_engine_requests(requests):
    from afsplit.sampling_params import SamplingParams

    prompts, params, index = [], [], []
    for i, (req, _) in enumerate(requests):
        if req is None:
            continue
        prompts.append({"prompt_token_ids": req["prompt_token_ids"]} if "prompt_token_ids" in req else req["prompt"])
        params.append(SamplingParams(**{k: req[k] for k in REQUEST_KEYS - {"prompt", "prompt_token_ids"} if k in req}))
        index.append(i)
    return prompts, params, index


def _write_results(args, requests, index, outs) -> int:
    results: list[dict] = [{"error": err} for _, err in requests]
    for i, out in zip(index, outs):
        if out.error:
            results[i] = {"error": out.error}
        else:
            c = out.outputs[0]
            results[i] = {"prompt": out.prompt, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            print(f"afsplit: error: {r['error']}", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    else:
        for r in results:
            if "text" in r:
                print(r["text"])
    return 1 if failed and failed == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
