"""The `afsplit` command line.

    afsplit generate --config FILE [--set k=v ...] (--prompt TEXT | --prompts-file F.jsonl) [--output OUT.jsonl [--resume]]
    afsplit serve --config FILE [--set k=v ...] [--host H] [--port P] [--served-model-name N] [--max-waiting N]
    afsplit check-config FILE [--set k=v ...]
    afsplit make-tiny FAMILY DIR [--seed N] [--force]
    afsplit plan-experts --stats STATS.jsonl --topology CONFIG.yaml --out PLACEMENT.yaml
    afsplit profile --config FILE --out PROFILE.json
    afsplit plan --model PRESET_OR_DIR --profile PROFILE.json --gpus N --gpus-per-node G --tpot-ms 50 [--out CONFIG.yaml]
    afsplit plan validate --profile PROFILE.json DIR...

Errors caused by input are printed as one line (`afsplit: error: ...`) with exit status 2; a failed
run (a rank died, a peer went silent) is one line with exit status 1; `--debug` adds tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from afsplit.errors import AfsplitError, ConfigError

log = logging.getLogger("afsplit")

SWEEP_KEYS = {"base_config", "splits", "workload"}  # top-level keys of a sweep file (launch/sweep.py), not a config


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
    g.add_argument("--output", help="write results here as JSON lines, one per request as it finishes, with its "
                                    "index (default: print texts)")
    g.add_argument("--resume", action="store_true",
                   help="skip requests whose index is already in --output (rerun a job that stopped part way)")
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
    g.add_argument("--debug", action="store_true", help="show tracebacks with errors")

    from afsplit.server.serve import add_serve_parser

    add_serve_parser(sub)

    c = sub.add_parser("check-config", help="validate a config and print the rank -> node/role map")
    c.add_argument("config")
    _add_overrides(c)

    t = sub.add_parser("make-tiny", help="write a tiny random Hugging Face checkpoint")
    t.add_argument("family", help="qwen3_moe | qwen2_moe | mixtral | olmoe | deepseek_v2 | deepseek_v3")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DIR")

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
            return cmd_make_tiny(args)
    except AfsplitError as e:
        print(f"afsplit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afsplit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug or an environment problem: one line, traceback on request
        if getattr(args, "debug", False):
            raise
        print(f"afsplit: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cmd_make_tiny(args) -> int:
    from pathlib import Path

    from afsplit.models.tiny import make_tiny

    out = Path(args.out_dir)
    existing = [n for n in ("config.json", "model.safetensors", "model.safetensors.index.json") if (out / n).exists()]
    if existing and not args.force:
        raise AfsplitError(f"make-tiny: {out} already holds a checkpoint ({existing[0]}); "
                           "pass --force to overwrite it, or choose another directory")
    print(make_tiny(args.family, args.out_dir, seed=args.seed))
    return 0


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

    _refuse_sweep_file(args.config)
    config = load_config(args.config, args.overrides)
    spec = _model_spec(config)
    if spec is not None and config.balancer.replicas != "none":
        from afsplit.placement_file import resolve_placement

        topo = config.topology.topology
        if topo.world_size == 1:
            from afsplit.engine import replicas_need_ranks

            raise ConfigError(replicas_need_ranks(config))
        resolve_placement(config.balancer, spec.num_moe_layers, spec.num_experts, topo)
    print(f"{args.config}: OK")
    _print_model_summary(config, spec)
    print(config.topology.topology.describe())
    return 0


def _refuse_sweep_file(path: str) -> None:
    """A sweep file (launch/sweep.py) is not an engine config: say which checker it has."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # load_config reports these
    if isinstance(data, dict) and SWEEP_KEYS & data.keys():
        raise ConfigError(f"{path}: this is a sweep file (it has {sorted(SWEEP_KEYS & data.keys())[0]!r}), not an "
                          f"engine config; check it with: python3 launch/sweep.py {path} --dry-run")


def _model_spec(config):
    """The model's spec when it can be read without loading weights (checkpoint config.json or preset), else None."""
    from pathlib import Path

    from afsplit.engine import model_spec

    m = config.model
    path_ok = m.path and (Path(m.path) / "config.json").exists()
    return model_spec(config) if path_ok or (m.weights == "random" and m.preset) else None


def _print_model_summary(config, spec) -> None:
    m = config.model
    if spec is None:
        print(f"model: {m.path} (created on first use)" if m.tiny else f"model: {m.path} (not found yet)")
        return
    print(f"model: {spec.family}, {spec.num_layers} layers ({spec.num_moe_layers} MoE), hidden {spec.hidden_size}, "
          f"{spec.num_experts} experts top-{spec.top_k}, {spec.num_heads}/{spec.num_kv_heads} heads x {spec.head_dim}")


def cmd_generate(args, argv: list[str]) -> int:
    """Single process when the topology has one rank; otherwise one rank of the runtime under torchrun,
    or (started plainly) launch every rank on this host through the cluster simulation."""
    from afsplit.config import load_config

    config = load_config(args.config, args.overrides)
    topology = config.topology.topology
    under_torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if not under_torchrun:
        # everything that can be checked without a model, before any model is loaded or rank started
        _check_outputs(args)
        job = _batch_job(args, warn=topology.world_size == 1)  # with ranks, the coordinator warns
        if topology.world_size > 1:
            if not job.pending:
                return job.finish()
            return _launch_ranks(config, argv, args.debug)
        return _generate_single_process(args, config, job)
    return _generate_rank(args, config)


