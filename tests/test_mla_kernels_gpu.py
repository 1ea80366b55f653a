"""GPU tests of the MLA and grouped-routing kernels in bf16 / fp16 / fp32 at DeepSeek shapes, against
the torch references in float64 on the device. Run in its own process, without TRITON_INTERPRET
(launch/mla_gpu_check.py runs this file).
"""

import math
import os

import pytest
import torch

from kernels._testing import TOL, poisoned_alloc, randn, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set: run the GPU tests in their own process"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEV = "cuda"


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


def _check(out, ref_lowp, ref64, dtype):
    assert torch.isfinite(out.float()).all(), "non-finite output (unwritten or NaN)"
    e_out, e_ref = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    assert e_out < TOL[dtype], f"kernel rel err {e_out:.3g} >= {TOL[dtype]}"
    assert e_ref < TOL[dtype], f"reference rel err {e_ref:.3g} >= {TOL[dtype]}"


def _latent_cache(lens, page, L, dtype, gen):
    need = [max(1, -(-n // page)) for n in lens]
    nb = sum(need) + 5
    perm = torch.randperm(nb, generator=gen).tolist()
    bt = torch.zeros((len(lens), max(need) + 2), dtype=torch.int32)
    i = 0
    for b, k in enumerate(need):
        bt[b, :k] = torch.tensor(perm[i:i + k], dtype=torch.int32)
        i += k
    return randn(nb, page, 1, L, dtype=dtype, device=DEV, gen=gen), bt.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ", [16, 128])  # V2-Lite (and V3 at TP 8), V3
@pytest.mark.parametrize("lens", [[1, 300, 4096, 17], [2049] * 8])
def test_mla_decode_gpu(dtype, HQ, lens, gen):
    from kernels.mla_decode import mla_decode, mla_decode_ref

    R, DR = 512, 64
    cache, bt = _latent_cache(lens, 16, R + DR, dtype, gen)
    q = randn(len(lens), HQ, R + DR, dtype=dtype, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = 0.1352  # DeepSeek-V3 (YaRN)
    with poisoned_alloc():
        out = mla_decode(q, cache, bt, sl, scale, R)
    ref = mla_decode_ref(q, cache, bt, sl, scale, R)
    ref64 = mla_decode_ref(q.double(), cache.double(), bt, sl, scale, R)
    _check(out, ref, ref64, dtype)


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
