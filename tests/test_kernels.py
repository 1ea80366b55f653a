"""CPU tests of kernels/: each Triton kernel (under TRITON_INTERPRET=1) against its torch
reference and both against a straightforward float64 computation, on fresh random inputs with
poisoned outputs. float32 / float16 only (the interpreter mishandles bf16; bf16 is tested in
tests/test_kernels_gpu.py).
"""

import os
import sys

# The interpreter must be chosen before triton is imported anywhere in this process.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import _testing as kt  # noqa: E402
from kernels._testing import TOL, poisoned_alloc, randn, rel_err  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _module(name):
    import importlib

    return importlib.import_module(f"kernels.{name}")


def _need_interpreted(mod, kernel_name):
    """Skip unless `mod.kernel_name` is a Triton kernel built for the interpreter."""
    if not getattr(mod, "HAS_TRITON", False):
        pytest.skip("triton not importable")
    k = getattr(mod, kernel_name)
    if type(k).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file in its own process")


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    return g


# ----------------------------------------------------------------------------- store_kv

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D", [(1, 1, 16), (9, 2, 24), (20, 4, 64)])
def test_store_kv(dtype, T, H, D, gen):
    mod = _module("store_kv")
    _need_interpreted(mod, "_store_kv_kernel")
    nb, page = 6, 4
    k = randn(T, H, D, dtype=dtype, gen=gen)
    v = randn(T, H, D, dtype=dtype, gen=gen)
    slots = torch.randperm(nb * page, generator=gen)[:T]
    if T > 2:
        slots[1] = -1
    kc = torch.full((nb, page, H, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    kc2, vc2 = kc.clone(), vc.clone()
    mod.store_kv(k, v, kc, vc, slots, backend="triton")
    mod.store_kv_ref(k, v, kc2, vc2, slots)
    # straightforward check: slot by slot
    flat_k, flat_v = kc.view(nb * page, H, D), vc.view(nb * page, H, D)
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v[t])
    untouched = torch.ones(nb * page, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()
    assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))


def test_store_kv_strided_input(gen):
    mod = _module("store_kv")
    _need_interpreted(mod, "_store_kv_kernel")
    qkv = randn(5, 3, 2, 16, gen=gen)  # [T, q/k/v, H, D]
    k, v = qkv[:, 1], qkv[:, 2]
    kc = torch.full((2, 4, 2, 16), float("nan"))
    vc = kc.clone()
    mod.store_kv(k, v, kc, vc, torch.tensor([7, 0, 1, 2, 3]), backend="triton")
    assert torch.equal(kc.view(8, 2, 16)[7], k[0]) and torch.equal(vc.view(8, 2, 16)[3], v[4])


# ----------------------------------------------------------------------------- rmsnorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 40), (7, 64), (70, 48), (2, 3000)])  # rows per program, partial last
@pytest.mark.parametrize("with_res", [False, True])
def test_rmsnorm(dtype, shape, with_res, gen):
    mod = _module("rmsnorm")
    _need_interpreted(mod, "_rmsnorm_kernel")
    x = randn(*shape, dtype=dtype, gen=gen)
    w = randn(shape[-1], dtype=dtype, gen=gen)
    r = randn(*shape, dtype=dtype, gen=gen) if with_res else None
    with poisoned_alloc():
        out = mod.rmsnorm(x, w, 1e-6, r, backend="triton")
    ref = mod.rmsnorm_ref(x, w, 1e-6, r)
    f64, s64 = kt.rmsnorm_f64(x, w, 1e-6, r)
    if with_res:
        out, res = out
        ref, rref = ref
        assert rel_err(res, s64) < TOL[dtype] and rel_err(rref, s64) < TOL[dtype]
        assert torch.equal(res, rref)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, f64) < TOL[dtype]
    assert rel_err(ref, f64) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]


# ----------------------------------------------------------------------------- rotary

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,HQ,HK,D", [(1, 2, 1, 16), (11, 4, 1, 64), (6, 3, 3, 24)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary(dtype, T, HQ, HK, D, inplace, gen):
    mod = _module("rotary")
    _need_interpreted(mod, "_rotary_kernel")
    base = 10000.0
    cache = mod.rotary_cos_sin_cache(100, D, base)
    assert cache.dtype == torch.float32 and cache.shape == (100, D)
    q = randn(T, HQ, D, dtype=dtype, gen=gen)
    k = randn(T, HK, D, dtype=dtype, gen=gen)
    pos = torch.randint(0, 100, (T,), generator=gen)
    q64, k64 = kt.rotary_f64(q, pos, D, base), kt.rotary_f64(k, pos, D, base)
    qr, kr = mod.apply_rotary_ref(q, k, pos, cache)
    if inplace:
        qo, ko = mod.apply_rotary(q, k, pos, cache, inplace=True, backend="triton")
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    else:
        with poisoned_alloc():
            qo, ko = mod.apply_rotary(q, k, pos, cache, backend="triton")
    for out, ref, f64 in ((qo, qr, q64), (ko, kr, k64)):
        assert rel_err(out, f64) < TOL[dtype]
        assert rel_err(ref, f64) < TOL[dtype]
        assert rel_err(out, ref) < TOL[dtype]


