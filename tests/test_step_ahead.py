"""Async scheduling (afsplit/step_ahead.py): launching the next decode step before reading this one gives the
tokens of the one-step-at-a-time loop, also when requests end early, wait, get preempted or are aborted."""

import os

import pytest
import torch

from afsplit import LLM, SamplingParams
from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
from afsplit.sequence import SeqStatus
from afsplit.step_ahead import PENDING


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return str(make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3", seed=4))


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 256, (int(k),), generator=g).tolist()}
            for k in torch.randint(1, 30, (n,), generator=g)]


def engine(tiny_dir, async_scheduling, **kw):
    llm = LLM(model=tiny_dir, async_scheduling=async_scheduling,
              **{"block_size": 4, "num_kv_blocks": 512, "max_num_batched_tokens": 64, **kw})
    e = llm.engine
    e.ahead_launches = 0
    launch_ahead = e._launch_ahead

    def counted(step):
        ahead = launch_ahead(step)
        e.ahead_launches += ahead is not None
        return ahead

    e._launch_ahead = counted
    return llm


def outputs(llm, reqs, params):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(reqs, params, use_tqdm=False)]


def mixed_params(greedy_tokens):
    """Greedy requests of several lengths, half of them ending early on a stop token that their own greedy
    continuation produces (so it ends them while a step runs ahead)."""
    out = []
    for i, toks in enumerate(greedy_tokens):
        n = 4 + 3 * (i % 5)
        stop = [toks[min(1 + i % 3, n - 2)]] if i % 2 else []
        out.append(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop_token_ids=stop))
    return out


@pytest.mark.parametrize("kw", [{}, {"max_num_seqs": 3}, {"num_kv_blocks": 24}, {"max_num_batched_tokens": 4}],
                         ids=["plain", "waiting", "preemption", "tiny-budget"])
def test_tokens_equal_the_synchronous_loop(tiny_dir, monkeypatch, kw):
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")  # the static decode path, uncaptured: what runs ahead on a GPU
    reqs = prompts(10)
    sync = engine(tiny_dir, False, **kw)
    params = mixed_params([toks for toks, _ in outputs(sync, reqs, SamplingParams(temperature=0, max_tokens=16,
                                                                                   ignore_eos=True))])
    want = outputs(sync, reqs, params)
    assert any(r == "stop" for _, r in want), "the stop token was meant to end some requests early"
    ahead = engine(tiny_dir, True, **kw)
    assert outputs(ahead, reqs, params) == want
    assert ahead.engine.ahead_launches > 0
    e = ahead.engine
    assert not e.has_unfinished_requests() and e.kv.num_free_blocks == e.kv.allocator.num_blocks
    if "num_kv_blocks" in kw:
        assert e.scheduler.num_preemptions > 0, "the KV cache was meant to force preemption"
    # the engine is reusable after a run that ended with a step ahead in flight
    assert outputs(ahead, reqs[:3], params[:3]) == want[:3]


def test_sampled_requests_run_ahead_with_the_synchronous_tokens(tiny_dir, monkeypatch):
    """Sampling is on the device (afsplit/sampler.py) and a draw depends only on (seed, position): sampled
    requests, seeded or not, mixed with greedy ones, run ahead and give the step-by-step loop's tokens."""
    reqs = prompts(6, seed=1)
    params = [SamplingParams(temperature=0.8, top_k=20, max_tokens=8, seed=5, ignore_eos=True),
              SamplingParams(temperature=1.1, top_p=0.7, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)] * 2
    eager = engine(tiny_dir, True)  # no static path on CPU: steps are read as they are launched
    outputs(eager, reqs, params)
    assert eager.engine.ahead_launches == 0
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    want = outputs(engine(tiny_dir, False), reqs, params)
    llm = engine(tiny_dir, True)
    assert outputs(llm, reqs, params) == want
    assert llm.engine.ahead_launches > 0


