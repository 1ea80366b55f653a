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
topology's rank order. The launcher watches all nodes: when one fails it stops the others and
returns that node's exit code, naming the node; with ``timeout_s`` it never outlives that.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from comm.topology import NodeSpec, Topology

SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PREFIX = "[local_cluster]"


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


def _gpu_list(total: int) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devs = [d for d in visible.split(",") if d.strip()]
    else:
        import torch

        devs = [str(i) for i in range(torch.cuda.device_count())]
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


def launch_local_cluster(topology: Topology, argv: list[str], device: str = "cpu", master_port: int | None = None,
                         env: dict | None = None, timeout_s: float | None = None, out=None) -> int:
    """Run argv on every rank of `topology`, one torchrun per simulated node; return the exit code.

    argv: ``[sys.executable, "-m", "afsplit.cli", "generate", ...]``, ``["-m", "pkg.mod", ...]`` or
    ``["script.py", ...]``. env: extra variables for every rank. timeout_s: stop everything after that.
    Returns 0 when every node succeeded, else the first failing node's exit code (124 on timeout).
    """
    out = out or sys.stdout
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not one of cpu, cuda")
    port = master_port or free_port()
    base_env = dict(os.environ)
    base_env.update(env or {})
    base_env.update(SAFETY_ENV)
    procs: list[subprocess.Popen] = []
    cmds = node_commands(topology, argv, device, port)
    try:
        for k, (cmd, sim) in enumerate(cmds):
            sim_txt = " ".join(f"{n}={v}" for n, v in sim.items())
            print(f"{PREFIX} node {k}: torchrun {shlex.join(cmd)}    # simulation: {sim_txt}", file=out, flush=True)
            node_env = dict(base_env)
            node_env.update(sim)
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *cmd], env=node_env,
                                          start_new_session=True))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [(k, c) for k, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                k, code = failed[0]
                also = "".join(f"; node {j} also failed (exit code {c})" for j, c in failed[1:])
                print(f"{PREFIX} node {k} (torchrun --node-rank {k}) failed with exit code {code}{also}; "
                      f"stopping the other nodes", file=out, flush=True)
                for p in procs:
                    _kill(p)
                return code if code > 0 else 128 - code  # negative: killed by signal -code
            if all(c == 0 for c in codes):
                print(f"{PREFIX} all {len(procs)} nodes finished", file=out, flush=True)
                return 0
            if deadline is not None and time.monotonic() > deadline:
                running = [k for k, c in enumerate(codes) if c is None]
                print(f"{PREFIX} timeout after {timeout_s} s; nodes {running} still running, stopping them",
                      file=out, flush=True)
                for p in procs:
                    _kill(p)
                return 124
            time.sleep(0.1)
    finally:
        for p in procs:
            _kill(p)


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
    ns = ap.parse_args(ours)
    if not prog:
        ap.error("give the program after --: a script path or -m module, then its arguments")
    if bool(ns.nodes) == bool(ns.config):
        ap.error("give exactly one of --nodes and --config")
    device = ns.device
    if ns.config:
        nodes, cfg_device = nodes_from_config(ns.config)
        device = device or cfg_device
    else:
        try:
            nodes = parse_nodes(ns.nodes)
        except ValueError as e:
            ap.error(str(e))
    return launch_local_cluster(Topology(nodes), prog, device=device or "cpu", master_port=ns.master_port,
                                timeout_s=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