def test_rotary_cache_matches_hf_formula():
    from kernels.rotary import rotary_cos_sin_cache

    D, base = 32, 500000.0
    c = rotary_cos_sin_cache(50, D, base)
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(50, dtype=torch.float64)[:, None] * inv[None]
    assert rel_err(c[:, : D // 2], ang.cos()) < 1e-5 and rel_err(c[:, D // 2 :], ang.sin()) < 1e-5


# ----------------------------------------------------------------------------- topk gating

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (6, 6), (60, 8)])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gating(dtype, E, K, renorm, scoring, gen):
    mod = _module("topk_gating")
    _need_interpreted(mod, "_topk_kernel")
    T = 13
    logits = randn(T, E, dtype=dtype, gen=gen)
    logits[0, 1] = logits[0, 3] = logits[0, 5] = logits[0].max() + 1  # ties -> lower id first
    with poisoned_alloc():
        w, ids = mod.topk_gating(logits, K, renorm, scoring, backend="triton")
    wr, idr = mod.topk_gating_ref(logits, K, renorm, scoring)
    w64, id64 = kt.topk_f64(logits, K, renorm, scoring)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (T, K)
    assert torch.equal(ids.long(), id64) and torch.equal(idr.long(), id64)
    assert ids[0, 0] == 1 and (K < 2 or ids[0, 1] == 3)
    assert rel_err(w, w64) < 1e-5 and rel_err(wr, w64) < 1e-5


# ----------------------------------------------------------------------------- paged decode

DECODE_CASES = [
    # HQ, HK, D, page, seq_lens, window
    (4, 1, 16, 16, [1, 16, 17, 70], None),  # MQA; length 1, one block, one block + 1
    (4, 2, 64, 16, [33, 5], None),
    (2, 2, 24, 8, [40, 9], 12),  # sliding window shorter than the context, non-pow2 D
    (8, 2, 16, 16, [70, 3, 16], 20),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_paged_decode(dtype, case, splits, gen):
    mod = _module("paged_decode_attention")
    _need_interpreted(mod, "_decode_split_kernel")
    HQ, HK, D, page, lens, window = case
    B = len(lens)
    kc, vc, bt = kt.make_paged_cache(lens, page, HK, D, dtype, gen=gen)
    q = randn(B, HQ, D, dtype=dtype, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    with poisoned_alloc():
        out = mod.paged_decode_attention(q, kc, vc, bt, sl, scale, window, num_splits=splits, backend="triton")
    ref = mod.paged_decode_attention_ref(q, kc, vc, bt, sl, scale, window)
    f64 = kt.decode_f64(q, kc, vc, bt, sl, scale, window)
    assert out.shape == (B, HQ, D) and out.dtype == dtype
    assert rel_err(out, f64) < TOL[dtype]
    assert rel_err(ref, f64) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype,case,runs", [
    (torch.float32, DECODE_CASES[3], ((True, None), (False, 64), (True, 64))),
    (torch.float16, DECODE_CASES[0], ((True, 2),)),
])
def test_paged_decode_prefetch_and_many_splits(dtype, case, runs, gen):
    """Block-table prefetch on/off, and more splits than key blocks (empty splits merge to nothing)."""
    mod = _module("paged_decode_attention")
    _need_interpreted(mod, "_decode_split_kernel")
    HQ, HK, D, page, lens, window = case
    B = len(lens)
    kc, vc, bt = kt.make_paged_cache(lens, page, HK, D, dtype, gen=gen)
    q = randn(B, HQ, D, dtype=dtype, gen=gen)
    sl = torch.tensor(lens, dtype=torch.int32)
    f64 = kt.decode_f64(q, kc, vc, bt, sl, D ** -0.5, window)
    for prefetch, splits in runs:
        with poisoned_alloc():
            out = mod.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, window, num_splits=splits,
                                             config=dict(PREFETCH=prefetch), backend="triton")
        assert rel_err(out, f64) < TOL[dtype], (prefetch, splits)


def test_decode_splits_from_table_entry():
    from kernels.paged_decode_attention import splits_from_entry

    key = dict(B=16, L=32768)
    assert splits_from_entry(key, 40, 16, 32768) == 40  # its own shape: as measured
    assert splits_from_entry(key, 40, 64, 32768) == 10  # same number of programs
    assert splits_from_entry(key, 40, 1, 2048) == 16  # capped: >= 128 keys per split
    assert splits_from_entry(key, 1, 256, 8192) == 1


# ----------------------------------------------------------------------------- prefill flash attention

