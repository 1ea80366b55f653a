"""CPU tests of the MLA and grouped-routing kernels: each Triton kernel (under TRITON_INTERPRET=1)
against its torch reference and both against straightforward float64 loops, on fresh random
inputs with poisoned outputs, float32 / float16 (bf16 runs in tests/test_mla_kernels_gpu.py).
"""

import os
import sys

# The interpreter must be chosen before triton is imported anywhere in this process.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels._testing import TOL, make_paged_cache, poisoned_alloc, randn, rel_err  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    return g


def _interpreted(mod, kernel: str):
    if not getattr(mod, "HAS_TRITON", False):
        pytest.skip("triton not importable")
    if type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file in its own process")


# ---------------------------------------------------------------- float64 straightforward versions

def mla_decode_f64(q, cache, block_tables, seq_lens, scale, R):
    """Loop over sequences, heads and cached tokens."""
    q, cache = q.double(), cache.double()
    B, HQ, L = q.shape
    page = cache.shape[1]
    out = torch.empty(B, HQ, R, dtype=torch.float64)
    for b in range(B):
        lat = torch.stack([cache[int(block_tables[b, j // page]), j % page, 0] for j in range(int(seq_lens[b]))])
        for h in range(HQ):
            s = torch.tensor([scale * float(q[b, h] @ lat[j]) for j in range(lat.shape[0])], dtype=torch.float64)
            p = torch.exp(s - s.max())
            out[b, h] = (p[:, None] * lat[:, :R]).sum(0) / p.sum()
    return out


def mla_prefill_f64(q, k_nope, k_pe, v, cu_q, cu_k, scale):
    q, k_nope, k_pe, v = q.double(), k_nope.double(), k_pe.double(), v.double()
    T, HQ, _ = q.shape
    DN = k_nope.shape[-1]
    out = torch.empty(T, HQ, v.shape[-1], dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        for i in range(q1 - q0):
            visible = range(k0, k0 + (k1 - k0) - (q1 - q0) + i + 1)
            for h in range(HQ):
                s = torch.stack([scale * (q[q0 + i, h, :DN] @ k_nope[j, h] + q[q0 + i, h, DN:] @ k_pe[j])
                                 for j in visible])
                p = torch.exp(s - s.max())
                out[q0 + i, h] = (p[:, None] * v[list(visible), h]).sum(0) / p.sum()
    return out


def grouped_topk_f64(logits, k, scoring, n_group, topk_group, group_rank, bias, renorm, scaling):
    """Per token: sort experts / groups by hand (ties -> lower index)."""
    ld = logits.double()
    T, E = ld.shape
    gs = E // n_group
    ws, ids = torch.empty(T, k, dtype=torch.float64), torch.empty(T, k, dtype=torch.int64)
    for t in range(T):
        p = torch.softmax(ld[t], -1) if scoring == "softmax" else torch.sigmoid(ld[t])
        c = p + (bias.double() if bias is not None else 0)
        groups = list(range(n_group))
        if n_group > 1:
            def gscore(g):
                vals = sorted(c[g * gs:(g + 1) * gs].tolist(), reverse=True)
                return vals[0] if group_rank == "max" else vals[0] + vals[1]
            groups = sorted(range(n_group), key=lambda g: (-gscore(g), g))[:topk_group]
        eligible = [e for e in range(E) if e // gs in groups]
        order = sorted(eligible, key=lambda e: (-c[e].item(), e))[:k]
        ids[t] = torch.tensor(order)
        w = p[order]
        ws[t] = (w / (w.sum() + 1e-20) if renorm else w) * scaling
    return ws, ids


# ---------------------------------------------------------------- grouped top-k

ROUTERS = {
    # name: (E, top_k, scoring, n_group, topk_group, group_rank, bias, renormalize, scaling)
    "v2-greedy": (16, 3, "softmax", 1, 1, "max", False, False, 1.0),
    "v2-group-limited-160/8": (160, 6, "softmax", 8, 3, "max", False, False, 16.0),  # DeepSeek-V2 (groups of 20)
    "v3-256/8": (256, 8, "sigmoid", 8, 4, "top2_sum", True, True, 2.5),  # DeepSeek-V3
    "v3-one-group-no-norm": (12, 4, "sigmoid", 1, 1, "top2_sum", True, False, 1.0),
    "v3-groups-of-2-top-all": (8, 4, "sigmoid", 4, 2, "top2_sum", True, True, 1.0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROUTERS))
def test_grouped_topk(case, dtype, gen):
    mod = importlib.import_module("kernels.grouped_topk")
    _interpreted(mod, "_grouped_topk_kernel")
    E, K, scoring, ng, tg, rank, has_bias, renorm, scaling = ROUTERS[case]
    T = 37
    logits = randn(T, E, dtype=dtype, gen=gen, scale=2.0)
    bias = randn(E, gen=gen, scale=0.3) if has_bias else None
    args = (K, scoring, ng, tg, rank, bias, renorm, scaling)
    with poisoned_alloc():
        w, ids = mod.grouped_topk(logits, *args, backend="triton")
    w_ref, ids_ref = mod.grouped_topk_ref(logits, *args)
    w64, ids64 = grouped_topk_f64(logits, *args)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ids64) and torch.equal(ids_ref.long(), ids64)
    assert rel_err(w, w64) < 1e-5 and rel_err(w_ref, w64) < 1e-5


def test_grouped_topk_empty_and_validation(gen):
    from kernels.grouped_topk import grouped_topk

    w, ids = grouped_topk(torch.zeros(0, 8), 2, "sigmoid", 4, 2, "top2_sum", backend="ref")
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    with pytest.raises(ValueError, match=r"n_group must be an int >= 1 dividing E=10"):
        grouped_topk(torch.zeros(3, 10), 2, "softmax", 4, 2)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
        grouped_topk(torch.zeros(3, 8), 5, "softmax", 4, 2)
    with pytest.raises(ValueError, match=r"top2_sum needs >= 2 experts per group"):
        grouped_topk(torch.zeros(3, 8), 1, "sigmoid", 8, 2, "top2_sum")


# ---------------------------------------------------------------- paged MLA decode

DECODE_CASES = {
    # name: (seq lens, Hq, R, DR, page, splits, config)
    "v3-shape-R512-DR64": ([1, 17, 40], 16, 512, 64, 16, None, None),
    "tiny-R32-DR8-page4": ([1, 4, 5, 33], 4, 32, 8, 4, None, None),
    "heads-not-multiple-of-16": ([9, 2], 20, 64, 16, 8, 1, None),
    "split-at-block-boundary": ([48, 16, 3], 16, 32, 32, 16, 3, None),
    # the GPU tiles' paths: block-table prefetch, 3 head blocks sharing a slice, splits that do not
    # divide the context (last split short or empty), context 1, batch 1
    "prefetch-3-head-blocks-uneven-splits": ([1, 37, 64, 100], 40, 32, 16, 16, 5,
                                             dict(PREFETCH=True, BLOCK_N=32, num_stages=2)),
    "prefetch-batch-1-context-1": ([1], 16, 64, 16, 16, 2, dict(PREFETCH=True)),
    "prefetch-batch-1-many-splits": ([250], 16, 64, 16, 16, 7, dict(PREFETCH=True, BLOCK_N=16)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_mla_decode(case, dtype, gen):
    mod = importlib.import_module("kernels.mla_decode")
    _interpreted(mod, "_mla_decode_kernel")
    lens, HQ, R, DR, page, splits, config = DECODE_CASES[case]
    cache, _, bt = make_paged_cache(lens, page, 1, R + DR, dtype, gen=gen)  # one latent "head"
    q = randn(len(lens), HQ, R + DR, dtype=dtype, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1 / math.sqrt(R + DR) * 4  # peaky softmax
    with poisoned_alloc():
        out = mod.mla_decode(q, cache, bt, seq_lens, scale, R, num_splits=splits, backend="triton", config=config)
    ref = mod.mla_decode_ref(q, cache, bt, seq_lens, scale, R)
    ref64 = mla_decode_f64(q, cache, bt, seq_lens, scale, R)
    assert out.shape == (len(lens), HQ, R) and out.dtype == dtype
    assert rel_err(out, ref64) < TOL[dtype], rel_err(out, ref64)
    assert rel_err(ref, ref64) < TOL[dtype]


def test_mla_num_splits_fills_waves():
    """The split rule from shapes: one split when the batch already fills the SMs, a whole wave of
    programs otherwise, never more splits than MIN_CHUNK-key pieces of the context, nor than MAX_SPLITS."""
    from kernels.mla_decode import MIN_CHUNK, mla_num_splits
    from kernels.paged_decode_attention import MAX_SPLITS

    args = dict(num_sms=132, block_n=32, ctas_per_sm=2, heads=16, kv_lora_rank=512, latent=576)
    assert mla_num_splits(256, 1, 4096, **args) == 1
    assert mla_num_splits(64, 1, 4096, **args) == 4  # 256 programs on 264 slots
    assert mla_num_splits(1, 1, 1, **args) == 1
    for B in (1, 3, 16, 64):
        for n in (1, 300, 4096, 1 << 20):
            s = mla_num_splits(B, 1, n, **args)
            assert 1 <= s <= min(MAX_SPLITS, -(-n // MIN_CHUNK))


def test_mla_decode_validation():
    from kernels.mla_decode import mla_decode

    q = torch.zeros(2, 4, 40)
    with pytest.raises(ValueError, match=r"cache has shape .* expected dim 3 == 40"):
        mla_decode(q, torch.zeros(3, 4, 1, 39), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                   1.0, 32)
    with pytest.raises(ValueError, match=r"kv_lora_rank must be an int in \[1, 40\)"):
        mla_decode(q, torch.zeros(3, 4, 1, 40), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                   1.0, 40)


# ---------------------------------------------------------------- MLA prefill

PREFILL_CASES = {
    # name: ([(Lq, Lk)], Hq, DN, DR, DV)
    "v3-dims-one-prompt": ([(37, 37)], 2, 128, 64, 128),
    "tiny-dims-with-prefix": ([(5, 5), (3, 20), (1, 9), (16, 16)], 3, 16, 8, 16),
    "odd-dims-dv-ne-dn": ([(17, 40), (33, 33)], 2, 24, 8, 40),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_mla_prefill(case, dtype, gen):
    mod = importlib.import_module("kernels.mla_prefill")
    _interpreted(mod, "_mla_prefill_kernel")
    seqs, HQ, DN, DR, DV = PREFILL_CASES[case]
    cu_q = torch.tensor([0] + [lq for lq, _ in seqs]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [lk for _, lk in seqs]).cumsum(0).to(torch.int32)
    T, Nk = int(cu_q[-1]), int(cu_k[-1])
    q = randn(T, HQ, DN + DR, dtype=dtype, gen=gen)
    kv = randn(Nk, HQ, DN + DV, dtype=dtype, gen=gen)  # expanded keys/values as the model lays them out
    lat = randn(Nk, 7 + DR, dtype=dtype, gen=gen)  # k_pe is the tail of the gathered latents
    k_nope, v, k_pe = kv[..., :DN], kv[..., DN:], lat[:, 7:]
    scale = 2 / math.sqrt(DN + DR)
    with poisoned_alloc():
        out = mod.mla_prefill(q, k_nope, k_pe, v, cu_q, cu_k, scale, backend="triton")
    ref = mod.mla_prefill_ref(q, k_nope, k_pe, v, cu_q, cu_k, scale)
    ref64 = mla_prefill_f64(q, k_nope, k_pe, v, cu_q, cu_k, scale)
    assert out.shape == (T, HQ, DV)
    assert rel_err(out, ref64) < TOL[dtype], rel_err(out, ref64)
    assert rel_err(ref, ref64) < TOL[dtype]