def _check_outputs(args) -> None:
    from afsplit.batch import check_writable

    if args.resume and not args.output:
        raise AfsplitError("--resume needs --output (the file whose finished requests are skipped)")
    for flag, path in (("--output", args.output), ("--stats-json", args.stats_json)):
        if path:
            check_writable(path, flag)


def _batch_job(args, warn: bool = True):
    from afsplit.batch import BatchJob

    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, ignore_eos=args.ignore_eos)
    return BatchJob(args, defaults, warn)


def _run_job(args, core, engine, job, warm_up) -> None:
    """Warm up (optional), then run the job's requests through `core`, streaming results to --output."""
    from afsplit.engine import run_to_completion

    prompts, params, labels, indices = job.engine_requests()
    if args.warmup and prompts:
        warm_up(prompts)
    job.open()
    try:
        run_to_completion(core, engine, prompts, params, use_tqdm=not args.no_progress, on_finished=job.on_finished,
                          labels=labels, indices=indices)
    finally:
        job.close()


def _generate_single_process(args, config, job) -> int:
    from afsplit.cuda_graphs import warm_up_requests
    from afsplit.engine import LLMEngine, MeasuredCore, run_to_completion

    engine = LLMEngine(config)
    core = MeasuredCore(engine)
    _run_job(args, core, engine, job,
             lambda prompts: run_to_completion(engine, engine, *warm_up_requests(prompts), use_tqdm=False))
    if engine.expert_stats is not None:
        engine.expert_stats.dump(config.balancer.stats_path)
    if args.stats_json:
        used = engine.kv.allocator.num_blocks - engine.kv.num_free_blocks
        _write_stats(args, core.stats.summary(), used)
    return job.finish()


def _write_stats(args, summary: dict, kv_blocks_in_use: int) -> None:
    with open(args.stats_json, "w", encoding="utf-8") as f:
        json.dump({"config": args.config, "overrides": args.overrides, **summary,
                   "kv_blocks_in_use_at_end": kv_blocks_in_use}, f, indent=1)


def _generate_rank(args, config) -> int:
    """One rank of the distributed runtime (under torchrun). A failure is one line naming this rank
    (or, when the cluster simulation started us, a report it reads: it prints the one line)."""
    from afsplit.runtime.worker import RankRuntime
    from comm.groups import leave_process

    rank = int(os.environ.get("RANK", "0"))
    runtime = None
    failed = True
    rc = 1
    profiler = _host_profiler()
    try:
        runtime = RankRuntime(config)
        if runtime.rank != runtime.coordinator:
            runtime.serve()
            rc = 0
        else:
            from launch.local_cluster import report_job_status

            rc = report_job_status(_coordinate(args, runtime))
        failed = False
    except BaseException as e:  # noqa: BLE001 -- reported as one line below
        from launch.local_cluster import report_rank_failure

        rc = 2 if isinstance(e, AfsplitError) else 130 if isinstance(e, KeyboardInterrupt) else 1
        report_rank_failure(config.topology.topology, rank, e, rc, debug=args.debug)
    finally:
        if profiler and runtime is not None:
            _dump_host_profile(profiler, runtime.rank)
        if runtime is not None:
            runtime.shutdown(abort=failed)
    # a rank process ends here, without the interpreter's teardown (comm.groups.leave_process says why; after a
    # failover the lost world's groups are kept, never torn down, so that teardown could also wait on them)
    leave_process(rc)


def _coordinate(args, runtime) -> int:
    """The coordinator's batch job; the other ranks follow in RankRuntime.serve."""
    try:
        _check_outputs(args)
        job = _batch_job(args)
    except AfsplitError:
        runtime.coord.stop()  # nothing ran yet: let the other ranks leave cleanly
        raise
    _run_job(args, runtime.coord, runtime.engine, job, runtime.warm_up)
    runtime.coord.stop()
    summary = runtime.stats.summary()
    log.info("run stats: %s", summary)
    if args.stats_json:
        coord = runtime.coord
        used = sum(runtime.engine.kv.allocator.num_blocks - coord.capacity[a] for a in coord.att)
        _write_stats(args, summary, used)
    return job.finish()


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


def _launch_ranks(config, argv: list[str], debug: bool) -> int:
    from afsplit.engine import resolve_model
    from launch.local_cluster import launch_local_cluster, visible_gpus

    topology = config.topology.topology
    if config.topology.device == "cuda":
        gpus = visible_gpus()
        if len(gpus) < topology.world_size:
            raise ConfigError(f"{config.source}: topology.device: cuda: the topology has {topology.world_size} ranks "
                              f"(one GPU each) but {len(gpus)} GPU(s) are visible; use topology.device: cpu or a "
                              "machine with more GPUs")
    resolve_model(config)  # write a tiny checkpoint once, before the ranks race to do it
    # one node's torchrun takes all its ranks down with it: failover has something to survive only across nodes
    failover = config.comm.failover and topology.num_nodes > 1
    return launch_local_cluster(topology, [sys.executable, "-m", "afsplit.cli", *argv],
                                device=config.topology.device, out=sys.stderr,
                                env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                                peer_timeout_s=config.comm.peer_timeout_s if failover else config.comm.timeout_s,
                                debug=debug, failover=failover)


if __name__ == "__main__":
    sys.exit(main())