PREFILL_CASES = [
    # HQ, HK, D, page, chunk lens, prefix lens, window
    (4, 1, 16, 16, [1, 40, 17], [0, 0, 0], None),  # MQA, empty prefixes, no cache at all
    (4, 2, 64, 16, [16, 9], [16, 17], None),  # exactly one block of prefix, one block + 1
    (2, 2, 24, 8, [21, 1, 30], [13, 0, 35], None),  # prefix + chunk crossing block boundaries
    (4, 2, 16, 8, [30, 12], [25, 3], 10),  # sliding window shorter than the context
    (2, 1, 16, 16, [37], [0], 7),  # window, no prefix
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_flash_attention(dtype, case, gen):
    mod = _module("flash_attention")
    _need_interpreted(mod, "_flash_fwd_kernel")
    HQ, HK, D, page, lens, pls, window = case
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q = randn(T, HQ, D, dtype=dtype, gen=gen)
    k = randn(T, HK, D, dtype=dtype, gen=gen)
    v = randn(T, HK, D, dtype=dtype, gen=gen)
    pl = torch.tensor(pls, dtype=torch.int32)
    if any(pls):
        kc, vc, bt = kt.make_paged_cache(pls, page, HK, D, dtype, gen=gen)
    else:
        kc = vc = bt = None
    scale = D ** -0.5
    with poisoned_alloc():
        out = mod.flash_attention(q, k, v, cu, kc, vc, bt, pl, scale, window, backend="triton")
    ref = mod.flash_attention_ref(q, k, v, cu, kc, vc, bt, pl, scale, window)
    f64 = kt.prefill_f64(q, k, v, cu, kc, vc, bt, pl, scale, window)
    assert out.shape == (T, HQ, D) and out.dtype == dtype
    assert rel_err(out, f64) < TOL[dtype]
    assert rel_err(ref, f64) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]


def test_flash_attention_strided_qkv(gen):
    """q/k/v as views of a fused projection output."""
    mod = _module("flash_attention")
    _need_interpreted(mod, "_flash_fwd_kernel")
    T, HQ, HK, D = 20, 4, 2, 16
    qkv = randn(T, (HQ + 2 * HK) * D, gen=gen)
    q = qkv[:, : HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D : (HQ + HK) * D].view(T, HK, D)
    v = qkv[:, (HQ + HK) * D :].view(T, HK, D)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    pl = torch.zeros(2, dtype=torch.int32)
    out = mod.flash_attention(q, k, v, cu, None, None, None, pl, 0.25, backend="triton")
    f64 = kt.prefill_f64(q, k, v, cu, None, None, None, pl, 0.25)
    assert rel_err(out, f64) < 1e-5


@pytest.mark.parametrize("case_i", [0, 2])
@pytest.mark.parametrize("knobs", [dict(WARP_SPEC=True), dict(POLY_EXP=True, HEADS_FIRST=True)])
def test_flash_attention_speed_knobs(case_i, knobs, gen):
    """The Hopper speed knobs of the tuner (warp-specialised loops; the polynomial exp2 on every second
    column of the unmasked blocks; head-major program order) keep results on the interpreter: case 0
    has unmasked chunk blocks (40 rows, 32-row tiles), case 2 full prefix blocks."""
    mod = _module("flash_attention")
    _need_interpreted(mod, "_flash_fwd_kernel")
    HQ, HK, D, page, lens, pls, window = PREFILL_CASES[case_i]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (randn(T, h, D, gen=gen) for h in (HQ, HK, HK))
    pl = torch.tensor(pls, dtype=torch.int32)
    kc = vc = bt = None
    if any(pls):
        kc, vc, bt = kt.make_paged_cache(pls, page, HK, D, torch.float32, gen=gen)
    with poisoned_alloc():
        out = mod.flash_attention(q, k, v, cu, kc, vc, bt, pl, D ** -0.5, window, backend="triton",
                                  config=dict(knobs))
    assert rel_err(out, kt.prefill_f64(q, k, v, cu, kc, vc, bt, pl, D ** -0.5, window)) < 1e-5


def test_exp2_poly_matches_exp2():
    """The polynomial exp2 of the POLY_EXP knob against torch over its whole range (x <= 0)."""
    mod = _module("flash_attention")
    _need_interpreted(mod, "_flash_fwd_kernel")
    tl, triton = mod.tl, mod.triton
    global _exp2_poly  # the jitted test kernel resolves it among this module's globals
    _exp2_poly = mod._exp2_poly

    @triton.jit
    def _k(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, _exp2_poly(tl.load(x_ptr + offs)))

    x = torch.cat([-torch.rand(4000, dtype=torch.float64) * 130, torch.tensor([0.0, -0.5, -1.0, -125.9, -140.0],
                                                                              dtype=torch.float64)])
    x = torch.cat([x, torch.zeros(8192 - x.numel(), dtype=torch.float64)]).float()
    y = torch.empty_like(x)
    _k[(1,)](x, y, N=x.numel())
    want = torch.exp2(x.double()).clamp_min(2.0 ** -126)
    assert float(((y.double() - want) / want).abs().max()) < 4e-6


# ----------------------------------------------------------------------------- fused MoE

def _moe_ids(T, E, K, gen, mode):
    if mode == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    if mode == "one_expert":  # all tokens on expert 1 (K = 1)
        return torch.full((T, K), 1, dtype=torch.int32)
    if mode == "with_skips":  # -1 = not on this rank; one token entirely skipped; expert E-1 unused
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
        ids[::3, 0] = -1
        ids[1, :] = -1
        return ids
    raise ValueError(mode)