def test_abort_with_a_step_ahead_in_flight(tiny_dir, monkeypatch):
    """As the server aborts (between two steps): the aborted request's row of the step ahead is dropped; one
    aborted while its placeholder is out (a failure inside a step: run_to_completion aborts) loses it."""
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    llm = engine(tiny_dir, True)
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seqs = [e.add_request(p, params) for p in prompts(3, seed=2)]
    while not e._ahead:
        e.step()
    victim = seqs[1]
    assert victim in e._ahead.seqs  # the step in flight computes its next token
    n = len(victim.output_token_ids)
    assert e.abort_request(victim.request_id)
    assert PENDING not in victim.output_token_ids and victim.status is SeqStatus.FINISHED
    updates = []
    while e.has_unfinished_requests():
        updates += e.step()
    assert victim.request_id not in {u.request_id for u in updates}  # its row of the step ahead was dropped
    assert len(victim.output_token_ids) == n
    for s in (seqs[0], seqs[2]):
        assert len(s.output_token_ids) == 12 and PENDING not in s.output_token_ids
    assert e.kv.num_free_blocks == 512
    seq = e.add_request(prompts(1, seed=3)[0], params)
    while not e._ahead:
        e.step()
    seq.output_token_ids.append(PENDING)  # as _launch_ahead leaves it until the step before is read
    assert e.abort_request(seq.request_id) and PENDING not in seq.output_token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="TRITON_INTERPRET is set: run the GPU tests in their own process")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_captured_steps_ahead_give_the_synchronous_tokens(family, tmp_path):
    """On a GPU, with the decode graphs captured, tokens pinned to host memory and fed on the device: bf16
    greedy tokens equal the step-by-step loop's bit for bit, with requests ending at different steps,
    waiting ones joining as places free and several buckets. Only length ends here: those keep every
    step's batch the same in both loops (an EOS end adds a dropped row to the step ahead, and another
    batch shape may pick other kernels; the CPU tests cover it)."""
    from afsplit.models.tiny import make_tiny

    model = str(make_tiny(family, tmp_path / family, seed=6))
    reqs = prompts(12, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=3 + 2 * (i % 7), ignore_eos=True) for i in range(len(reqs))]

    def gpu_engine(async_scheduling):
        return engine(model, async_scheduling, dtype="bfloat16", device="cuda", max_num_seqs=8, block_size=16,
                      num_kv_blocks=128)

    want = outputs(gpu_engine(False), reqs, params)
    ahead = gpu_engine(True)
    for _ in range(2):  # the first round captures the buckets, the second replays them
        assert outputs(ahead, reqs, params) == want
    assert ahead.engine.ahead_launches > 0 and ahead.engine.runner.static.graphs.calls > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="TRITON_INTERPRET is set: run the GPU tests in their own process")
def test_launching_a_step_and_the_one_ahead_never_waits_for_the_gpu(tmp_path):
    """What runs between a replay being queued and the host reading the step before it (the runner's row index,
    sampling, the token copy, scheduling and filling the step ahead) has no synchronising call: one would
    make the host wait for the step just launched and leave nothing to overlap."""
    from afsplit.models.tiny import make_tiny

    model = str(make_tiny("qwen3_moe", tmp_path / "q3", seed=9))
    llm = engine(model, True, dtype="bfloat16", device="cuda", max_num_seqs=8, block_size=16, num_kv_blocks=64)
    e = llm.engine
    kinds = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True)]
    seqs = [e.add_request(p, kinds[i % 2]) for i, p in enumerate(prompts(4, seed=7))]
    e.async_scheduling = False  # until the prompts are in: no step in flight, the next is a plain decode step
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
        e.step()
    e.async_scheduling = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = e._launch(e.scheduler.schedule())
        ahead = e._launch_ahead(launched)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert launched.static and ahead is not None
    e._read(launched)
    e._ahead = ahead
    while e.has_unfinished_requests():
        e.step()
    assert all(len(s.output_token_ids) == 12 and PENDING not in s.output_token_ids for s in seqs)


def test_with_only_length_ends_every_step_has_the_synchronous_batch(tiny_dir, monkeypatch):
    """Requests ending by length free their places in the same step in both loops, so waiting requests join
    at the same step and every launched batch is the step-by-step loop's (what keeps bf16 bits equal)."""
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    reqs = prompts(9, seed=6)
    params = [SamplingParams(temperature=0, max_tokens=2 + 3 * (i % 4), ignore_eos=True) for i in range(len(reqs))]
    batches = {}
    for mode in (False, True):
        llm = engine(tiny_dir, mode, max_num_seqs=4)
        run, seen = llm.engine.runner.run, batches.setdefault(mode, [])

        def recording_run(batch, feed=None, run=run, seen=seen):
            seen.append([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens)])
            return run(batch, feed)

        llm.engine.runner.run = recording_run
        outputs(llm, reqs, params)
    assert batches[True] == batches[False]
    assert llm.engine.ahead_launches > 0
