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
@pytest.mark.parametrize("shape", [(257, 2048), (1000, 32, 128), (3, 4, 128)])  # hidden norm; per-head q/k norms
def test_rmsnorm_gpu(dtype, with_res, shape, gen):
    from kernels.rmsnorm import rmsnorm, rmsnorm_ref

    x = randn(*shape, dtype=dtype, device=DEV, gen=gen)
    w = randn(shape[-1], dtype=dtype, device=DEV, gen=gen)
    r = randn(*shape, dtype=dtype, device=DEV, gen=gen) if with_res else None
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
                                                                                  num_stages=3),
                # the issue-15 speed knobs (tuner candidates): head-major order, q in registers, polynomial exp2
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, HEADS_FIRST=True, Q_REG=True, POLY_EXP=True),
                dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, Q_REG=True)):
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


# ----------------------------------------------------------------------------- issue 15 options

@pytest.mark.parametrize("HQ,HK", [(32, 4), (64, 4)])
def test_paged_decode_gpu_prefetch_and_splits(HQ, HK, gen):
    """Block-table prefetch and deep pipelines (tuner candidates), many splits, bf16."""
    from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref

    lens = [1, 17, 5000, 2047, 700]
    kc, vc, bt = kt.make_paged_cache(lens, 16, HK, 128, torch.bfloat16, device=DEV, gen=gen)
    q = randn(len(lens), HQ, 128, dtype=torch.bfloat16, device=DEV, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref64 = paged_decode_attention_ref(q.double(), kc.double(), vc.double(), bt, sl, 128 ** -0.5)
    for cfg, splits in ((dict(BLOCK_N=64, num_warps=4, num_stages=4, PREFETCH=True), 1),
                        (dict(BLOCK_N=32, num_warps=4, num_stages=6, PREFETCH=True), 40),
                        (dict(BLOCK_N=64, num_warps=4, num_stages=5, PREFETCH=False), 128)):
        with poisoned_alloc():
            out = paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5, config=cfg, num_splits=splits)
        assert rel_err(out, ref64) < TOL[torch.bfloat16], (cfg, splits)


def test_flash_attention_gpu_warp_spec(gen):
    """WARP_SPEC (tl.range warp_specialize) where this Triton compiles it for this GPU."""
    from kernels.flash_attention import flash_attention, flash_attention_ref

    HQ, HK, D, lens, pls, window = PREFILL[1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = int(cu[-1])
    q, k, v = (randn(T, h, D, dtype=torch.bfloat16, device=DEV, gen=gen) for h in (HQ, HK, HK))
    pl = torch.tensor(pls, dtype=torch.int32, device=DEV)
    kc, vc, bt = kt.make_paged_cache(pls, 16, HK, D, torch.bfloat16, device=DEV, gen=gen)
    ref64 = flash_attention_ref(q.double(), k.double(), v.double(), cu, _d(kc), _d(vc), bt, pl, D ** -0.5)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=True, WARP_SPEC=True)
    try:
        with poisoned_alloc():
            out = flash_attention(q, k, v, cu, kc, vc, bt, pl, D ** -0.5, config=cfg)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a compiler that cannot warp-specialise this loop
        pytest.skip(f"WARP_SPEC not compiled by this triton/GPU: {repr(e)[:200]}")
    assert rel_err(out, ref64) < TOL[torch.bfloat16]


ALIGN_GPU = [(8192, 8, 128, 128), (3, 8, 128, 16), (4096, 2, 8, 64), (1000, 6, 64, 32), (70000, 1, 16, 16)]


@pytest.mark.parametrize("T,K,E,bm", ALIGN_GPU)
def test_moe_align_gpu(T, K, E, bm, gen):
    """Triton alignment == torch alignment, exactly, with skipped / out-of-range ids and strided ids."""
    from kernels.fused_moe import moe_align, moe_align_ref

    ids = torch.randint(-1, E + 2, (T, K + 2), generator=gen).to(torch.int32).to(DEV)[:, 1:K + 1]
    ca = torch.zeros(E, dtype=torch.int64, device=DEV)
    cb = torch.zeros(E, dtype=torch.int64, device=DEV)
    with poisoned_alloc():
        got = moe_align(ids, E, bm, expert_counts=ca)
    want = moe_align_ref(ids, E, bm, cb)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_.long(), w_.long())
    assert torch.equal(ca, cb)
    assert torch.equal(moe_align(ids.long(), E, bm)[0], got[0])


