"""`moe_align` on the GPU: the one-launch path (`_moe_align_one_kernel`) against the two-launch path
(`_moe_count_kernel` + `_moe_place_kernel`), exact check against `moe_align_ref`, then per-call time
of each inside a CUDA graph (kernels/bench.py's `time_graph`, 4 rotated id sets).

    python3 launch/moe_align_bench.py --out DIR       # H200, < 60 s: DIR/moe_align_bench.json
    python3 launch/moe_align_bench.py --aot           # no GPU needed: sm_90 registers / spills / smem

--aot compiles the very launches `moe_align` makes (kernels.fused_moe._align_launches on CPU tensors
of each shape, specialised as the JIT would on the GPU) for sm_90 with Triton's bundled ptxas and
prints one JSON line per kernel: registers, stack frame, spill store/load bytes (ptxas -v), LDL /
STL counts in the SASS, static shared memory and Triton's shared-memory size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if "--aot" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

# (E, K, T, BLOCK_M): Qwen3-30B-A3B decode / mid / prefill, Mixtral decode / prefill
SHAPES = [(128, 8, 16, 16), (128, 8, 64, 16), (128, 8, 256, 16), (128, 8, 512, 16), (128, 8, 8192, 64),
          (8, 2, 64, 16), (8, 2, 8192, 128)]
IMPLS = ("one", "two")


def _ids(E, K, T, device, seed):
    """Top-K of random scores: K distinct experts per token, int32 (as topk_gating gives them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(T, E, device=device, generator=g).topk(K, dim=-1).indices.to(torch.int32)


def impls_for(N: int):
    """The paths that take N pairs (the one-launch kernel holds all ids of a program in registers)."""
    from kernels.fused_moe import ALIGN_ONE_LIMIT

    return [i for i in IMPLS if i == "two" or N <= ALIGN_ONE_LIMIT]


# ----------------------------------------------------------------------------- ahead of time (sm_90)

def compile_sm90(kernel, args, kwargs):
    """Compile one launch (kernel[grid](*args, **kwargs)) for sm_90 without a GPU: the JIT's own binder
    gives the signature, constexprs and divisibility specialisation from the (CPU) arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(k) -> dict:
    """Registers, stack, spills, local loads / stores and shared memory of a compiled kernel."""
    from kernels.mla_aot import _BIN, dump_cubin  # Triton's bundled ptxas / cuobjdump

    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        try:  # the ptxas Triton itself runs for sm_90 (3.9+ takes the newer of its two)
            from triton.backends.nvidia.compiler import get_ptxas

            ptxas = get_ptxas(90).path
        except Exception:  # noqa: BLE001
            ptxas = os.path.join(_BIN, "ptxas")
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o",
                              os.path.join(d, "v.cubin")], capture_output=True, text=True).stderr
    usage, sass = dump_cubin(k.asm["cubin"])

    def field(pat, text):
        m = re.search(pat, text)
        return int(m.group(1)) if m else None

    return dict(regs=field(r"REG:(\d+)", usage), stack=field(r"STACK:(\d+)", usage),
                spill_st=field(r"(\d+) bytes spill stores", log), spill_ld=field(r"(\d+) bytes spill loads", log),
                ldl=len(re.findall(r"\bLDL\b", sass)), stl=len(re.findall(r"\bSTL\b", sass)),
                shared_static=field(r"SHARED:(\d+)", usage), smem=k.metadata.shared, num_warps=k.metadata.num_warps)


def aot_rows(shapes=SHAPES, impls=IMPLS, log=print):
    fm = importlib.import_module("kernels.fused_moe")  # (kernels.fused_moe the attribute is the function)

    rows = []
    for E, K, T, bm in shapes:
        N = T * K
        ids = _ids(E, K, T, "cpu", 0)
        mp = fm._max_padded(N, E, bm)
        outs = (torch.empty(mp, dtype=torch.int32), torch.empty(mp // bm, dtype=torch.int32),
                torch.empty(E, dtype=torch.int64))
        for impl in impls:
            if impl not in impls_for(N):
                continue
            for kernel, grid, args, kwargs in fm._align_launches(ids, E, bm, *outs, torch.zeros(E, dtype=torch.int64),
                                                                 impl):
                row = dict(E=E, K=K, T=T, N=N, BLOCK_M=bm, impl=impl, kernel=kernel.__name__, grid=list(grid),
                           constexprs={k: v for k, v in kwargs.items() if k != "num_warps"})
                try:
                    row.update(resource_usage(compile_sm90(kernel, args, kwargs)))
                except Exception as e:  # noqa: BLE001 -- report and go on
                    row["error"] = str(e).splitlines()[0][:300]
                log(json.dumps(row))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- GPU timing

def bench_shape(E, K, T, bm, n_sets=4) -> dict:
    from kernels.bench import time_graph
    from kernels.fused_moe import ALIGN_ONE_MAX_N, moe_align, moe_align_ref

    N = T * K
    sets = [_ids(E, K, T, "cuda", s) for s in range(n_sets)]
    row = dict(E=E, K=K, T=T, N=N, BLOCK_M=bm, default="one" if N <= ALIGN_ONE_MAX_N else "two")
    g = torch.Generator(device="cuda").manual_seed(99)
    strided = torch.randint(-1, E + 1, (T, K + 3), device="cuda", generator=g, dtype=torch.int32)[:, 1:K + 1]
    for impl in impls_for(N):
        ok = True
        for ids in sets + [strided]:  # (one compile per path: same K, no expert_counts; the tests cover the rest)
            got = moe_align(ids, E, bm, _impl=impl)
            ok &= all(torch.equal(g_, w_) for g_, w_ in zip(got, moe_align_ref(ids, E, bm)))
        row[f"{impl}_exact"] = bool(ok)
        row[f"{impl}_us"] = time_graph(lambda i, impl=impl: moe_align(sets[i], E, bm, _impl=impl), n_sets=n_sets) * 1e6
    row["ref_us"] = time_graph(lambda i: moe_align_ref(sets[i], E, bm), n_sets=n_sets) * 1e6
    if "one_us" in row:
        row["two_over_one"] = row["two_us"] / row["one_us"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for moe_align_bench.json (GPU timing)")
    ap.add_argument("--aot", action="store_true", help="sm_90 resource usage of the kernels, no GPU needed")
    a = ap.parse_args(argv)
    if a.aot:
        rows = aot_rows()
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "moe_align_aot.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return 0 if all("error" not in r for r in rows) else 1
    if not torch.cuda.is_available():
        print("no CUDA device (use --aot on a machine without a GPU)", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for shape in SHAPES:
        try:
            row = bench_shape(*shape)
        except Exception as e:  # noqa: BLE001 -- report and go on
            row = dict(zip(("E", "K", "T", "BLOCK_M"), shape), error=repr(e)[:300])
        print(json.dumps(row), flush=True)
        rows.append(row)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, seconds=time.time() - t0, rows=rows)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "moe_align_bench.json"), "w") as f:
            json.dump(res, f, indent=1)
    bad = [r for r in rows if "error" in r or not all(v for k, v in r.items() if k.endswith("_exact"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
