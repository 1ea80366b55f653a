"""GPU tests of kernels/: the Triton kernels on CUDA in bf16 / fp16 / fp32 at realistic small
shapes, against the torch references run in float64 on the device (and, for small cases, the
straightforward float64 loops of kernels._testing). Run in its own process, without
TRITON_INTERPRET.
"""

import os

import pytest
import torch

from kernels import _testing as kt
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


def _d(t):
    return None if t is None else t.double()


def _check(out, ref_lowp, ref64, dtype):
    assert torch.isfinite(out.float()).all(), "non-finite output (unwritten or NaN)"
    e_out, e_ref = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    assert e_out < TOL[dtype], f"kernel rel err {e_out:.3g} >= {TOL[dtype]}"
    assert e_ref < TOL[dtype], f"reference rel err {e_ref:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_gpu(dtype, gen):
    from kernels.store_kv import store_kv, store_kv_ref

    T, H, D, nb, page = 300, 8, 128, 40, 16
    k = randn(T, H, D, dtype=dtype, device=DEV, gen=gen)
    v = randn(T, H, D, dtype=dtype, device=DEV, gen=gen)
    slots = torch.randperm(nb * page, generator=gen)[:T].to(DEV)
    slots[::7] = -1
    kc = torch.full((nb, page, H, D), float("nan"), dtype=dtype, device=DEV)
    vc, kc2, vc2 = kc.clone(), kc.clone(), kc.clone()
    store_kv(k, v, kc, vc, slots)
    store_kv_ref(k, v, kc2, vc2, slots)
    torch.cuda.synchronize()
    assert torch.equal(kc.nan_to_num(3.0), kc2.nan_to_num(3.0)) and torch.equal(vc.nan_to_num(3.0), vc2.nan_to_num(3.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_rmsnorm_gpu(dtype, with_res, gen):
    from kernels.rmsnorm import rmsnorm, rmsnorm_ref

    x = randn(257, 2048, dtype=dtype, device=DEV, gen=gen)
    w = randn(2048, dtype=dtype, device=DEV, gen=gen)
    r = randn(257, 2048, dtype=dtype, device=DEV, gen=gen) if with_res else None
    with poisoned_alloc():
        out = rmsnorm(x, w, 1e-6, r)
    ref = rmsnorm_ref(x, w, 1e-6, r)
    f64, s64 = kt.rmsnorm_f64(x, w, 1e-6, r)
    if with_res:
        (out, res), (ref, rref) = out, ref
        assert torch.equal(res, rref)
    _check(out, ref, f64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_gpu(dtype, gen):
    from kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin_cache

    T, HQ, HK, D = 200, 32, 4, 128
    cache = rotary_cos_sin_cache(4096, D, 1e6, device=DEV)
    q = randn(T, HQ, D, dtype=dtype, device=DEV, gen=gen)
    k = randn(T, HK, D, dtype=dtype, device=DEV, gen=gen)
    pos = torch.randint(0, 4096, (T,), generator=gen).to(DEV)
    with poisoned_alloc():
        qo, ko = apply_rotary(q, k, pos, cache)
    qr, kr = apply_rotary_ref(q, k, pos, cache)
    q64, k64 = apply_rotary_ref(q.double(), k.double(), pos, cache.double())
    _check(qo, qr, q64, dtype)
    _check(ko, kr, k64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,K,renorm", [(128, 8, True), (8, 2, True), (60, 4, False), (16, 16, False)])
def test_topk_gating_gpu(dtype, E, K, renorm, gen):
    from kernels.topk_gating import topk_gating

    logits = randn(333, E, dtype=dtype, device=DEV, gen=gen)
    with poisoned_alloc():
        w, ids = topk_gating(logits, K, renorm)
    w64, id64 = kt.topk_f64(logits[:40], K, renorm, "softmax")
    assert torch.equal(ids[:40].long().cpu(), id64)
    assert rel_err(w[:40], w64) < 1e-5
    wr, idr = topk_gating(logits, K, renorm, backend="ref")
    assert torch.equal(ids, idr) and rel_err(w, wr) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("HQ,HK,D,window", [(32, 4, 128, None), (32, 8, 128, None), (16, 1, 64, None),
                                            (32, 8, 128, 300)])
def test_paged_decode_gpu(dtype, HQ, HK, D, window, gen):
    from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref

    lens = [1, 16, 17, 1000, 2047, 513]
    kc, vc, bt = kt.make_paged_cache(lens, 16, HK, D, dtype, device=DEV, gen=gen)
    q = randn(len(lens), HQ, D, dtype=dtype, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = D ** -0.5
    ref64 = paged_decode_attention_ref(q.double(), kc.double(), vc.double(), bt, sl, scale, window)
    ref = paged_decode_attention_ref(q, kc, vc, bt, sl, scale, window)
    for splits in (None, 1, 7):
        with poisoned_alloc():
            out = paged_decode_attention(q, kc, vc, bt, sl, scale, window, num_splits=splits)
        _check(out, ref, ref64, dtype)


def test_paged_decode_gpu_vs_loops(gen):
    from kernels.paged_decode_attention import paged_decode_attention

    lens = [5, 40]
    kc, vc, bt = kt.make_paged_cache(lens, 16, 2, 64, torch.float32, device=DEV, gen=gen)
    q = randn(2, 8, 64, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = paged_decode_attention(q, kc, vc, bt, sl, 0.125, 9)
    assert rel_err(out, kt.decode_f64(q, kc, vc, bt, sl, 0.125, 9)) < 1e-5


PREFILL = [
    # HQ, HK, D, lens, prefix lens, window
    (32, 4, 128, [1, 300, 1000], [0, 0, 0], None),
    (32, 8, 128, [257, 64, 700], [100, 16, 1500], None),
    (16, 1, 64, [513, 31], [33, 0], None),
    (32, 8, 128, [600, 900], [0, 700], 256),
    (32, 8, 128, [5, 3], [0, 0], None),  # fewer tokens than one tile: pointer path
    (32, 4, 128, [70], [0], None),  # one tile + a few rows through TMA
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL)
def test_flash_attention_gpu(dtype, case, gen):
    from kernels.flash_attention import flash_attention, flash_attention_ref

    HQ, HK, D, lens, pls, window = case
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = int(cu[-1])
    q = randn(T, HQ, D, dtype=dtype, device=DEV, gen=gen)
    k = randn(T, HK, D, dtype=dtype, device=DEV, gen=gen)
    v = randn(T, HK, D, dtype=dtype, device=DEV, gen=gen)
    pl = torch.tensor(pls, dtype=torch.int32, device=DEV)
    if any(pls):
        kc, vc, bt = kt.make_paged_cache(pls, 16, HK, D, dtype, device=DEV, gen=gen)
    else:
        kc = vc = bt = None
    scale = D ** -0.5
    with poisoned_alloc():
        out = flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, window)
    ref = flash_attention_ref(q, k, v, cu, kc, vc, bt, pl, scale, window)
    ref64 = flash_attention_ref(q.double(), k.double(), v.double(), cu, _d(kc), _d(vc), bt, pl, scale, window)
    _check(out, ref, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PREFILL)
@pytest.mark.parametrize("use_tma", [False, True])
def test_flash_attention_gpu_paths(dtype, case, use_tma, gen):
    """Both load paths (pointer gathers / TMA descriptors where supported) and a second tile shape."""
    from kernels.flash_attention import flash_attention, flash_attention_ref

    HQ, HK, D, lens, pls, window = case
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = int(cu[-1])
    q, k, v = (randn(T, h, D, dtype=dtype, device=DEV, gen=gen) for h in (HQ, HK, HK))
    pl = torch.tensor(pls, dtype=torch.int32, device=DEV)
    kc = vc = bt = None
    if any(pls):
        kc, vc, bt = kt.make_paged_cache(pls, 16, HK, D, dtype, device=DEV, gen=gen)
    scale = D ** -0.5
    ref64 = flash_attention_ref(q.double(), k.double(), v.double(), cu, _d(kc), _d(vc), bt, pl, scale, window)
    for cfg in (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4,
                                                                                  num_stages=3)):
        with poisoned_alloc():
            out = flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, window, config=dict(cfg, USE_TMA=use_tma))
        assert rel_err(out, ref64) < TOL[dtype]


def test_flash_attention_gpu_vs_loops(gen):
    from kernels.flash_attention import flash_attention

    cu = torch.tensor([0, 9, 30], dtype=torch.int32, device=DEV)
    pl = torch.tensor([20, 3], dtype=torch.int32, device=DEV)
    kc, vc, bt = kt.make_paged_cache([20, 3], 16, 1, 64, torch.float32, device=DEV, gen=gen)
    q, k, v = (randn(30, h, 64, device=DEV, gen=gen) for h in (4, 1, 1))
    out = flash_attention(q, k, v, cu, kc, vc, bt, pl, 0.125, 11)
    assert rel_err(out, kt.prefill_f64(q, k, v, cu, kc, vc, bt, pl, 0.125, 11)) < 1e-5


MOE = [
    # T, E, K, H, I
    (1, 16, 4, 512, 256),
    (37, 16, 4, 512, 256),
    (700, 16, 2, 512, 384),
    (300, 8, 8, 256, 512),  # K == E
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MOE)
@pytest.mark.parametrize("skips", [False, True])
def test_fused_moe_gpu(dtype, case, skips, gen):
    from kernels.fused_moe import fused_moe, fused_moe_ref, grouped_mm_moe

    T, E, K, H, I = case
    x = randn(T, H, dtype=dtype, device=DEV, gen=gen)
    w13 = randn(E, 2 * I, H, dtype=dtype, device=DEV, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dtype, device=DEV, gen=gen, scale=I ** -0.5)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    if skips:
        ids[::3, 0] = -1
        ids[ids == E - 1] = -1  # expert E-1 gets no token
    ids = ids.to(DEV)
    wts = (torch.rand(T, K, generator=gen) + 0.05).to(DEV)
    with poisoned_alloc():
        out = fused_moe(x, w13, w2, ids, wts)
    ref = fused_moe_ref(x, w13, w2, ids, wts)
    ref64 = fused_moe_ref(x.double(), w13.double(), w2.double(), ids, wts)
    _check(out, ref, ref64, dtype)
    if dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        assert rel_err(grouped_mm_moe(x, w13, w2, ids, wts), ref64) < TOL[dtype]


def test_fused_moe_gpu_one_expert_and_empty(gen):
    from kernels.fused_moe import fused_moe

    E, H, I = 8, 256, 128
    w13 = randn(E, 2 * I, H, dtype=torch.bfloat16, device=DEV, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=torch.bfloat16, device=DEV, gen=gen, scale=I ** -0.5)
    x = randn(500, H, dtype=torch.bfloat16, device=DEV, gen=gen)
    ids = torch.full((500, 1), 3, dtype=torch.int32, device=DEV)
    wts = torch.rand(500, 1, device=DEV)
    out = fused_moe(x, w13, w2, ids, wts)
    assert rel_err(out, kt.moe_f64(x, w13, w2, ids, wts)) < 1e-2
    assert fused_moe(x[:0], w13, w2, ids[:0], wts[:0]).shape == (0, H)
