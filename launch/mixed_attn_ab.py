"""Attention of a mixed step (decode rows + prompt chunks) as the engine runs it now against one prefill-kernel
call over every chunk (the engine before 2026-12-04), Qwen3-30B-A3B heads (32 / 4, head_dim 128), bf16.

    python3 launch/mixed_attn_ab.py --out $OUT/mixed_attn_ab.json

Per case: the old path (kernels.flash_attention over all chunks, paged prefix), the new path
(afsplit.ops.attention: decode rows through the paged decode kernel, the prompt chunks through the prefill
kernel) and the prompt chunks alone, each timed in a CUDA graph (kernels/bench.py time_graph), and the
relative difference of the two outputs. `cases(...)` also builds the inputs on CPU for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels  # noqa: E402
from afsplit import ops  # noqa: E402
from afsplit.model_runner import build_metadata  # noqa: E402
from afsplit.scheduler import ScheduledBatch  # noqa: E402

# (name, decode contexts, [(prefix, chunk length)] of the prompt part)
CASES = [
    ("64 decodes + 2048-token prompt", [1000 + 31 * i for i in range(64)], [(0, 2048)]),
    ("64 decodes + 2048-token piece after a 2048 prefix", [1000 + 31 * i for i in range(64)], [(2048, 2048)]),
    ("64 decodes + 4 x 512 prompts", [1000 + 31 * i for i in range(64)], [(0, 512)] * 4),
    ("60 decodes + 512 piece after 1536 + 1024 prompt", [1500 + 25 * i for i in range(60)], [(1536, 512), (0, 1024)]),
    ("8 decodes + 2048-token prompt", [3000] * 8, [(0, 2048)]),
]


def build(decode_ctx: list[int], chunks: list[tuple[int, int]], device, dtype, hq=32, hk=4, d=128, page=16, seed=0):
    """q, k, v, caches and metadata of one mixed step in the scheduler's order (decodes first), built as the
    engine builds them (model_runner.build_metadata over stand-in sequences with scattered blocks); the
    chunks' own keys are stored in the cache first, as the engine does before attention."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layout = [(c - 1, 1) for c in decode_ctx] + list(chunks)  # (cached prefix, chunk length)
    need = [-(-(p + n) // page) for p, n in layout]
    free = torch.randperm(sum(need), generator=g).tolist()
    batch = ScheduledBatch()
    for (p, n), blocks in zip(layout, need):
        batch.seqs.append(SimpleNamespace(num_computed_tokens=p, token_ids=[0] * (p + n), num_tokens=p + n,
                                          block_table=[free.pop() for _ in range(blocks)]))
        batch.num_tokens.append(n)
    _, meta, _ = build_metadata(batch, page, device)
    T = sum(n for _, n in layout)
    kc, vc = (torch.randn(sum(need), page, hk, d, generator=g).to(device, dtype) for _ in range(2))
    q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    ops.store_kv(k, v, kc, vc, meta.slot_mapping)
    return [q, k, v, kc, vc], meta


def paths(tensors, meta, scale: float):
    """(old, new, prompts alone) as zero-argument callables."""
    q, k, v, kc, vc = tensors
    assert meta.num_decodes > 0, "a mixed step has decode rows"

    def old():
        return kernels.flash_attention(q, k, v, meta.cu_seqlens_q, kc, vc, meta.block_tables, meta.prefix_lens, scale,
                                       max_seqlen_q=meta.max_seqlen_q)

    def new():
        return ops.attention(q, k, v, kc, vc, meta, scale, None)

    def alone():
        return kernels.flash_attention(q, k, v, meta.prefill_cu_seqlens_q, None if meta.whole_prompts else kc,
                                       None if meta.whole_prompts else vc,
                                       None if meta.whole_prompts else meta.prefill_block_tables,
                                       meta.prefill_prefix_lens, scale, max_seqlen_q=meta.max_seqlen_q)
    return old, new, alone


def main():
    from kernels.bench import time_graph

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name, dec, chunks in CASES:
        tensors, meta = build(dec, chunks, "cuda", torch.bfloat16)
        old, new, alone = paths(tensors, meta, 128 ** -0.5)
        a, b = old().float(), new().float()
        r = dict(case=name, decodes=meta.num_decodes, tokens=int(tensors[0].shape[0]), whole_prompts=meta.whole_prompts,
                 rel_diff=float((a - b).norm() / a.norm()))
        for key, fn in (("old_us", old), ("new_us", new), ("prompts_alone_us", alone)):
            r[key] = time_graph(lambda i, fn=fn: fn()) * 1e6
        r["speedup"] = r["old_us"] / r["new_us"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
