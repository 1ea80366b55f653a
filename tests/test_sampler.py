"""afsplit/sampler.py: the batched device sampler against per-row torch references and the distribution it
must draw from; a draw depends only on (seed, position)."""

import math

import pytest
import torch

import afsplit.sampler as sampler
from afsplit.sampler import exponentials, filtered_probs, sample
from afsplit.sampling_params import SamplingParams, token_seed
from afsplit.sequence import Sequence


def seq(params, seed=0, generated=0):
    s = Sequence(0, [1], params, seed)
    s.output_token_ids = [0] * generated
    return s


def reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, written out plainly: temperature, the k largest kept, the smallest nucleus reaching p kept."""
    scaled = row.double() / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        mass = 0.0
        for v in order.tolist():
            keep[v] = True
            mass += float(probs[v])
            if mass >= top_p:
                break
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def test_filtered_probs_match_the_per_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    settings = [(1.0, 50, 1.0), (0.7, 5, 1.0), (1.3, 50, 0.8), (0.5, 10, 0.5), (2.0, 1, 1.0), (1.0, 49, 0.95)]
    got = filtered_probs(logits, [t for t, _, _ in settings], [k for _, k, _ in settings], [p for _, _, p in settings])
    for b, (t, k, p) in enumerate(settings):
        torch.testing.assert_close(got[b].double(), reference_probs(logits[b], t, k, p), atol=1e-6, rtol=1e-5)


def test_exponentials_are_a_pure_function_of_key_and_index_and_look_exponential():
    keys = torch.tensor([token_seed(s, i) for s in range(3) for i in range(4)], dtype=torch.int64)
    e = exponentials(keys, 5000)
    assert torch.equal(e, exponentials(keys.flip(0), 5000).flip(0))  # row order does not matter
    assert torch.equal(e[:, :100], exponentials(keys, 100))  # nor the vocabulary's size for a given index
    assert bool((e > 0).all()) and bool(torch.isfinite(e).all())
    assert abs(float(e.mean()) - 1.0) < 0.02 and abs(float(e.var()) - 1.0) < 0.05  # Exp(1): mean 1, variance 1
    assert len({tuple(r[:8].tolist()) for r in e}) == len(keys)  # different keys, different streams


def test_draws_follow_the_filtered_distribution():
    """4000 draws from one row with different seeds: frequencies within 5 sigma of the filtered probabilities."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    n = 4000
    for t, k, p in [(1.0, -1, 1.0), (0.6, 3, 1.0), (1.0, -1, 0.7)]:
        params = SamplingParams(temperature=t, top_k=k, top_p=p)
        seqs = [seq(params, seed=s) for s in range(n)]
        tokens = sample(logits.expand(n, -1), seqs)
        freq = torch.bincount(tokens, minlength=6).double() / n
        want = reference_probs(logits, t, k, p)
        for v in range(6):
            sigma = math.sqrt(max(float(want[v]) * (1 - float(want[v])), 1e-12) / n)
            assert abs(float(freq[v]) - float(want[v])) <= 5 * sigma + 1e-9, (t, k, p, v, freq, want)


def test_a_draw_depends_only_on_seed_and_position(monkeypatch):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    seqs = [seq(params, seed=10 + b, generated=b) for b in range(4)] + [seq(SamplingParams(temperature=0), 3)]
    tokens = sample(logits, seqs)
    assert int(tokens[4]) == int(logits[4].argmax())  # greedy rows: the argmax
    alone = [int(sample(logits[b:b + 1], [seqs[b]])[0]) for b in range(5)]
    assert tokens.tolist() == alone  # whatever the batch
    moved = sample(logits, seqs, positions=[b + 1 for b in range(5)])  # another position: another draw
    assert moved.tolist() != tokens.tolist()
    assert sample(logits, seqs, positions=list(range(5))).tolist() == tokens.tolist()  # the default position
    monkeypatch.setattr(sampler, "MAX_ELEMENTS", 300)  # one row per chunk
    assert sample(logits, seqs).tolist() == tokens.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_row_greedy_is_one_argmax(dtype):
    logits = torch.randn(3, 40).to(dtype)
    greedy = SamplingParams(temperature=0)
    assert torch.equal(sample(logits, [seq(greedy)] * 3), logits.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_the_draws_are_the_cpus_and_nothing_waits():
    """The same (seed, position) gives the CPU's token on CUDA (integer hash; float ops may differ by an ulp,
    which could flip a near tie: 1 row in 64 allowed), and sampling a step never synchronises the stream."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 1000, generator=g) * 2
    kinds = [SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=1.0, top_p=0.9),
             SamplingParams(temperature=0), SamplingParams(temperature=1.2)]
    seqs = [seq(kinds[b % 4], seed=100 + b, generated=b % 7) for b in range(64)]
    cpu = sample(logits, seqs)
    dev = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        got = sample(dev, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.is_cuda and int((got.cpu() == cpu).sum()) >= 63
