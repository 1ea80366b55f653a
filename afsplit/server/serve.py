"""`afsplit serve`: the engine (or this rank of the cluster) behind the HTTP server.

* one rank, started plainly: the single-process engine serves;
* several ranks, started plainly: launch them on this host as `afsplit generate` does (one torchrun
  per node); Ctrl-C or SIGTERM to this launcher stops them all;
* under torchrun: the coordinator rank serves HTTP; the other ranks follow its plans and leave
  when it stops (they ignore SIGINT/SIGTERM themselves: the coordinator ends them in order).

The HTTP socket is bound before the model loads, so a busy port fails at once. On SIGINT/SIGTERM the
server stops accepting, lets running requests finish for up to ``DRAIN_S`` seconds, aborts the rest,
stops the other ranks and exits 0. A failed engine step (a rank died) ends it with one line naming
the rank and exit status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from afsplit.errors import ConfigError

log = logging.getLogger("afsplit.server")

DRAIN_S = 2.0  # short: a launcher gives a rank about 5 s between SIGTERM and SIGKILL


def add_serve_parser(sub) -> None:
    from afsplit.cli import _add_overrides

    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (completions, chat, metrics)")
    s.add_argument("--config", required=True, help="YAML config (see configs/)")
    _add_overrides(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name or the preset)")
    s.add_argument("--max-waiting", type=int, default=2048,
                   help="answer 429 while this many requests wait to run (0 = no limit)")


def cmd_serve(args, argv: list[str]) -> int:
    from afsplit.config import load_config

    config = load_config(args.config, args.overrides)
    if args.max_waiting < 0:
        raise ConfigError(f"--max-waiting: expected a number >= 0, got {args.max_waiting}")
    topology = config.topology.topology
    under_torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if topology.world_size > 1 and not under_torchrun:
        return _launch(config, argv, getattr(args, "debug", False))
    if not under_torchrun:
        from afsplit.engine import LLMEngine
        from afsplit.server.engine_core import LocalCore

        sock = _bind(args.host, args.port)
        return _serve_http(LocalCore(LLMEngine(config)), config, args, sock)
    return _serve_rank(config, args, topology)


def _launch(config, argv: list[str], debug: bool = False) -> int:
    from afsplit.cli import _launch_ranks

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the ranks like Ctrl-C
    try:
        return _launch_ranks(config, argv, debug)
    except KeyboardInterrupt:  # the launcher has stopped every rank on the way out
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_rank(config, args, topology) -> int:
    """One rank of a served cluster. A failure becomes the job's one error line, naming the rank that failed
    first (launch/local_cluster.py works it out from every rank's report), as for `afsplit generate`."""
    from afsplit.errors import AfsplitError
    from afsplit.runtime.worker import RankRuntime
    from afsplit.server.engine_core import ClusterCore
    from comm.groups import leave_process
    from launch.local_cluster import report_rank_failure

    rank = int(os.environ.get("RANK", "0"))
    coordinator = rank == topology.attention_ranks[0]
    sock = _bind(args.host, args.port) if coordinator else None
    if not coordinator:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    runtime = None
    failed = True
    try:
        runtime = RankRuntime(config)
        if not coordinator:
            runtime.serve()
            code = 0
        else:
            code = _serve_http(ClusterCore(runtime), config, args, sock)
        failed = code != 0
    except BaseException as e:  # noqa: BLE001 -- a dead or silent peer (CommError names it), or a start-up error
        code = 2 if isinstance(e, AfsplitError) else 130 if isinstance(e, KeyboardInterrupt) else 1
        report_rank_failure(topology, rank, e, code, debug=getattr(args, "debug", False))
    finally:
        if runtime is not None:
            runtime.shutdown(abort=failed)
    leave_process(code)  # without the interpreter's teardown (comm.groups.leave_process says why)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another port") from None


def served_model_name(config, name: str | None) -> str:
    if name:
        return name
    m = config.model
    return Path(m.path).name if m.path else (m.preset or "afsplit")


def _serve_http(core, config, args, sock: socket.socket) -> int:
    import uvicorn

    from afsplit.server.app import ServerState, build_app
    from afsplit.server.chat_template import load_chat_template
    from afsplit.server.engine_loop import EngineLoop
    from afsplit.server.metrics import ServerMetrics

    name = served_model_name(config, args.served_model_name)
    metrics = ServerMetrics(name, exchanges=core.exchanges)
    server: uvicorn.Server | None = None
    fatal: list[str] = []

    def on_fatal(message: str) -> None:  # runs on the event loop
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    loop = EngineLoop(core, metrics, max_waiting=args.max_waiting,
                      keepalive_s=min(5.0, config.comm.timeout_s / 4), on_fatal=on_fatal)
    state = ServerState(loop, metrics, name, config.model.path, core.engine.tokenizer,
                        load_chat_template(config.model.path))
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="info", access_log=False,
                                           timeout_graceful_shutdown=DRAIN_S, lifespan="on"))
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d (max_model_len %d)", name, host, port, loop.max_model_len)
    # uvicorn re-raises the signal that stopped it once it is done; let that land on a no-op
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if loop.thread is not None and loop.thread.is_alive():
            loop.stop()  # uvicorn failed before its lifespan shutdown
    if loop.fatal_error is not None and core.exchanges:  # a cluster: _serve_rank reports it for the launcher
        raise loop.fatal_error
    if fatal or loop.fatal:
        print(f"afsplit: error: {(fatal or [loop.fatal])[0]}", file=sys.stderr)
        return 1
    log.info("server stopped")
    return 0