MOE_CASES = [
    # T, E, K, H, I, mode
    (1, 4, 2, 32, 16, "random"),
    (19, 6, 2, 48, 40, "with_skips"),  # ids = -1, an expert with no tokens
    (17, 5, 1, 32, 24, "one_expert"),  # all tokens on one expert, others empty
    (9, 4, 4, 16, 32, "random"),  # K == E
    (40, 8, 3, 64, 32, "random"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_moe(dtype, case, gen):
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_gate_up_kernel")
    T, E, K, H, I, mode = case
    x = randn(T, H, dtype=dtype, gen=gen)
    w13 = randn(E, 2 * I, H, dtype=dtype, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dtype, gen=gen, scale=I ** -0.5)
    ids = _moe_ids(T, E, K, gen, mode)
    wts = torch.rand(T, K, generator=gen) + 0.05
    with poisoned_alloc():
        out = mod.fused_moe(x, w13, w2, ids, wts, backend="triton")
    ref = mod.fused_moe_ref(x, w13, w2, ids, wts)
    f64 = kt.moe_f64(x, w13, w2, ids, wts)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, f64) < TOL[dtype]
    assert rel_err(ref, f64) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]
    if mode == "with_skips":
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_fused_moe_empty_and_int64_ids(gen):
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_gate_up_kernel")
    E, H, I = 3, 16, 16
    w13 = randn(E, 2 * I, H, gen=gen)
    w2 = randn(E, H, I, gen=gen)
    out = mod.fused_moe(randn(0, H), w13, w2, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2),
                        backend="triton")
    assert out.shape == (0, H)
    x = randn(3, H, gen=gen)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0]], dtype=torch.int64)
    wts = torch.rand(3, 2, generator=gen)
    assert rel_err(mod.fused_moe(x, w13, w2, ids, wts, backend="triton"), kt.moe_f64(x, w13, w2, ids, wts)) < 1e-5


def test_grouped_mm_baseline(gen):
    mod = _module("fused_moe")
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    T, E, K, H, I = 12, 5, 2, 32, 16
    x = randn(T, H, gen=gen)
    w13 = randn(E, 2 * I, H, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, gen=gen, scale=I ** -0.5)
    ids = _moe_ids(T, E, K, gen, "with_skips")
    wts = torch.rand(T, K, generator=gen)
    try:
        out = mod.grouped_mm_moe(x, w13, w2, ids, wts)
    except RuntimeError as e:  # CPU builds without a grouped_mm kernel for this dtype
        pytest.skip(f"torch._grouped_mm unavailable here: {e}")
    assert rel_err(out, kt.moe_f64(x, w13, w2, ids, wts)) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_moe_align(backend, gen):
    mod = _module("fused_moe")
    if backend == "triton":
        _need_interpreted(mod, "_moe_place_kernel")
    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [5, 2]], dtype=torch.int32)  # 5 >= E: skipped
    raw = torch.full((4, 5), 99, dtype=torch.int32)
    raw[:, 1:3] = ids
    view = raw[:, 1:3]  # row-strided, as the communicator hands ids over
    counts = torch.full((4,), 3, dtype=torch.int64)
    with poisoned_alloc():
        sorted_ids, bexp, seg_end = mod.moe_align(view, 4, 4, backend=backend, expert_counts=counts)
    # expert 0: pairs 1, 4; expert 2: pairs 0, 2, 5, 7; experts 1, 3: none
    assert seg_end.tolist() == [4, 4, 8, 8]
    assert sorted_ids[:8].tolist() == [1, 4, 8, 8, 0, 2, 5, 7]
    assert (sorted_ids[8:] == 8).all()
    assert bexp[:2].tolist() == [0, 2] and (bexp[2:] == -1).all()
    assert counts.tolist() == [5, 3, 7, 3]


ALIGN_CASES = [  # T, K, E, block_m
    (0, 2, 4, 16), (1, 8, 32, 16), (5, 2, 4, 4), (37, 4, 16, 16), (130, 8, 16, 64), (600, 2, 8, 128),
    (50, 1, 3, 32), (1, 1, 1, 1), (64, 8, 128, 16), (3, 8, 256, 128), (300, 3, 7, 2),
    (100, 8, 1000, 16),  # two launches: several SUB chunks a program (the running offsets carried over)
]


def _align_check(mod, ids, E, bm, impl, what):
    """moe_align (forced path) == moe_align_ref exactly, expert_counts included (int64 ones for int32
    ids and the other way round)."""
    ca = torch.randint(0, 5, (E,), dtype=torch.int64 if ids.dtype == torch.int32 else torch.int32)
    cb = ca.clone()
    with poisoned_alloc():
        got = mod.moe_align(ids, E, bm, backend="triton", expert_counts=ca, _impl=impl)
    want = mod.moe_align_ref(ids, E, bm, cb)
    for name, g_, w_ in zip(("sorted_ids", "block_expert", "seg_end"), got, want):
        assert g_.dtype == w_.dtype and torch.equal(g_, w_), (what, impl, name)
    assert torch.equal(ca, cb), (what, impl, "expert_counts")


@pytest.mark.parametrize("impl", ["one", "two"])
def test_moe_align_matches_reference(impl, gen):
    """Both Triton alignments (one launch / two launches) equal the torch one exactly (stable order
    inside an expert), over chunk boundaries, empty experts, skipped and out-of-range ids, int32 and
    int64 ids, E not a power of two, E = 1 and E = 256."""
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_align_one_kernel")
    for T, K, E, bm in ALIGN_CASES:
        for dt in (torch.int32, torch.int64):
            ids = torch.randint(-1, E + 2, (T, K), generator=gen).to(dt)
            _align_check(mod, ids, E, bm, impl, (T, K, E, bm, dt))


