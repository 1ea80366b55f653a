"""Simulate a multi-node cluster on one host: one torchrun per simulated node.

    python -m launch.local_cluster --nodes 2A,2E -- my_script.py --flag
    python -m launch.local_cluster --config configs/af.yaml --device cuda -- -m afsplit.cli generate ...

Node syntax: comma-separated nodes, each ``<n>A`` (attention), ``<n>E`` (expert), ``<n>C``
(colocated) or a ``+`` of them (``1A+1E``); ``--config`` reads ``topology.nodes`` (and
``topology.device``) from a YAML file instead.

Each node k is started as the real multi-node launch would start it::

    torchrun --nnodes N --node-rank k --nproc-per-node G_k --master-addr 127.0.0.1 --master-port P <script|-m module> ...

(on a real cluster: the same line on every node with node 0's address), plus the simulation
variables: its own ``NCCL_HOSTID`` (so NCCL treats the simulated nodes as separate hosts and sends
inter-node traffic over its socket transport) and, with ``--device cuda``, its own
``CUDA_VISIBLE_DEVICES`` slice. ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1`` are always exported (NVLink multicast stays off).

torchrun accepts a different ``--nproc-per-node`` on each node (its agents sum the local world
sizes through the rendezvous store and number ranks node by node), which is exactly the
topology's rank order. Each node runs as ``python -m launch.node_agent ARGS`` (torchrun itself,
minus its failure dump).

Failures: the launcher watches every node and every rank process (found under the node agents in
/proc). When anything fails it stops the whole job within seconds -- ranks are killed directly, so a
stopped (SIGSTOP) rank cannot outlive its torchrun as an orphan -- and prints ONE line naming the
rank that failed first (global rank, role, node), worked out from the node agents' accounts (which
rank exited or was killed first), the ranks' own reports (``report_rank_failure``: a rank that saw
a peer vanish names it) and which rank processes are stopped. A rank stopped for longer than
``peer_timeout_s`` (comm.timeout_s) + 5 s fails the job even if its peers are idle. With
``timeout_s`` the launcher never outlives that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from comm.topology import NodeSpec, Topology

SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PREFIX = "[local_cluster]"
JOB_DIR_ENV = "AFSPLIT_JOB_DIR"  # where ranks and node agents leave their failure reports (see node_agent)
DEBUG_ENV = "AFSPLIT_DEBUG"
INTERRUPT_GRACE_S = 15.0  # Ctrl-C: how long the ranks get to stop in order before they are killed
GRACE_S = 2.0  # after the first failure, how long the other nodes get to exit (and report) on their own
EXIT_BARRIER_S = 3.0  # how long a node's torchrun waits for the others at exit here (AFSPLIT_EXIT_BARRIER_S)
STOPPED_EXTRA_S = 5.0  # a rank stopped this long past peer_timeout_s fails the job (its peers may be idle)
SCAN_EVERY_S = 0.5


def parse_nodes(spec: str) -> tuple[NodeSpec, ...]:
    """'2A,2E' -> two nodes; '1A+1E' is one node with both roles; '4C' four colocated ranks."""
    nodes = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        counts = {"A": 0, "E": 0, "C": 0}
        for item in part.split("+"):
            role, num = item[-1:].upper(), item[:-1] or "1"
            if role not in counts or not num.isdigit():
                raise ValueError(f"bad node spec {part!r} in {spec!r}: expected e.g. 2A, 3E, 1A+1E or 4C")
            counts[role] += int(num)
        nodes.append(NodeSpec(attention=counts["A"], expert=counts["E"], colocated=counts["C"]))
    if not nodes:
        raise ValueError(f"empty node spec {spec!r}")
    return tuple(nodes)


def nodes_from_config(path: str | os.PathLike) -> tuple[tuple[NodeSpec, ...], str | None]:
    """(topology.nodes, topology.device or None) of a YAML config file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    topo = (data.get("topology") or {}) if isinstance(data, dict) else {}
    nodes = topo.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise SystemExit(f"{path}: topology.nodes: expected a non-empty list of nodes, e.g. [{{attention: 2}}, {{expert: 2}}]")
    out = []
    for i, n in enumerate(nodes):
        try:
            out.append(NodeSpec(**(n or {})))
        except TypeError as e:
            raise SystemExit(f"{path}: topology.nodes[{i}]: {e}; valid keys: attention, expert, colocated") from None
    return tuple(out), topo.get("device")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_args(argv: list[str]) -> list[str]:
    """torchrun's program arguments for argv = [python, -m, mod, ...] | [-m, mod, ...] | [script.py, ...]."""
    argv = list(argv)
    if not argv:
        raise ValueError("local_cluster: nothing to run; give a script path or -m module after --")
    if argv[0] == sys.executable or Path(argv[0]).name.startswith("python"):
        argv = argv[1:]  # torchrun runs the program with its own interpreter (sys.executable here)
    if argv and argv[0] in ("-m", "--module"):
        if len(argv) < 2:
            raise ValueError("local_cluster: -m needs a module name")
        return ["--module", *argv[1:]]
    if not argv:
        raise ValueError("local_cluster: no script after the interpreter")
    return argv


