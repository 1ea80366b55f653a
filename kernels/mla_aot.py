"""Compile the paged MLA decode kernel ahead of time for sm_90 on a machine without a GPU and print what
each tile config costs: registers, spills (stack bytes, LDL count), shared memory, HGMMA / HMMA and cp.async
(LDGSTS) counts. Used to pick the sweep's candidates before spending device time (kernels/NOTES.md).

    python -m kernels.mla_aot '[[16, 32, 4, 3, {"PREFETCH": true}], [64, 64, 8, 2]]'

Each entry: BLOCK_H, BLOCK_N, num_warps, num_stages[, extra constexprs]. Shapes: R 512 + rope 64, page 16, bf16.
Pointers, strides and HQ are marked divisible by 16 as Triton's specialisation does on the GPU for such values
(without it the pipeliner drops cp.async); NUM_SPLITS is not specialised, as in the kernel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import mla_decode as _mod  # noqa: F401  (the module, not the function kernels/__init__ re-exports)

_PTRS = {"q_ptr": "*bf16", "c_ptr": "*bf16", "o_ptr": "*bf16", "bt_ptr": "*i32", "sl_ptr": "*i32",
         "po_ptr": "*fp32", "plse_ptr": "*fp32"}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def dump_cubin(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump --dump-resource-usage, cuobjdump --dump-sass) of a compiled kernel, with Triton's bundled
    cuobjdump (also used by launch/moe_align_bench.py --aot)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return tuple(subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, f.name], capture_output=True,
                                    text=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))


def compile_one(block_h: int, block_n: int, num_warps: int, num_stages: int, extra: dict | None = None) -> dict:
    mod = sys.modules["kernels.mla_decode"]
    fn = mod._mla_decode_kernel
    const = dict(R=512, DR=64, BLOCK_R=512, BLOCK_DR=64, BLOCK_H=block_h, BLOCK_N=block_n, PAGE=16, SINGLE=False,
                 DOT_PREC="tf32", PREFETCH=False)
    const.update(extra or {})
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in const:
            sig[n] = "constexpr"
        elif n in _PTRS:
            sig[n], attrs[(i,)] = _PTRS[n], [["tt.divisibility", 16]]
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("s_") or n == "HQ":
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, {n: v for n, v in const.items() if n in fn.arg_names}, attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    usage, sass = dump_cubin(k.asm["cubin"])

    def field(name):
        m = re.search(name + r":(\d+)", usage)
        return int(m.group(1)) if m else None

    return dict(BLOCK_H=block_h, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, extra=extra or {},
                regs=field("REG"), stack=field("STACK"), smem=k.metadata.shared, hgmma=sass.count("HGMMA"),
                hmma=sass.count("HMMA"), ldl=sass.count("LDL"), ldgsts=sass.count("LDGSTS"))


def main(argv=None) -> int:
    for c in json.loads((argv or sys.argv[1:])[0]):
        try:
            print(json.dumps(compile_one(*c[:4], c[4] if len(c) > 4 else None)), flush=True)
        except Exception as e:  # noqa: BLE001 -- out of registers: report and go on
            print(json.dumps({"config": c, "error": str(e).splitlines()[0][:200]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