@pytest.mark.parametrize("impl", ["one", "two"])
def test_moe_align_edge_cases(impl, gen):
    """N = 1, every pair skipped, one expert taking every pair, segments ending exactly on a block
    boundary, strided int64 views, huge int64 ids."""
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_align_one_kernel")
    E, bm = 6, 8
    cases = {
        "N=1": torch.tensor([[4]], dtype=torch.int32),
        "N=1 skipped": torch.tensor([[-1]], dtype=torch.int32),
        "all skipped": torch.full((9, 3), -1, dtype=torch.int32),
        "all out of range": torch.full((5, 2), E, dtype=torch.int64),
        "one expert": torch.full((21, 2), 3, dtype=torch.int32),
        "last expert only": torch.full((bm, 1), E - 1, dtype=torch.int32),
        "block boundary": torch.arange(E * bm, dtype=torch.int32).remainder(E).view(-1, 2),  # bm pairs each
        "boundary, one short": torch.arange(E * bm - 1, dtype=torch.int32).remainder(E).view(-1, 1),
        "huge int64": torch.tensor([[2 ** 40, 1], [-2 ** 40, 5], [1, 2 ** 31]], dtype=torch.int64),
        "random": torch.randint(-1, E + 1, (40, 4), generator=gen).to(torch.int32),
    }
    for what, ids in cases.items():
        _align_check(mod, ids, E, bm, impl, what)
        raw = torch.full((ids.shape[0], ids.shape[1] + 3), 99, dtype=torch.int64)
        raw[:, 2:2 + ids.shape[1]] = ids
        _align_check(mod, raw[:, 2:2 + ids.shape[1]], E, bm, impl, what + " (strided int64)")
    for T, K, E2, bm2 in ((1, 1, 1, 16), (7, 3, 1, 4), (16, 1, 1, 16), (2, 8, 256, 16), (40, 8, 256, 32)):
        _align_check(mod, torch.randint(-1, E2 + 1, (T, K), generator=gen).to(torch.int32), E2, bm2, impl,
                     (T, K, E2, bm2))