def visible_gpus() -> list[str]:
    """The GPUs ranks may use (CUDA_VISIBLE_DEVICES, or every device torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _gpu_list(total: int) -> list[str]:
    devs = visible_gpus()
    if len(devs) < total:
        raise SystemExit(f"{PREFIX} the topology needs {total} GPUs (one per rank) but {len(devs)} are visible")
    return devs


def node_commands(topology: Topology, argv: list[str], device: str, master_port: int,
                  master_addr: str = "127.0.0.1") -> list[tuple[list[str], dict[str, str]]]:
    """[(torchrun argv, simulation env)] per node."""
    prog = script_args(argv)
    gpus = _gpu_list(topology.world_size) if device == "cuda" else []
    out, first = [], 0
    for k, spec in enumerate(topology.nodes):
        cmd = ["--nnodes", str(topology.num_nodes), "--node-rank", str(k), "--nproc-per-node", str(spec.nprocs),
               "--master-addr", master_addr, "--master-port", str(master_port), *prog]
        # AFSPLIT_LOCAL_CLUSTER marks ranks started here, so a program that self-launches (afsplit
        # generate) knows not to launch again
        sim = {"NCCL_HOSTID": f"afsplit-sim-node{k}", "AFSPLIT_LOCAL_CLUSTER": "1"}
        if device == "cuda":
            sim["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[first:first + spec.nprocs])
        first += spec.nprocs
        out.append((cmd, sim))
    return out


# ----------------------------------------------------------------------------------------------
# Rank failure reports (written by the ranks, read by the launcher)


_PEER_RE = re.compile(r"\brank (\d+) \((?:attention|expert|colocated)\)")


def _suspect(exc: BaseException, rank: int) -> int | None:
    """The peer a rank's error blames: CommError.peer, else the first 'rank N (role)' it names."""
    peer = getattr(exc, "peer", None)
    if isinstance(peer, int):
        return peer
    for m in _PEER_RE.finditer(str(exc)):
        if int(m.group(1)) != rank:
            return int(m.group(1))
    return None


def _one_line(exc: BaseException) -> str:
    from afsplit.errors import AfsplitError

    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, AfsplitError) or type(exc).__name__ == "CommError":
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def report_rank_failure(topology: Topology, rank: int, exc: BaseException, exit_code: int, debug: bool = False,
                        out=None) -> None:
    """A rank's failure as one line. Under this launcher (AFSPLIT_JOB_DIR set) the rank writes a report
    and stays quiet: the launcher prints the job's one line. Otherwise (plain torchrun) it prints
    ``afsplit: error: rank R (role, node N): ...`` itself; input errors (exit 2, the same on every
    rank) only on rank 0. `debug` adds the traceback."""
    out = out or sys.stderr
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=out)
    message = _one_line(exc)
    job_dir = os.environ.get(JOB_DIR_ENV)
    if job_dir and os.path.isdir(job_dir):
        record = {"rank": rank, "message": message, "suspect": _suspect(exc, rank), "exit_code": exit_code,
                  "time": time.time(), "explains": bool(getattr(exc, "explains_peer_death", False))}
        tmp = os.path.join(job_dir, f".rank{rank}.json")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(job_dir, f"rank{rank}.json"))
        return
    if exit_code == 2 and rank != 0:
        return
    where = "" if exit_code == 2 else f"{_rank_name(topology, rank)}: "
    print(f"afsplit: error: {where}{message}", file=out, flush=True)