def _align_gpu_check(ids, E, bm, impl, what):
    from kernels.fused_moe import moe_align, moe_align_ref

    ca = torch.randint(0, 5, (E,), dtype=torch.int64, device=DEV)
    cb = ca.clone()
    with poisoned_alloc():
        got = moe_align(ids, E, bm, expert_counts=ca, _impl=impl)
    want = moe_align_ref(ids, E, bm, cb)
    for name, g_, w_ in zip(("sorted_ids", "block_expert", "seg_end"), got, want):
        assert g_.dtype == w_.dtype and torch.equal(g_, w_), (what, impl, name)
    assert torch.equal(ca, cb), (what, impl, "expert_counts")


ALIGN_GPU_IMPL = [  # T, K, E, bm, impl: each path forced; E = 1, 256, not a power of two
    (64, 8, 128, 16, "one"), (64, 8, 128, 16, "two"), (1, 1, 128, 16, "one"), (1, 1, 128, 16, "two"),
    (16, 8, 128, 16, "one"), (256, 8, 128, 16, "one"), (512, 8, 128, 16, "two"), (2048, 8, 256, 16, "one"),
    (3, 8, 256, 128, "one"), (300, 2, 7, 128, "one"), (300, 2, 7, 128, "two"), (100, 4, 1, 16, "one"),
    (100, 4, 1, 16, "two"), (64, 2, 8, 16, "one"), (8192, 2, 8, 128, "one"), (8192, 8, 128, 64, "two"),
]


@pytest.mark.parametrize("T,K,E,bm,impl", ALIGN_GPU_IMPL)
def test_moe_align_gpu_paths(T, K, E, bm, impl, gen):
    """One-launch and two-launch alignment == torch alignment exactly, contiguous int32 top-k ids
    (distinct experts per token), random ids with skips as a strided view, and int64 ids."""
    if impl == "one":
        from kernels.fused_moe import ALIGN_ONE_LIMIT

        assert T * K <= ALIGN_ONE_LIMIT
    topk = torch.rand(T, E, generator=gen).topk(min(K, E), dim=-1).indices.to(torch.int32).to(DEV)
    _align_gpu_check(topk, E, bm, impl, "topk")
    raw = torch.randint(-1, E + 2, (T, K + 3), generator=gen).to(torch.int32).to(DEV)
    _align_gpu_check(raw[:, 2:K + 2], E, bm, impl, "strided")
    _align_gpu_check(raw[:, 2:K + 2].long(), E, bm, impl, "int64")


@pytest.mark.parametrize("impl", ["one", "two"])
def test_moe_align_gpu_edge_cases(impl):
    """N = 1, all pairs skipped, one expert taking every pair, segments ending on a block boundary."""
    E, bm = 6, 16
    i32 = dict(dtype=torch.int32, device=DEV)
    cases = {
        "N=1": torch.tensor([[4]], **i32),
        "all skipped": torch.full((33, 3), -1, **i32),
        "one expert": torch.full((70, 8), 3, **i32),
        "block boundary": torch.arange(E * bm * 2, **i32).remainder(E).view(-1, 4),
        "boundary, one short": torch.arange(E * bm - 1, **i32).remainder(E).view(-1, 1),
        "huge int64": torch.tensor([[2 ** 40, 1], [-2 ** 40, 5], [1, 2 ** 31]], dtype=torch.int64, device=DEV),
    }
    for what, ids in cases.items():
        _align_gpu_check(ids, E, bm, impl, what)


def test_moe_align_gpu_threshold(gen):
    """Pairs == ALIGN_ONE_MAX_N (one launch by default) and one more (two launches): both exact."""
    from kernels.fused_moe import ALIGN_ONE_MAX_N

    for n in (ALIGN_ONE_MAX_N, ALIGN_ONE_MAX_N + 1):
        ids = torch.randint(-1, 128, (n, 1), generator=gen).to(torch.int32).to(DEV)
        _align_gpu_check(ids, 128, 16, None, n)


