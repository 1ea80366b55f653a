"""Mixed steps: decode rows (1-token chunks, first in every scheduled batch) through the paged decode
kernel, prompt chunks through the prefill kernel, in one `ops.attention` call.

On CPU the kernels' torch references run, so this checks the real control flow of ops.attention
(split at `num_decodes`, the no-prefix path for whole prompts, one output): against a per-sequence
softmax over the gathered cache, then the engine's greedy tokens with requests arriving staggered
(every step mixes decodes, new prompts and chunked-prefill pieces) against whole-batch runs.
On CUDA the same layouts run the Triton kernels.
"""

from types import SimpleNamespace

import pytest
import torch

import kernels
from afsplit import LLM, SamplingParams, ops
from afsplit.model_runner import build_metadata
from afsplit.scheduler import ScheduledBatch, decodes_first
from kernels._testing import TOL, poisoned_alloc

BS = 4  # block size: lengths around multiples of it cross block boundaries
HQ, HKV, D = 4, 2, 16


def _batch(layout, gen, num_blocks=128):
    """A ScheduledBatch of stand-in sequences: (cached prefix, chunk length) each, scattered blocks."""
    free = torch.randperm(num_blocks, generator=gen).tolist()
    batch = ScheduledBatch()
    for prefix, n in layout:
        total = prefix + n
        table = [free.pop() for _ in range(-(-total // BS))]
        batch.seqs.append(SimpleNamespace(num_computed_tokens=prefix, token_ids=[0] * total, block_table=table,
                                          num_tokens=total))
        batch.num_tokens.append(n)
    return batch


def _reference(q, k_cache, v_cache, layout, tables, scale, window):
    """Per sequence: float64 softmax of its queries over keys 0..pos (within the window) gathered from the cache."""
    out, row = [], 0
    for (prefix, n), table in zip(layout, tables):
        pos = torch.arange(prefix + n)
        slots = torch.tensor(table)[pos // BS] * BS + pos % BS
        kk = k_cache.flatten(0, 1)[slots].double().repeat_interleave(HQ // HKV, dim=1)
        vv = v_cache.flatten(0, 1)[slots].double().repeat_interleave(HQ // HKV, dim=1)
        qpos = torch.arange(prefix, prefix + n)[:, None]
        allowed = pos[None, :] <= qpos
        if window is not None:
            allowed &= pos[None, :] > qpos - window
        s = torch.einsum("qhd,khd->hqk", q[row:row + n].double(), kk) * scale
        p = torch.softmax(s.masked_fill(~allowed[None], float("-inf")), dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", p, vv))
        row += n
    return torch.cat(out) if out else torch.zeros(0, HQ, D, dtype=torch.float64)


def _check(layout, window, gen, device="cpu", dtype=torch.float32, order=True):
    batch = _batch(layout, gen)
    if order:
        batch = decodes_first(batch)
    layout = [(s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_tokens)]
    _, meta, _ = build_metadata(batch, BS, device)
    T = sum(n for _, n in layout)
    k_cache = torch.randn(128, BS, HKV, D, generator=gen).to(device, dtype)  # the prefixes' (random) keys
    v_cache = torch.randn(128, BS, HKV, D, generator=gen).to(device, dtype)
    q, k, v = (torch.randn(T, h, D, generator=gen).to(device, dtype) for h in (HQ, HKV, HKV))
    ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = D ** -0.5
    with poisoned_alloc():  # a row no kernel writes comes out NaN
        out = ops.attention(q, k, v, k_cache, v_cache, meta, scale, window)
    ref = _reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), layout, [s.block_table for s in batch.seqs], scale,
                     window)
    assert out.shape == (T, HQ, D) and torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    return meta


def _random_layout(gen):
    """0-5 decodes (prefix 0 = a 1-token prompt), then 0-4 chunks: whole prompts, 1-token prompts or
    pieces of chunked prefills, lengths and prefixes around block boundaries."""
    def pick(choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    lens = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 23]
    decodes = [(pick([0, 1, 3, 4, 5, 8, 15, 16, 31, 40]), 1) for _ in range(int(torch.randint(6, (1,), generator=gen)))]
    chunks = [(pick([0, 0, 4, 7, 8, 12]), pick(lens)) for _ in range(int(torch.randint(5, (1,), generator=gen)))]
    return decodes + chunks


class _Spy:
    """Records which kernel ops.attention called with how many sequences (and the prefill path taken)."""

    def __init__(self, monkeypatch):
        self.calls = []
        dec, pre = kernels.paged_decode_attention, kernels.flash_attention

        def paged(q, k_cache, v_cache, block_tables, seq_lens, *a, **kw):
            self.calls.append(("decode", q.shape[0], block_tables.shape[0]))
            return dec(q, k_cache, v_cache, block_tables, seq_lens, *a, **kw)

        def flash(q, k, v, cu, k_cache, *a, **kw):
            self.calls.append(("prefill", cu.shape[0] - 1, k_cache is not None))
            return pre(q, k, v, cu, k_cache, *a, **kw)

        monkeypatch.setattr(kernels, "paged_decode_attention", paged)
        monkeypatch.setattr(kernels, "flash_attention", flash)


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_layouts_match_reference(window, monkeypatch):
    gen = torch.Generator().manual_seed(11 if window is None else 12)
    spy = _Spy(monkeypatch)
    fixed = [
        [(37, 1), (0, 1), (4, 1), (0, 9), (8, 4), (0, 1)],  # decodes, a prompt, a piece, a 1-token prompt
        [(3, 1), (0, 16), (0, 5)],  # decodes + whole prompts: the no-prefix path for the prompts
        [(0, 7), (12, 3)],  # no decodes
        [(15, 1), (16, 1), (0, 1)],  # decodes only
        [(0, 1), (0, 1), (0, 4)],  # 1-token prompts (prefix 0) as decode rows
    ]
    for layout in fixed + [_random_layout(gen) for _ in range(24)]:
        if not layout:
            continue
        spy.calls.clear()
        meta = _check(layout, window, gen)
        nd, B = meta.num_decodes, meta.num_seqs
        ordered = sorted(layout, key=lambda c: c[1] != 1)
        assert nd == sum(1 for _, n in layout if n == 1), layout  # the ordering puts every 1-token chunk first
        assert meta.max_seqlen_q == max(n for _, n in layout)
        rest = ordered[nd:]
        assert meta.whole_prompts == (bool(rest) and all(p == 0 for p, _ in rest))
        expect = []
        if nd < B:
            expect.append(("prefill", B - nd, not meta.whole_prompts))
        if nd:
            expect.append(("decode", nd, nd))
        assert spy.calls == expect, layout


def test_unordered_batch_and_edge_cases(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    spy = _Spy(monkeypatch)
    # 1-token chunks after a prompt chunk (a batch not from the scheduler): they go with the prompts
    meta = _check([(5, 1), (0, 6), (9, 1), (4, 1), (0, 3)], 4, gen, order=False)
    assert meta.num_decodes == 1 and not meta.whole_prompts
    assert spy.calls == [("prefill", 4, True), ("decode", 1, 1)]
    # decode_only False but every chunk one token: only the decode kernel
    spy.calls.clear()
    batch = _batch([(6, 1), (0, 1)], gen)
    _, meta, _ = build_metadata(batch, BS, "cpu")
    meta.decode_only = False
    q = torch.randn(2, HQ, D, generator=gen)
    kc = torch.randn(128, BS, HKV, D, generator=gen)
    out = ops.attention(q, q[:, :HKV], q[:, :HKV], kc, kc.clone(), meta, 0.25, None)
    assert out.shape == (2, HQ, D) and spy.calls == [("decode", 2, 2)]
    # an empty step (a runtime attention rank with nothing scheduled)
    _, meta, _ = build_metadata(ScheduledBatch(), BS, "cpu")
    assert meta.decode_only and meta.num_decodes == 0 and meta.max_seqlen_q == 0
    e = torch.zeros(0, HQ, D)
    assert ops.attention(e, e[:, :HKV], e[:, :HKV], kc, kc, meta, 0.25, None).shape == (0, HQ, D)


def test_decodes_first_is_a_stable_partition():
    batch = ScheduledBatch(seqs=list("abcdef"), num_tokens=[5, 1, 3, 1, 1, 2], block_copies=[(1, 2)])
    out = decodes_first(batch)
    assert out.seqs == list("bdeacf") and out.num_tokens == [1, 1, 1, 5, 3, 2] and out.block_copies == [(1, 2)]
    same = ScheduledBatch(seqs=list("ab"), num_tokens=[1, 4])
    assert decodes_first(same).seqs == ["a", "b"]


def _interpreted() -> bool:
    """Whether the Triton kernels run under the interpreter here (TRITON_INTERPRET=1 before triton's import,
    as `make test` sets it)."""
    import importlib

    fa, pd = (importlib.import_module(f"kernels.{m}") for m in ("flash_attention", "paged_decode_attention"))
    return getattr(fa, "HAS_TRITON", False) and all(
        type(getattr(m, name, None)).__name__ == "InterpretedFunction"
        for m, name in ((fa, "_flash_fwd_kernel"), (pd, "_decode_split_kernel")))


@pytest.mark.parametrize("window", [None, 3])
def test_mixed_layouts_triton_interpreted(window, monkeypatch):
    """The Triton kernels themselves on CPU (interpreter, float32): the prefill kernel reads the prompt rows
    of the whole q/k/v through cu_seqlens_q[num_decodes:], which starts at num_decodes, not 0."""
    if not _interpreted():
        pytest.skip("needs triton under TRITON_INTERPRET=1 (set before triton is imported, as `make test` does)")
    monkeypatch.setattr(ops, "_backend", lambda: "triton")
    gen = torch.Generator().manual_seed(31 if window is None else 32)
    for layout in ([(9, 1), (0, 1), (4, 1), (0, 5), (6, 3)], [(3, 1), (0, 6), (0, 2)], [(0, 7), (5, 1)]):
        _check(layout, window, gen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_layouts_triton(dtype, window):
    gen = torch.Generator().manual_seed(21)
    for layout in [[(37, 1), (0, 1), (4, 1), (0, 9), (8, 4), (0, 1)], [(3, 1), (0, 160), (0, 5)],
                   [(300, 1), (0, 1), (0, 200)]] + [_random_layout(gen) for _ in range(8)]:
        if layout:
            _check(layout, window, gen, device="cuda", dtype=dtype)


# ------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("mixed")
    return {"qwen3_moe": str(make_tiny("qwen3_moe", root / "qwen3", seed=4)),
            "mixtral-window6": str(make_tiny("mixtral", root / "mixtral", seed=4, sliding_window=6)),
            "deepseek_v2": str(make_tiny("deepseek_v2", root / "dsv2", seed=4))}


PROMPT_LENS = [9, 1, 17, 4, 13, 1, 8, 30]


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in PROMPT_LENS]


def _staggered(model, params, every=2, **kw):
    """Requests arriving one every `every` steps with a small token budget: steps mix decodes, new
    prompts and chunked-prefill pieces. Returns (tokens per request, num_tokens of every step)."""
    llm = LLM(model=model, block_size=BS, num_kv_blocks=256, max_num_batched_tokens=7, **kw)
    engine, steps = llm.engine, []
    run = engine.runner.run

    def recording_run(batch, feed=None):
        steps.append(list(batch.num_tokens))
        return run(batch, feed)

    engine.runner.run = recording_run
    pending, seqs, step = _prompts(), [], 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            seqs.append(engine.add_request(pending.pop(0), params))
        engine.step()
        step += 1
    return [s.output_token_ids for s in seqs], steps


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral-window6", "deepseek_v2"])
def test_staggered_arrivals_give_the_same_greedy_tokens(name, models, monkeypatch):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(model=models[name], block_size=BS, num_kv_blocks=256, max_num_batched_tokens=512,
              chunked_prefill=False, max_model_len=256)
    base = [o.outputs[0].token_ids for o in llm.generate(_prompts(), greedy, use_tqdm=False)]
    splits = []  # (num_decodes, sequences) of every attention call of a step with prompt chunks
    if name == "deepseek_v2":
        from afsplit.models import mla

        inner = mla._mixed
        monkeypatch.setattr(mla, "_mixed", lambda spec, w, q, c, meta: (
            splits.append((meta.num_decodes, meta.num_seqs)), inner(spec, w, q, c, meta))[1])
    else:
        inner = ops.attention
        monkeypatch.setattr(ops, "attention", lambda q, k, v, kc, vc, meta, *a: (
            splits.append((meta.num_decodes, meta.num_seqs)), inner(q, k, v, kc, vc, meta, *a))[1])
    tokens, steps = _staggered(models[name], greedy)
    assert tokens == base
    assert any(0 < nd < b for nd, b in splits), "no attention call split decodes from prompt chunks"
    assert any(1 in s and max(s) > 1 for s in steps), "no step mixed decodes and prompt chunks"
    assert all(s == sorted(s, key=lambda n: n != 1) for s in steps), "a batch was not ordered decodes-first"
    if name == "qwen3_moe":  # the piecewise prefill + static decode code paths (uncaptured on CPU)
        from afsplit.cuda_graphs import STATIC_ON_CPU_ENV

        monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
        assert _staggered(models[name], greedy)[0] == base


def test_mixed_attn_ab_builds_matching_paths():
    """launch/mixed_attn_ab.py's inputs on CPU (the kernels' torch references): the old one-call path, the
    engine's split path and the prompts alone agree on their rows."""
    from launch.mixed_attn_ab import build, paths

    tensors, meta = build([5, 9, 17], [(0, 7), (3, 4)], "cpu", torch.float32, hq=4, hk=2, d=16, page=4)
    assert meta.num_decodes == 3 and not meta.whole_prompts
    old, new, alone = paths(tensors, meta, 0.25)
    a, b = old(), new()
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(alone()[3:], a[3:], atol=1e-5, rtol=1e-5)