def test_moe_align_threshold(gen, monkeypatch):
    """The default picks one launch up to ALIGN_ONE_MAX_N pairs and two launches above; both sides of
    the threshold equal the reference (the real threshold, then a lowered one)."""
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_align_one_kernel")

    def used(ids, E, bm):
        mp = mod._max_padded(ids.numel(), E, bm)
        outs = (torch.empty(mp, dtype=torch.int32), torch.empty(mp // bm, dtype=torch.int32),
                torch.empty(E, dtype=torch.int64))
        return [k.__name__ for k, *_ in mod._align_launches(ids, E, bm, *outs, None)]

    E, K, bm = 128, 8, 16
    T = mod.ALIGN_ONE_MAX_N // K
    assert T * K == mod.ALIGN_ONE_MAX_N
    below = torch.randint(-1, E, (T, K), generator=gen).to(torch.int32)
    above = torch.randint(-1, E, (T * K + 1, 1), generator=gen).to(torch.int32)
    assert used(below, E, bm) == ["_moe_align_one_kernel"]
    assert used(above, E, bm) == ["_moe_count_kernel", "_moe_place_kernel"]
    for ids in (below, above):
        _align_check(mod, ids, E, bm, None, ("threshold", ids.numel()))
    monkeypatch.setattr(mod, "ALIGN_ONE_MAX_N", 40)
    for n in (39, 40, 41):
        ids = torch.randint(-1, 9, (n, 1), generator=gen).to(torch.int32)
        assert len(used(ids, 9, 4)) == (1 if n <= 40 else 2)
        _align_check(mod, ids, 9, 4, None, ("lowered threshold", n))
    with pytest.raises(ValueError, match="one-launch"):
        mod.moe_align(torch.zeros(mod.ALIGN_ONE_LIMIT + 1, 1, dtype=torch.int32), 4, 16, backend="triton",
                      _impl="one")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_row_strided_views(dtype, gen):
    """x / topk_ids / topk_weights as views of one packed byte buffer (stride(0) != row width): read
    in place, same result as dense copies; expert_counts adds the pairs per expert."""
    mod = _module("fused_moe")
    _need_interpreted(mod, "_moe_gate_up_kernel")
    T, E, K, H, I = 13, 6, 2, 32, 24
    es = torch.tensor([], dtype=dtype).element_size()
    x = randn(T, H, dtype=dtype, gen=gen)
    ids = _moe_ids(T, E, K, gen, "with_skips")
    ids[2, 1] = E + 3  # out of range: skipped
    wts = torch.rand(T, K, generator=gen) + 0.05
    row = H * es + 4 * K + 4 * K + 12  # x | ids | weights | slack
    raw = torch.zeros(T, row, dtype=torch.uint8)
    raw[:, : H * es] = x.view(torch.uint8).view(T, H * es)
    raw[:, H * es: H * es + 4 * K] = ids.view(torch.uint8).view(T, 4 * K)
    raw[:, H * es + 4 * K: H * es + 8 * K] = wts.view(torch.uint8).view(T, 4 * K)
    xv = raw[:, : H * es].view(dtype)
    iv = raw[:, H * es: H * es + 4 * K].view(torch.int32)
    wv = raw[:, H * es + 4 * K: H * es + 8 * K].view(torch.float32)
    assert xv.stride(0) != H and iv.stride(0) != K and not xv.is_contiguous()
    w13 = randn(E, 2 * I, H, dtype=dtype, gen=gen, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dtype, gen=gen, scale=I ** -0.5)
    counts = torch.zeros(E, dtype=torch.int64)
    with poisoned_alloc():
        out = mod.fused_moe(xv, w13, w2, iv, wv, backend="triton", expert_counts=counts)
    dense = mod.fused_moe(x, w13, w2, ids, wts, backend="triton")
    assert torch.equal(out, dense)
    assert rel_err(out, kt.moe_f64(x, w13, w2, ids, wts)) < TOL[dtype]
    valid = ids[(ids >= 0) & (ids < E)].long()
    assert torch.equal(counts, torch.bincount(valid, minlength=E))


# ----------------------------------------------------------------------------- tuning tables

def test_tuning_table_lookup(tmp_path, monkeypatch):
    import json

    from kernels import _tuning

    table = {"device": "Fake GPU", "tables": {"fused_moe": [
        {"key": {"E": 8, "K": 2, "T": 128}, "config": {"BLOCK_M": 64, "down": {"BLOCK_N": 32}}},
        {"key": {"E": 8, "K": 2, "T": 8192}, "config": {"BLOCK_M": 128}},
        {"key": {"E": 16, "K": 2, "T": 100}, "config": {"BLOCK_M": 16}},
        {"bad": 1}]}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(_tuning.ENV, str(path))
    _tuning.reset()
    try:
        cfg, key = _tuning.lookup("fused_moe", "Fake GPU", {"E": 8, "K": 2}, {"T": 200})
        assert cfg["BLOCK_M"] == 64 and key["T"] == 128
        cfg["down"]["BLOCK_N"] = 1  # callers get copies
        assert _tuning.lookup("fused_moe", "Fake GPU", {"E": 8, "K": 2}, {"T": 200})[0]["down"]["BLOCK_N"] == 32
        assert _tuning.lookup("fused_moe", "Fake GPU", {"E": 8, "K": 2}, {"T": 5000})[0]["BLOCK_M"] == 128
        assert _tuning.lookup("fused_moe", "Fake GPU", {"E": 4, "K": 2}, {"T": 5000}) is None
        assert _tuning.lookup("fused_moe", "Other GPU", {"E": 8, "K": 2}, {"T": 5000}) is None
        assert _tuning.lookup("fused_moe", None, {"E": 8}, {"T": 1}) is None
        monkeypatch.setenv(_tuning.ENV, "off")
        _tuning.reset()
        assert _tuning.lookup("fused_moe", "Fake GPU", {"E": 8, "K": 2}, {"T": 200}) is None
    finally:
        monkeypatch.delenv(_tuning.ENV)
        _tuning.reset()
    assert _tuning.device_slug("NVIDIA H200") == "nvidia-h200"


def test_shipped_tuning_tables_are_valid():
    """Every table shipped in kernels/tuning/ parses and names configs the wrappers understand."""
    import glob
    import json

    from kernels import _tuning

    known = {"paged_decode_attention": {"BLOCK_N", "num_warps", "num_stages", "PREFETCH", "num_splits"},
             "flash_attention": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "WARP_SPEC", "POLY_EXP",
                                 "HEADS_FIRST", "Q_REG", "maxnreg"},
             "fused_moe": {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "W_TMA", "A_TMA",
                           "down"}}
    for path in glob.glob(f"{_tuning.TABLE_DIR}/*.json"):
        data = json.load(open(path))
        assert isinstance(data["device"], str) and path.endswith(_tuning.device_slug(data["device"]) + ".json")
        for kernel, entries in data["tables"].items():
            for e in entries:
                assert set(e["config"]) <= known[kernel], (path, kernel, e["config"])


def test_bench_markdown_renders():
    """The GPU report's table writer handles full, partial and failed rows (it runs once, on a GPU)."""
    from kernels.bench import markdown

    res = {"device": "X", "ceilings": {"read_GBps": 4000.0, "copy_GBps": 4100.0, "matmul_bf16_TFLOPs": 780.0},
           "rows": [dict(kernel="decode", B=16, ctx=32768, HQ=32, HK=4, time_us=300.0, GBps=3800.0, frac_read=0.95,
                         sdpa_us=310.0, vs_sdpa=1.03, goal_met=True),
                    dict(kernel="decode", B=64, ctx=8192, HQ=32, HK=8, error="OOM"),
                    dict(kernel="prefill", n_seqs=1, chunk=8192, prefix=0, HQ=32, HK=4, time_us=900.0, TFLOPs=600.0,
                         frac_matmul=0.77, sdpa_us={"cudnn": 880.0, "flash_error": "x"}, vs_cudnn=0.98,
                         sdpa_best="cudnn", vs_sdpa_best=0.98, goal_met=False),
                    dict(kernel="fused_moe", model="m", T=16, experts_used=80, time_us=200.0, eager_us=210.0,
                         eager_over_graph=1.05, frac_read=1.2, TFLOPs=1.0, frac_matmul=0.001, vs_grouped_mm=1.5,
                         align={"triton_eager_us": 20.0, "ref_eager_us": 150.0}, goal="g", goal_met=True,
                         ceiling_exceeded="frac_read > 1")],
           "errors": [{"moe": "tb"}]}
    md = markdown(res)
    assert "| B=16 ctx=32768 32/4 | 300.0 |" in md and "(ERROR)" in md and "Ceiling exceeded" in md
    assert "0.98x" in md and "moe" in md


# ----------------------------------------------------------------------------- validation# ----------------------------------------------------------------------------- validation

def test_validation_messages():
    import kernels

    with pytest.raises(ValueError, match="k_cache"):
        kernels.store_kv(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8),
                         torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.store_kv(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8),
                         torch.zeros(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="weight"):
        kernels.rmsnorm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="top_k"):
        kernels.topk_gating(torch.randn(3, 4), 5, True)
    with pytest.raises(ValueError, match="seq_lens"):
        kernels.paged_decode_attention(torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16),
                                       torch.zeros(2, 2, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="q heads"):
        kernels.flash_attention(torch.randn(4, 3, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16),
                                torch.tensor([0, 4], dtype=torch.int32), None, None, None,
                                torch.zeros(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="prefix_lens"):
        kernels.flash_attention(torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16),
                                torch.tensor([0, 4], dtype=torch.int32), None, None, None,
                                torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="w2"):
        kernels.fused_moe(torch.randn(3, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 5),
                          torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1))
    with pytest.raises(ValueError, match="topk_weights"):
        kernels.fused_moe(torch.randn(3, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 4),
                          torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="backend"):
        kernels.rmsnorm(torch.randn(3, 8), torch.randn(8), 1e-6, backend="cuda")