@pytest.mark.parametrize("impl", ["one", "two"])
def test_moe_align_gpu_graph(impl, gen):
    """Captured in a CUDA graph (no host sync), replayed over new ids: still exact."""
    from kernels.fused_moe import moe_align, moe_align_ref

    T, K, E, bm = 64, 8, 128, 16
    ids = torch.zeros(T, K, dtype=torch.int32, device=DEV)
    counts = torch.zeros(E, dtype=torch.int64, device=DEV)
    moe_align(ids, E, bm, expert_counts=counts, _impl=impl)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe_align(ids, E, bm, expert_counts=counts, _impl=impl)
    for _ in range(3):
        ids.copy_(torch.randint(-1, E + 1, (T, K), generator=gen).to(torch.int32))
        counts.zero_()
        g.replay()
        cb = torch.zeros(E, dtype=torch.int64, device=DEV)
        want = moe_align_ref(ids, E, bm, cb)
        for g_, w_ in zip(out, want):
            assert torch.equal(g_.long(), w_.long())
        assert torch.equal(counts, cb)


@pytest.mark.parametrize("T,E,K,H,I,cfg", [
    (20, 16, 4, 512, 256, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, W_TMA=True,
                               down=dict(BLOCK_N=64, BLOCK_K=128, W_TMA=True))),
    (700, 8, 2, 512, 384, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, W_TMA=True,
                               down=dict(BLOCK_N=256, BLOCK_K=64, W_TMA=True))),
    (300, 8, 2, 256, 200, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, W_TMA=True,
                               down=dict(BLOCK_N=128, W_TMA=False))),  # I not a multiple of the tiles
    # x rows pre-gathered into sorted order and loaded through TMA (A_TMA), H not a multiple of BLOCK_K
    (700, 8, 2, 520, 384, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, W_TMA=True,
                               A_TMA=True, down=dict(BLOCK_N=256, BLOCK_K=64, W_TMA=True))),
    (37, 16, 4, 512, 256, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, W_TMA=True,
                               A_TMA=True)),
])
def test_fused_moe_gpu_tma_weights(T, E, K, H, I, cfg, gen):
    from kernels.fused_moe import fused_moe, fused_moe_ref

    dt = torch.bfloat16
    x = randn(T, H, dtype=dt, device=DEV, gen=gen)
    w13 = randn(E, 2 * I, H, dtype=dt, device=DEV, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dt, device=DEV, gen=gen, scale=I ** -0.5)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    ids[::5, 0] = -1
    ids, wts = ids.to(DEV), (torch.rand(T, K, generator=gen) + 0.05).to(DEV)
    ref64 = fused_moe_ref(x.double(), w13.double(), w2.double(), ids, wts)
    with poisoned_alloc():
        out = fused_moe(x, w13, w2, ids, wts, config=cfg)
    assert rel_err(out, ref64) < TOL[dt]


def test_fused_moe_gpu_strided_views_in_graph(gen):
    """Row-strided x / ids / weights (views of one packed byte buffer) read in place, no host sync,
    captured in a CUDA graph: replay == eager == dense copies."""
    from kernels.fused_moe import fused_moe

    T, E, K, H, I = 96, 128, 8, 2048, 768
    dt = torch.bfloat16
    row = H * 2 + 4 * K + 4 * K + 16
    raw = torch.zeros(T, row, dtype=torch.uint8, device=DEV)
    xv = raw[:, : H * 2].view(dt)
    iv = raw[:, H * 2: H * 2 + 4 * K].view(torch.int32)
    wv = raw[:, H * 2 + 4 * K: H * 2 + 8 * K].view(torch.float32)
    xv.copy_(randn(T, H, dtype=dt, device=DEV, gen=gen))
    iv.copy_(torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32))
    iv[::7, 3] = -1
    wv.copy_(torch.rand(T, K, generator=gen))
    w13 = randn(E, 2 * I, H, dtype=dt, device=DEV, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dt, device=DEV, gen=gen, scale=I ** -0.5)
    dense = fused_moe(xv.contiguous(), w13, w2, iv.contiguous(), wv.contiguous())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = fused_moe(xv, w13, w2, iv, wv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe(xv, w13, w2, iv, wv)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = fused_moe(xv, w13, w2, iv, wv)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, dense) and torch.equal(captured, dense)
