"""GPU tests of the MLA and grouped-routing kernels in bf16 / fp16 / fp32 at DeepSeek shapes, against
the torch references in float64 on the device. Run in its own process, without TRITON_INTERPRET
(launch/mla_gpu_check.py runs this file).
"""

import math

import pytest
import torch

from kernels._testing import make_paged_cache, poisoned_alloc, randn, rel_err
from tests.test_kernels_gpu import DEV, DTYPES, _check, gen, pytestmark  # noqa: F401  (gen: fixture)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ", [16, 128])  # V2-Lite (and V3 at TP 8), V3
@pytest.mark.parametrize("lens", [[1, 300, 4096, 17], [2049] * 8])
def test_mla_decode_gpu(dtype, HQ, lens, gen):
    from kernels.mla_decode import mla_decode, mla_decode_ref

    R, DR = 512, 64
    cache, _, bt = make_paged_cache(lens, 16, 1, R + DR, dtype, DEV, gen)  # one latent "head"
    q = randn(len(lens), HQ, R + DR, dtype=dtype, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = 0.1352  # DeepSeek-V3 (YaRN)
    with poisoned_alloc():
        out = mla_decode(q, cache, bt, sl, scale, R)
    ref = mla_decode_ref(q, cache, bt, sl, scale, R)
    ref64 = mla_decode_ref(q.double(), cache.double(), bt, sl, scale, R)
    _check(out, ref, ref64, dtype)


# the sweep's other tiles: several head blocks sharing a slice through L2, prefetch off / on, mma.sync and
# wgmma, split counts that do not divide the contexts
@pytest.mark.parametrize("HQ,cfg,splits", [
    (128, dict(BLOCK_H=16, BLOCK_N=32, num_warps=8, num_stages=3, PREFETCH=True), 3),
    (128, dict(BLOCK_H=32, BLOCK_N=16, num_warps=8, num_stages=3, PREFETCH=True), 7),
    (128, dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2, PREFETCH=False), 2),
    (16, dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=4, PREFETCH=True), 5),
    (16, dict(num_stages=2, PREFETCH=False), 4),
    (16, dict(BLOCK_H=16, BLOCK_N=64, num_warps=8, num_stages=3, PREFETCH=True), 1),
])
def test_mla_decode_gpu_tiles(HQ, cfg, splits, gen):
    from kernels.mla_decode import mla_decode, mla_decode_ref

    lens = [1, 300, 4096, 17, 64]
    R, DR, dtype = 512, 64, torch.bfloat16
    cache, _, bt = make_paged_cache(lens, 16, 1, R + DR, dtype, DEV, gen)
    q = randn(len(lens), HQ, R + DR, dtype=dtype, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    with poisoned_alloc():
        out = mla_decode(q, cache, bt, sl, 0.1352, R, num_splits=splits, config=cfg)
    ref = mla_decode_ref(q, cache, bt, sl, 0.1352, R)
    ref64 = mla_decode_ref(q.double(), cache.double(), bt, sl, 0.1352, R)
    _check(out, ref, ref64, dtype)


def test_mla_decode_captures_in_a_cuda_graph(gen):
    """The split count comes from shapes (no host sync): capture, then replay twice on new cache contents."""
    from kernels.mla_decode import mla_decode, mla_decode_ref

    lens = [2049, 5, 700]
    cache, _, bt = make_paged_cache(lens, 16, 1, 576, torch.bfloat16, DEV, gen)
    q = randn(len(lens), 16, 576, dtype=torch.bfloat16, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    mla_decode(q, cache, bt, sl, 0.1352, 512)  # compile first
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mla_decode(q, cache, bt, sl, 0.1352, 512)
    for _ in range(2):
        cache.copy_(randn(*cache.shape, dtype=torch.bfloat16, device=DEV, gen=gen))
        g.replay()
        torch.cuda.synchronize()
        ref = mla_decode_ref(q, cache, bt, sl, 0.1352, 512)
        ref64 = mla_decode_ref(q.double(), cache.double(), bt, sl, 0.1352, 512)
        _check(out, ref, ref64, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqs", [[(1000, 1000)], [(77, 600), (1, 33), (512, 512), (3, 3)]])
def test_mla_prefill_gpu(dtype, seqs, gen):
    from kernels.mla_prefill import mla_prefill, mla_prefill_ref

    HQ, DN, DR, DV = 16, 128, 64, 128
    cu_q = torch.tensor([0] + [a for a, _ in seqs]).cumsum(0).to(torch.int32).to(DEV)
    cu_k = torch.tensor([0] + [b for _, b in seqs]).cumsum(0).to(torch.int32).to(DEV)
    T, Nk = int(cu_q[-1]), int(cu_k[-1])
    q = randn(T, HQ, DN + DR, dtype=dtype, device=DEV, gen=gen)
    kv = randn(Nk, HQ, DN + DV, dtype=dtype, device=DEV, gen=gen)
    lat = randn(Nk, 512 + DR, dtype=dtype, device=DEV, gen=gen)
    args = (kv[..., :DN], lat[:, 512:], kv[..., DN:], cu_q, cu_k, 1 / math.sqrt(DN + DR))
    with poisoned_alloc():
        out = mla_prefill(q, *args)
    ref = mla_prefill_ref(q, *args)
    ref64 = mla_prefill_ref(q.double(), *(a.double() if a.is_floating_point() else a for a in args[:3]), *args[3:])
    _check(out, ref, ref64, dtype)


@pytest.mark.parametrize("case", [(160, 6, "softmax", 8, 3, "max", False, False, 16.0),
                                  (256, 8, "sigmoid", 8, 4, "top2_sum", True, True, 2.5),
                                  (64, 6, "softmax", 1, 1, "max", False, False, 1.0)])
def test_grouped_topk_gpu(case, gen):
    from kernels.grouped_topk import grouped_topk, grouped_topk_ref

    E, K, scoring, ng, tg, rank, has_bias, renorm, scaling = case
    logits = randn(4096, E, device=DEV, gen=gen, scale=2.0)
    bias = randn(E, device=DEV, gen=gen, scale=0.3) if has_bias else None
    args = (K, scoring, ng, tg, rank, bias, renorm, scaling)
    with poisoned_alloc():
        w, ids = grouped_topk(logits, *args)
    w_ref, ids_ref = grouped_topk_ref(logits, *args)
    assert (ids == ids_ref).float().mean() > 0.999  # fp32 ties between backends are possible but rare
    same = (ids == ids_ref).all(dim=1)
    assert rel_err(w[same], w_ref[same]) < 1e-5


def test_grouped_topk_captures_in_a_cuda_graph(gen):
    from kernels.grouped_topk import grouped_topk

    logits = randn(64, 256, device=DEV, gen=gen)
    bias = randn(256, device=DEV, gen=gen, scale=0.3)
    w, ids = grouped_topk(logits, 8, "sigmoid", 8, 4, "top2_sum", bias, True, 2.5)  # compile first
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w2, ids2 = grouped_topk(logits, 8, "sigmoid", 8, 4, "top2_sum", bias, True, 2.5)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(ids, ids2) and torch.equal(w, w2)