def test_auto_backend_on_cpu_is_reference(gen):
    """backend=None on CPU tensors runs the torch reference (engine CPU runs stay fast)."""
    import kernels

    x = randn(4, 32, gen=gen)
    w = randn(32, gen=gen)
    assert torch.equal(kernels.rmsnorm(x, w, 1e-6), kernels.rmsnorm_ref(x, w, 1e-6))


# ----------------------------------------------------------------------------- engine benchmark bookkeeping

def test_engine_bench_counts_expert_reads_on_cpu(tmp_path):
    """launch/engine_bench.py's per-step accounting (experts hit via fused_moe's expert_counts, KV and
    weight bytes, TTFT) on the tiny model with the CPU engine; the GPU run only adds timing."""
    import json

    from afsplit.config import load_config
    from afsplit.engine import LLMEngine

    import kernels
    from launch import engine_bench as eb

    (tmp_path / "config.json").write_text(json.dumps(dict(  # a tiny Qwen3-MoE shape; random weights, no checkpoint
        model_type="qwen3_moe", vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, intermediate_size=96, norm_topk_prob=True, eos_token_id=257)))
    cfg = load_config("configs/tiny-1proc.yaml", [f"model.path={tmp_path}", "model.tiny=", "model.weights=random",
                                                  "runtime.max_num_seqs=4", "runtime.max_num_batched_tokens=64"])
    eng = LLMEngine(cfg)
    spec = eng.spec
    orig = kernels.fused_moe
    counter = eb.ExpertHitCounter(spec.num_moe_layers, spec.num_experts, eng.device)
    try:
        r = eb.run_requests(eng, 4, 20, 4, counter, 1.0, lambda s: None)
    finally:
        counter.remove()
    assert kernels.fused_moe is orig
    assert r["output_tokens"] == 16 and r["missed_counter_calls"] == 0 and r["mean_ttft_ms"] > 0
    dec = [s for s in r["per_step"] if "floor_ms" in s]
    assert dec and r["full_batch_steps"] >= 1
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    dt = 4  # float32
    for s in dec:
        assert L * K <= s["experts_hit"] <= L * min(E, s["batch"] * K)
        assert s["bytes"]["experts"] == s["experts_hit"] * 3 * spec.hidden_size * spec.moe_intermediate_size * dt
    kv_tok = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * dt
    for s in dec:  # sequences of 20 prompt tokens: 21..23 keys each while decoding 4 new tokens
        keys, rem = divmod(s["bytes"]["kv"], kv_tok)
        assert rem == 0 and 21 * s["batch"] <= keys <= 23 * s["batch"]
    md = eb.markdown(dict(runs=[r, dict(requests=8, error="x")], read_GBps=1.0))
    assert "| 4 x (20, 4) |" in md and "| 8 | x |" in md


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_engine_bench_prefill_graphs_ab_on_cpu(tmp_path, monkeypatch, temperature):
    """engine_bench's A/B of piecewise prefill graphs against eager prefill (same engine, same prompts):
    the baseline's TTFT is reported next to the graphs', and the tokens agree (greedy and sampled)."""
    from afsplit.config import load_config
    from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
    from afsplit.engine import LLMEngine

    from launch import engine_bench as eb

    monkeypatch.setitem(eb.SAMPLING, "temperature", temperature)
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")  # the graph code paths, uncaptured
    eng = LLMEngine(load_config("configs/tiny-1proc.yaml", ["runtime.max_num_seqs=4",
                                                            "runtime.max_num_batched_tokens=48"]))
    pw = eng.runner.piecewise
    assert pw is not None
    eb.warm_up(eng, 4, 20, 4, eng.spec.vocab_size, prefill_ab=True)  # eager pass, then two graph passes
    assert eng.runner.piecewise is pw and pw.calls >= 2
    calls = pw.calls
    counter = eb.ExpertHitCounter(eng.spec.num_moe_layers, eng.spec.num_experts, eng.device)
    try:
        r = eb.measure(eng, 4, 20, 4, counter, 1.0, lambda s: None, prefill_ab=True, async_ab=True)
    finally:
        counter.remove()
    assert eng.runner.piecewise is pw and pw.calls > calls
    assert r["tokens_identical_to_eager_prefill"] is True and "tokens" not in r
    assert r["tokens_identical_to_sync"] is True and r["sync_decode"]["decode_step_ms_median"] > 0
    assert eng.async_scheduling and r["full_batch_steps"] >= 1 and r["decode_step_gain_vs_sync"] > 0
    assert r["eager_prefill"]["mean_ttft_ms"] > 0 and r["mean_ttft_gain"] > 0
    assert "x | " in eb.markdown(dict(runs=[r], read_GBps=1.0))
    eb.profile_steps(eng, 4, 20, str(tmp_path / "profile.txt"), lambda s: None)  # --profile's tables
    text = (tmp_path / "profile.txt").read_text()
    assert "== prefill/mixed steps" in text and "== decode steps: 8 steps" in text


