"""torchrun for one simulated node, quiet: what launch/local_cluster.py starts per node.

    python -m launch.node_agent --nnodes 2 --node-rank 1 --nproc-per-node 2 ... --module afsplit.cli generate ...

It is exactly ``torchrun ARGS`` (same agent, same rendezvous, same rank numbering), except that a
failure is not printed as torchrun's ChildFailedError dump and agent log noise: the agent's
account of it (which global rank failed first, with which exit code or signal) is written to
``$AFSPLIT_JOB_DIR/node{k}.json`` for the cluster launcher, which prints the one error line. The
exit status is the first failed rank's (128 + N for signal N). ``AFSPLIT_DEBUG=1`` keeps torchrun's
own output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import traceback

JOB_DIR_ENV = "AFSPLIT_JOB_DIR"
DEBUG_ENV = "AFSPLIT_DEBUG"


def _node_rank(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a in ("--node-rank", "--node_rank") and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith(("--node-rank=", "--node_rank=")):
            return int(a.split("=", 1)[1])
    return 0


def _write(node: int, record: dict) -> None:
    job_dir = os.environ.get(JOB_DIR_ENV)
    if not job_dir:
        return
    tmp = os.path.join(job_dir, f".node{node}.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(job_dir, f"node{node}.json"))


def _status(exitcode: int) -> int:
    return exitcode if exitcode >= 0 else 128 - exitcode  # -9 (SIGKILL) -> 137


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    node = _node_rank(argv)
    debug = os.environ.get(DEBUG_ENV) == "1"
    saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
    if not debug:
        # libc10 reads this once, when torch loads: the agent's c10d warnings (a store peer gone at the exit
        # barrier, with a C++ stack dump) are not the job's error; the ranks keep the user's setting
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if saved is None:
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = saved
    if not debug:
        # the agent's warnings ("Sending process N closing signal SIGTERM", exit-barrier errors) are
        # consequences of a failure the launcher names in one line (set after torch configured its loggers)
        for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.raiseExceptions = False  # an agent stopped at its exit barrier: no "--- Logging error ---" dumps

    _short_exit_barrier()
    try:
        return _run_agent(torchrun, argv, node, debug)
    except SignalException as e:  # the launcher stopped this node: while torchrun ran, or while this agent was
        # still writing its account of a failure (the launcher stops every node once it has seen one; the
        # traceback of that interrupted handler, with the C++ frames of its exception chain, is not the error)
        return 128 + int(e.sigval)


def _run_agent(torchrun, argv: list[str], node: int, debug: bool) -> int:
    """torchrun itself; a failure becomes this node's report for the launcher (exit status as the rank's).
    A SignalException (the launcher stopping this node) goes to the caller, from wherever it comes."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(argv)
        return 0
    except SignalException:
        raise
    except ChildFailedError as e:
        first_rank, first = e.get_first_failure()
        failures = {str(rank): {"local_rank": f.local_rank, "exitcode": f.exitcode, "pid": f.pid,
                                "timestamp": f.timestamp} for rank, f in e.failures.items()}
        _write(node, {"failures": failures, "first": first_rank})
        _tell_survivors(argv, [int(r) for r in e.failures])
        if debug:
            traceback.print_exc()
        return _status(first.exitcode)
    except Exception as e:  # noqa: BLE001 -- the agent itself failed (rendezvous, store, bad arguments)
        text = str(e).strip()
        _write(node, {"error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")})
        if debug:
            traceback.print_exc()
        return 1


def _tell_survivors(argv: list[str], ranks: list[int]) -> None:
    """Mark these global ranks gone in the job's store (``afsplit/gone/<rank>``, comm/liveness.py): with
    failover the survivors then go on without waiting comm.peer_timeout_s for their heartbeats to go still."""
    def arg(name: str) -> str | None:
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    addr, port = arg("--master-addr") or arg("--master_addr"), arg("--master-port") or arg("--master_port")
    if not addr or not port:
        return
    try:
        socket.create_connection((addr, int(port)), timeout=1).close()
    except OSError:  # the store's host is gone too (its node stopped first): nobody is left to tell
        return
    try:
        from datetime import timedelta

        import torch.distributed as dist

        # c10d logs a failed connection attempt itself, at error level and with its C++ stack, before the
        # Python exception: if the store goes away between the probe and here, that is not the job's error
        with _stderr_silenced():
            store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=2),
                                  wait_for_workers=False)
            for r in ranks:
                store.set(f"afsplit/gone/{r}", "1")
    except Exception:  # noqa: BLE001 -- the store's host is gone too: nobody is left to tell
        pass


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ logging writes there directly, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


EXIT_BARRIER_ENV = "AFSPLIT_EXIT_BARRIER_S"


def _short_exit_barrier() -> None:
    """torchrun's agent waits up to 300 s at exit for every other node's agent (LocalElasticAgent's
    exit_barrier_timeout, no command-line flag): after a failover the dead node's agent never comes, so
    a survivor would linger 5 minutes after its job is done. Wait at most AFSPLIT_EXIT_BARRIER_S (10)."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    limit = float(os.environ.get(EXIT_BARRIER_ENV, "10"))
    original = SimpleElasticAgent._exit_barrier

    def barrier(self):
        self._exit_barrier_timeout = min(self._exit_barrier_timeout, limit)
        return original(self)

    SimpleElasticAgent._exit_barrier = barrier


if __name__ == "__main__":
    sys.exit(main())