def report_job_status(code: int) -> int:
    """The coordinator's job outcome (2: some requests failed as input errors). Under this launcher the
    rank exits 0 (it ran fine: torchrun must not treat it as a failure) and leaves the status for the
    launcher to return; under plain torchrun the rank returns it."""
    job_dir = os.environ.get(JOB_DIR_ENV)
    if not job_dir or not os.path.isdir(job_dir):
        return code
    with open(os.path.join(job_dir, "status.json"), "w", encoding="utf-8") as f:
        json.dump({"exit_code": code}, f)
    return 0


def _job_status(job_dir: str) -> int:
    try:
        with open(os.path.join(job_dir, "status.json"), encoding="utf-8") as f:
            return int(json.load(f)["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _rank_name(topology: Topology, rank: int) -> str:
    if 0 <= rank < topology.world_size:
        return f"rank {rank} ({topology.role_of(rank)}, node {topology.node_of(rank)})"
    return f"rank {rank}"


def _read_json_files(job_dir: str, prefix: str) -> dict[int, dict]:
    out = {}
    for name in os.listdir(job_dir):
        m = re.fullmatch(rf"{prefix}(\d+)\.json", name)
        if m:
            try:
                with open(os.path.join(job_dir, name), encoding="utf-8") as f:
                    out[int(m.group(1))] = json.load(f)
            except (OSError, ValueError):
                pass
    return out


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def explain_failure(topology: Topology, job_dir: str, stopped: set[int], failed_node: int, node_code: int,
                    peer_timeout_s: float | None) -> tuple[str, int]:
    """(the one error line, exit status) for a failed job: which rank failed first, and how.

    Evidence, strongest first: a rank process that is stopped; a rank that died (signal) or exited
    non-zero without a report, per its node agent (SIGTERM is the agent stopping the rest of its
    node after a failure, so it is not evidence); a rank's own error (not about a peer); the peer
    most often blamed by the ranks' reports; the agent's own failure; the first failed node.
    """
    reports = _read_json_files(job_dir, "rank")
    nodes = _read_json_files(job_dir, "node")
    blamed = Counter(r["suspect"] for r in reports.values() if r.get("suspect") is not None)
    if stopped:
        r = max(sorted(stopped), key=lambda q: blamed[q])
        after = f"its peers gave up after comm.timeout_s = {peer_timeout_s:g} s" if peer_timeout_s else "its peers gave up"
        return f"{_rank_name(topology, r)} is stopped (SIGSTOP?) and stopped answering; {after}; all ranks stopped", 1
    died = {}
    for k, node in sorted(nodes.items()):
        for rank_s, f in (node.get("failures") or {}).items():
            rank, code = int(rank_s), int(f.get("exitcode", 1))
            if rank not in reports and code != -signal.SIGTERM:
                died[rank] = (code, f.get("timestamp", 0), rank != node.get("first"))
    if died:
        r = min(died, key=lambda q: (-blamed[q], died[q][2], died[q][1], q))
        code = died[r][0]
        how = f"died ({_signal_name(code)})" if code < 0 else f"exited with code {code}"
        # a survivor's account of what the death cost (e.g. failover found experts with no replica left)
        extra = next((rep["message"] for rep in reports.values() if rep.get("explains")), "")
        return f"{_rank_name(topology, r)} {how}{'; ' + extra if extra else ''}; all ranks stopped", 1
    own = {r: rep for r, rep in reports.items() if rep.get("suspect") is None}
    if own:
        messages = {rep["message"] for rep in own.values()}
        # an input error (exit 2) explains the others' lost connections; then the earliest
        r = min(own, key=lambda q: (own[q].get("exit_code") != 2, own[q].get("time", 0), q))
        rep = own[r]
        if rep.get("exit_code") == 2 and len(messages) == 1:  # an input error every rank agrees on
            return rep["message"], 2
        return f"{_rank_name(topology, r)}: {rep['message']}", 2 if rep.get("exit_code") == 2 else 1
    if blamed:
        suspect, _ = blamed.most_common(1)[0]
        witness = min((q for q, rep in reports.items() if rep.get("suspect") == suspect),
                      key=lambda q: (reports[q].get("time", 0), q))
        return (f"{_rank_name(topology, suspect)} failed or stopped answering (rank {witness}: "
                f"{reports[witness]['message']}); all ranks stopped", 1)
    for k, node in sorted(nodes.items()):
        if node.get("error"):
            return f"node {k} (torchrun --node-rank {k}) failed: {node['error']}", 1
    return f"node {failed_node} (torchrun --node-rank {failed_node}) failed with exit code {node_code}", 1


# ----------------------------------------------------------------------------------------------
# Processes of the job


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, from /proc/PID/stat (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def proc_environ(pid: int) -> dict[bytes, bytes] | None:
    """The environment a live process started with (None if it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None


def processes_with_env(name: str, value: str) -> dict[int, dict[bytes, bytes]]:
    """pid -> environment of every live (not zombie) process whose environment has name=value:
    e.g. all processes of one job, which inherit a tag from the process that started it."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            env = proc_environ(int(entry))
            st = _proc_stat(int(entry)) if env and env.get(name.encode()) == value.encode() else None
            if st is not None and st[0] not in ("Z", "X"):
                out[int(entry)] = env
    return out


def _rank_of(pid: int, job_dir: str) -> int | None:
    env = proc_environ(pid)
    if env is None or env.get(JOB_DIR_ENV.encode()) != job_dir.encode() or b"RANK" not in env or b"LOCAL_RANK" not in env:
        return None
    try:
        return int(env[b"RANK"])
    except ValueError:
        return None


class JobProcesses:
    """Every process under the node agents (ranks and their children), remembered once seen, so that
    none survives the job even after its torchrun is gone."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir
        self.known: dict[int, int] = {}  # pid -> start time (guards against a reused pid)
        self.ranks: dict[int, int] = {}  # global rank -> pid

    def scan(self, roots: list[int]) -> None:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _proc_stat(int(name))
                if st is not None:
                    children.setdefault(st[1], []).append(int(name))
        todo = list(roots)
        while todo:
            for pid in children.get(todo.pop(), []):
                st = _proc_stat(pid)
                if st is None:
                    continue
                if pid not in self.known:
                    self.known[pid] = st[2]
                    rank = _rank_of(pid, self.job_dir)
                    if rank is not None:
                        self.ranks[rank] = pid
                todo.append(pid)

    def alive(self, pid: int) -> bool:
        st = _proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X") and st[2] == self.known.get(pid)

    def stopped_ranks(self) -> set[int]:
        out = set()
        for rank, pid in self.ranks.items():
            st = _proc_stat(pid)
            if st is not None and st[2] == self.known.get(pid) and st[0] in ("T", "t"):
                out.add(rank)
        return out

    def kill_all(self) -> None:
        for pid in list(self.known):
            if self.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)  # works on a stopped process too
                except ProcessLookupError:
                    pass

    def rank_processes_alive(self) -> bool:
        return any(self.alive(pid) for pid in self.ranks.values())

    def survivors(self) -> list[int]:
        return [pid for pid in self.known if self.alive(pid)]


def _kill(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _interrupt(procs: list[subprocess.Popen], grace_s: float = INTERRUPT_GRACE_S) -> None:
    """SIGTERM to every node (its torchrun agent and ranks), then wait up to grace_s for them to leave."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.05)


def _stop_job(procs: list[subprocess.Popen], jobs: JobProcesses) -> None:
    """Kill every rank directly, then the node agents; wait until nothing of the job is left."""
    jobs.scan([p.pid for p in procs])
    jobs.kill_all()
    for p in procs:
        _kill(p, grace_s=2.0)
    deadline = time.monotonic() + 5.0
    while jobs.survivors() and time.monotonic() < deadline:
        jobs.kill_all()
        time.sleep(0.05)


def launch_local_cluster(topology: Topology, argv: list[str], device: str = "cpu", master_port: int | None = None,
                         env: dict | None = None, timeout_s: float | None = None, out=None,
                         peer_timeout_s: float | None = None, debug: bool = False, failover: bool = False) -> int:
    """Run argv on every rank of `topology`, one torchrun per simulated node; return the exit code.

    argv: ``[sys.executable, "-m", "afsplit.cli", "generate", ...]``, ``["-m", "pkg.mod", ...]`` or
    ``["script.py", ...]``. env: extra variables for every rank. timeout_s: stop everything after that.
    peer_timeout_s: the job's comm.timeout_s (a rank stopped that long + 5 s fails the job). debug:
    keep torchrun's own failure output and the ranks' tracebacks. failover: the ranks survive the loss of
    others (comm.failover): a node other than the coordinator's (node of the first attention rank) may
    fail and the job goes on; a rank stopped past peer_timeout_s + 5 s is killed (fenced), not the job;
    the job ends when the coordinator's rank has exited and the survivors with it.
    Returns 0 when every node succeeded; on a failure (after printing its one line) 2 for an input
    error every rank reported, else 1; 124 on timeout.
    """
    out = out or sys.stdout
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not one of cpu, cuda")
    port = master_port or free_port()
    job_dir = tempfile.mkdtemp(prefix="afsplit-job-")
    base_env = dict(os.environ)
    base_env.update(env or {})
    base_env.update(SAFETY_ENV)
    base_env[JOB_DIR_ENV] = job_dir
    base_env.setdefault("AFSPLIT_EXIT_BARRIER_S", str(EXIT_BARRIER_S))
    if debug:
        base_env[DEBUG_ENV] = "1"
    procs: list[subprocess.Popen] = []
    jobs = JobProcesses(job_dir)
    cmds = node_commands(topology, argv, device, port)
    try:
        for k, (cmd, sim) in enumerate(cmds):
            sim_txt = " ".join(f"{n}={v}" for n, v in sim.items())
            print(f"{PREFIX} node {k}: torchrun {shlex.join(cmd)}    # simulation: {sim_txt}", file=out, flush=True)
            node_env = dict(base_env)
            node_env.update(sim)
            procs.append(subprocess.Popen([sys.executable, "-m", "launch.node_agent", *cmd], env=node_env,
                                          start_new_session=True, cwd=os.getcwd()))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stopped_since: dict[int, float] = {}
        next_scan = 0.0
        coordinator_node = topology.node_of(topology.attention_ranks[0])
        lost: set[int] = set()  # failover: nodes the job goes on without
        while True:
            now = time.monotonic()
            if now >= next_scan:
                jobs.scan([p.pid for p in procs])
                stopped = jobs.stopped_ranks()
                stopped_since = {r: stopped_since.get(r, now) for r in stopped}
                next_scan = now + SCAN_EVERY_S
            codes = [p.poll() for p in procs]
            failed = [(k, c) for k, c in enumerate(codes) if c not in (None, 0)]
            stuck = [r for r, t in stopped_since.items()
                     if peer_timeout_s is not None and now - t > peer_timeout_s + STOPPED_EXTRA_S]
            if failover:
                failed, stuck = _go_on_without(topology, jobs, failed, stuck, lost, coordinator_node, out)
                finished = os.path.exists(os.path.join(job_dir, "status.json"))  # the coordinator's job ended
                if finished and not jobs.rank_processes_alive():
                    # survivors' agents wait at torchrun's exit barrier for the lost node's (launch/node_agent.py
                    # shortens it to AFSPLIT_EXIT_BARRIER_S): let them leave on their own, then make sure
                    end = time.monotonic() + EXIT_BARRIER_S + GRACE_S
                    while time.monotonic() < end and any(p.poll() is None for p in procs):
                        time.sleep(0.1)
                    lost |= {k for k, p in enumerate(procs) if p.poll() not in (None, 0) and k != coordinator_node}
                    _stop_job(procs, jobs)
                    print(f"{PREFIX} the coordinator's node finished; node(s) {sorted(lost)} were lost on the way"
                          if lost else f"{PREFIX} all {len(procs)} nodes finished", file=out, flush=True)
                    return _job_status(job_dir)
            if failed or stuck:
                return _fail(topology, procs, jobs, job_dir, failed, peer_timeout_s, out)
            if all(c == 0 for c in codes):
                _stop_job(procs, jobs)  # nothing should be left; make sure
                print(f"{PREFIX} all {len(procs)} nodes finished", file=out, flush=True)
                return _job_status(job_dir)
            if deadline is not None and now > deadline:
                running = [k for k, c in enumerate(codes) if c is None]
                print(f"{PREFIX} timeout after {timeout_s} s; nodes {running} still running, stopping them",
                      file=out, flush=True)
                _stop_job(procs, jobs)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:  # Ctrl-C: let the ranks stop in order (a server drains), then clean up
        _interrupt(procs)
        raise
    finally:
        _stop_job(procs, jobs)
        shutil.rmtree(job_dir, ignore_errors=True)


def _go_on_without(topology: Topology, jobs: "JobProcesses", failed, stuck, lost: set[int], coordinator_node: int,
                   out) -> tuple[list, list]:
    """Failover: nodes other than the coordinator's that failed are noted once and left behind; a stopped rank
    there is killed (fenced: its peers already went on without it). What remains fails the job."""
    for r in stuck:
        if topology.node_of(r) != coordinator_node:
            pid = jobs.ranks.get(r)
            if pid is not None and jobs.alive(pid):
                print(f"{PREFIX} {_rank_name(topology, r)} is stopped past comm.peer_timeout_s: killing it "
                      "(the survivors went on without it)", file=out, flush=True)
                os.kill(pid, signal.SIGKILL)
                # its node is lost now, whenever its torchrun gets round to exiting (it may still be waiting at
                # the exit barrier when the coordinator's job ends: then its exit code would come too late)
                lost.add(topology.node_of(r))
    for k, code in failed:
        if k != coordinator_node and k not in lost:
            lost.add(k)
            print(f"{PREFIX} node {k} failed (exit code {code}); failover: the job goes on without it",
                  file=out, flush=True)
    return ([(k, c) for k, c in failed if k == coordinator_node],
            [r for r in stuck if topology.node_of(r) == coordinator_node])


def _fail(topology: Topology, procs, jobs: JobProcesses, job_dir: str, failed: list[tuple[int, int]],
          peer_timeout_s: float | None, out) -> int:
    """Stop the job and print its one error line."""
    stopped = jobs.stopped_ranks()
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(p.poll() is None for p in procs) and not stopped:
        time.sleep(0.05)  # the other nodes usually fail within milliseconds: let them leave their reports
    _stop_job(procs, jobs)
    k, code = failed[0] if failed else (topology.node_of(min(stopped or jobs.stopped_ranks() or {0})), 1)
    line, status = explain_failure(topology, job_dir, stopped, k, code, peer_timeout_s)
    print(f"afsplit: error: {line}", file=out, flush=True)
    return status


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if "--" in args:
        i = args.index("--")
        ours, prog = args[:i], args[i + 1:]
    else:
        ours, prog = args, []
    ap = argparse.ArgumentParser(prog="python -m launch.local_cluster",
                                 description="Simulate a multi-node afsplit cluster on this host (one torchrun per node).",
                                 epilog="example: python -m launch.local_cluster --nodes 2A,2E -- -m afsplit.cli generate ...")
    ap.add_argument("--nodes", help="e.g. '2A,2E' (attention node + expert node), '1A+1E,1A+1E', '4C,4C'")
    ap.add_argument("--config", help="YAML config whose topology.nodes to use")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--master-port", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None, help="stop all nodes after this many seconds")
    ap.add_argument("--peer-timeout", type=float, default=None,
                    help="a rank stopped this long (+5 s) fails the job (default: comm.timeout_s of --config)")
    ap.add_argument("--debug", action="store_true", help="keep torchrun's failure output and rank tracebacks")
    ns = ap.parse_args(ours)
    if not prog:
        ap.error("give the program after --: a script path or -m module, then its arguments")
    if bool(ns.nodes) == bool(ns.config):
        ap.error("give exactly one of --nodes and --config")
    device = ns.device
    peer_timeout = ns.peer_timeout
    if ns.config:
        nodes, cfg_device = nodes_from_config(ns.config)
        device = device or cfg_device
        peer_timeout = peer_timeout or _comm_timeout(ns.config)
    else:
        try:
            nodes = parse_nodes(ns.nodes)
        except ValueError as e:
            ap.error(str(e))
    return launch_local_cluster(Topology(nodes), prog, device=device or "cpu", master_port=ns.master_port,
                                timeout_s=ns.timeout, peer_timeout_s=peer_timeout, debug=ns.debug)


def _comm_timeout(path: str) -> float | None:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    value = ((data.get("comm") or {}) if isinstance(data, dict) else {}).get("timeout_s", 120.0)
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    sys.exit(main())