def test_tune_and_bench_flow_on_cpu(tmp_path, monkeypatch):
    """kernels/tune.py and kernels/bench.py run once, on a GPU; here their control flow runs on CPU
    (tiny shapes, the wrappers' torch references, stub timers): the table they write loads back,
    compile-only shards split the candidates between them, and every bench part produces rows."""
    import json
    import sys as _sys

    from kernels import _tuning, bench, tune

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    fake_t = iter(range(1, 10 ** 6))
    monkeypatch.setattr(bench, "time_graph", lambda fn, n_sets=1, **kw: (fn(0), next(fake_t) * 1e-6)[1])
    monkeypatch.setattr(bench, "time_eager_loop", lambda fn, n_sets=1, **kw: (fn(0), 2e-6)[1])
    monkeypatch.setattr(bench, "DECODE_SHAPES", [(2, 128, 4, 2)])
    monkeypatch.setattr(bench, "PREFILL_SHAPES", [(1, 32, 0, 4, 2), (1, 16, 16, 4, 2)])
    monkeypatch.setitem(bench.MOE_MODELS, "tiny", (4, 2, 32, 16))
    monkeypatch.setattr(bench, "MOE_SHAPES", [("tiny", 3), ("tiny", 40)])
    for name in ("DECODE_EXTRA", "PREFILL_EXTRA", "MOE_EXTRA"):
        monkeypatch.setattr(tune, name, [])
    out = tmp_path / "fake-gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CPU ops (the references' index_add_) are much slower threaded
    try:
        monkeypatch.setattr(_sys, "argv", ["tune.py", "--out", str(out), "--md", str(tmp_path / "t.md")])
        tune.main()
        table = json.loads(out.read_text())
        assert table["device"] == "cpu"
        kinds = {k: len(v) for k, v in table["tables"].items()}
        assert kinds == {"paged_decode_attention": 1, "flash_attention": 2, "fused_moe": 2}
        for entries in table["tables"].values():
            for e in entries:
                assert e["time_us"] > 0 and e["config"] and all("error" not in c for c in e["candidates"])
        assert "| fused_moe |" in (tmp_path / "t.md").read_text()
        # compile-only shards: every candidate of a shape runs in exactly one shard
        seen = []
        for shard in range(3):
            tune.Mode.compile_only, tune.Mode.shard, tune.Mode.shards = True, shard, 3
            seen += [json.dumps(r["config"], sort_keys=True) for e in tune.tune_moe(tune.Deadline(1e18), False,
                                                                                 lambda s: None) for r in e]
            got = []
            for r in tune.try_candidates(lambda c: torch.ones(1), [dict(BLOCK_N=i, num_splits=5) for i in range(12)],
                                         torch.ones(1), tune.Deadline(1e18), lambda s: None, "x")[0]:
                got.append(r["config"]["BLOCK_N"])
            seen.append(got)
        flat = sorted(i for g in seen if isinstance(g, list) for i in g)
        assert flat == list(range(12))
        ceil = {"read_GBps": 1.0, "copy_GBps": 1.0, "matmul_bf16_TFLOPs": 1.0}
        rows = bench.bench_decode(ceil, False, lambda s: None) + bench.bench_prefill(ceil, False, lambda s: None)
        rows += bench.bench_moe(ceil, False, lambda s: None)
    finally:
        torch.set_num_threads(threads)
        tune.Mode.compile_only, tune.Mode.shard, tune.Mode.shards = False, 0, 1
        monkeypatch.delenv(_tuning.ENV, raising=False)
        _tuning.reset()
    assert [r["kernel"] for r in rows] == ["decode", "prefill", "prefill", "fused_moe", "fused_moe"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert all("ceiling_exceeded" in r for r in rows if r["kernel"] == "decode")  # 1 GB/s "ceiling"
    md = bench.markdown(dict(bench.run_info(), ceilings=ceil, rows=rows))
    assert md.count("\n| ") >= 5
