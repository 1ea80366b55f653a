"""Reliability of the engine API: every bad sampling field fails its request alone with one line,
seeds depend only on the request's index, and an engine stays usable after a failed call."""

import math

import pytest
import torch

from afsplit import LLM, SamplingParams
from afsplit.errors import RequestError
from afsplit.sampling_params import GREEDY_BELOW, derive_seed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return str(make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3", seed=3))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(model=tiny_dir, num_kv_blocks=128, block_size=4, max_model_len=64)


def prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 256, (int(l),), generator=g).tolist()}
            for l in torch.randint(1, 20, (n,), generator=g)]


BAD_FIELDS = [  # (field, value, the message after "request 0: ") -- vLLM's SamplingParams rules
    ("temperature", math.nan, "temperature must be a finite number >= 0, got nan"),
    ("temperature", math.inf, "temperature must be a finite number >= 0, got inf"),
    ("temperature", -0.5, "temperature must be a finite number >= 0, got -0.5"),
    ("temperature", "hot", "temperature must be a finite number >= 0, got 'hot'"),
    ("temperature", True, "temperature must be a finite number >= 0, got True"),
    ("top_p", 0.0, "top_p must be a number in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be a number in (0, 1], got 1.5"),
    ("top_p", math.nan, "top_p must be a number in (0, 1], got nan"),
    ("top_k", -2, "top_k must be an integer: -1 or 0 (all tokens) or >= 1, got -2"),
    ("top_k", 2.5, "top_k must be an integer: -1 or 0 (all tokens) or >= 1, got 2.5"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),
    ("max_tokens", 1.5, "max_tokens must be an integer >= 1, got 1.5"),
    ("max_tokens", "3", "max_tokens must be an integer >= 1, got '3'"),
    ("seed", 1.5, "seed must be an integer or null, got 1.5"),
    ("seed", True, "seed must be an integer or null, got True"),
    ("ignore_eos", "yes", "ignore_eos must be true or false, got 'yes'"),
    ("ignore_eos", 1, "ignore_eos must be true or false, got 1"),
    ("stop_token_ids", [320], "stop_token_ids: token ids must be in [0, 320), got 320"),
    ("stop_token_ids", [-1], "stop_token_ids: token ids must be in [0, 320), got -1"),
    ("stop_token_ids", [1.0], "stop_token_ids must be a list of integers, got [1.0]"),
]


@pytest.mark.parametrize("field,value,message", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_each_bad_sampling_field_has_one_line(field, value, message):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value}).validate("request 0", vocab_size=320)
    assert str(e.value) == f"request 0: {message}"


def test_valid_edge_values_pass():
    for kw in ({"temperature": 0}, {"temperature": 1e-45}, {"temperature": 5.0}, {"top_p": 1}, {"top_k": -1},
               {"top_k": 0}, {"top_k": 1}, {"seed": -3}, {"seed": 2**70}, {"stop_token_ids": [0, 319]}):
        SamplingParams(**kw).validate("r", vocab_size=320)
    assert SamplingParams(temperature=1e-45).greedy and SamplingParams(temperature=GREEDY_BELOW / 2).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


def test_a_bad_request_fails_alone(llm):
    """NaN, inf and a bad top_p fail alone (the rest of the batch completes); 1e-45 samples greedily."""
    ps = prompts()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=math.nan, max_tokens=6), SamplingParams(temperature=1e-45, max_tokens=6,
              ignore_eos=True), SamplingParams(temperature=math.inf), SamplingParams(top_p=0.0),
              SamplingParams(temperature=0.7, max_tokens=6, seed=1)]
    outs = llm.generate(ps + [{"prompt_token_ids": [1, 2]}], params, use_tqdm=False)
    assert [o.error for o in outs] == [
        None, "request 1: temperature must be a finite number >= 0, got nan", None,
        "request 3: temperature must be a finite number >= 0, got inf", "request 4: top_p must be a number in (0, 1], got 0.0",
        None]
    ref = llm.generate([ps[2]], greedy, use_tqdm=False)[0]
    assert outs[2].outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(outs[5].outputs[0].token_ids) >= 1


def test_prompt_errors_name_the_request(llm):
    outs = llm.generate(["", {"prompt_token_ids": list(range(70))}, {"prompt_token_ids": [400]},
                        {"prompt_token_ids": "abc"}, 7], SamplingParams(max_tokens=2), use_tqdm=False)
    assert [o.error for o in outs] == [
        "request 0: empty prompt; give at least one token",
        "request 1: prompt has 70 tokens, max_model_len is 64; shorten it or raise model.max_model_len",
        "request 2: prompt: token ids must be in [0, 320), got 400",
        "request 3: prompt_token_ids must be a list of integers, got 'abc'",
        "request 4: a prompt must be a string or {'prompt_token_ids': [...]}, got int"]


def test_prompts_and_sampling_params_must_pair_up(llm):
    with pytest.raises(ValueError, match=r"^got 3 prompts but 2 SamplingParams; pass one SamplingParams for all "
                                         r"prompts or a list with one per prompt$"):
        llm.generate(prompts(3), [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 prompts but 2 SamplingParams"):
        llm.generate(prompts(1), [SamplingParams(), SamplingParams()], use_tqdm=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ahead", [False, True], ids=["step-by-step", "step-ahead"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_llm_is_usable_after_a_failed_generate(llm, tiny_dir, monkeypatch, exc, ahead):
    """An exception in the middle of generate (here: reading a step's tokens) used to leave a half-stepped
    request behind, and the next generate on the same LLM spun forever. With async scheduling the next
    step is then already launched, its requests holding placeholder tokens."""
    from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
    from afsplit.step_ahead import PENDING, LaunchedStep

    if ahead:
        monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")  # the decode path that runs ahead
        llm = LLM(model=tiny_dir, num_kv_blocks=128, block_size=4, max_model_len=64)

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts(3), params, use_tqdm=False)]
    real, calls = LaunchedStep.read_tokens, []

    def failing(step):  # reading the second step's tokens
        calls.append(1)
        if len(calls) == 2:
            raise exc("boom")
        return real(step)

    monkeypatch.setattr(LaunchedStep, "read_tokens", failing)
    with pytest.raises(exc):
        llm.generate(prompts(3), params, use_tqdm=False)
    eng = llm.engine
    assert not eng.has_unfinished_requests() and eng.kv.num_free_blocks == eng.kv.allocator.num_blocks
    assert (eng._ahead is not None) == ahead
    assert [o.outputs[0].token_ids for o in llm.generate(prompts(3), params, use_tqdm=False)] == ref
    assert all(PENDING not in s.output_token_ids for s in (eng._ahead.seqs if eng._ahead else []))


def test_seeds_depend_only_on_the_request_index(tiny_dir):
    """Unseeded sampled requests: the same tokens in a second call, after a warm-up call, with other
    batch limits, micro-batch counts and cache sizes (preemption); a given seed wins."""
    params = SamplingParams(temperature=0.9, top_k=40, max_tokens=6, ignore_eos=True)
    ps = prompts(4, seed=4)
    base = LLM(model=tiny_dir, num_kv_blocks=256, block_size=4)
    first = [o.outputs[0].token_ids for o in base.generate(ps, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in base.generate(ps, params, use_tqdm=False)] == first
    other = LLM(model=tiny_dir, num_kv_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                micro_batches=2)
    other.generate(ps[:2], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)  # a warm-up call
    assert [o.outputs[0].token_ids for o in other.generate(ps, params, use_tqdm=False)] == first
    assert other.engine.scheduler.num_preemptions > 0
    reseeded = LLM(model=tiny_dir, num_kv_blocks=256, block_size=4, seed=1)
    assert [o.outputs[0].token_ids for o in reseeded.generate(ps, params, use_tqdm=False)] != first
    assert derive_seed(0, 3) == derive_seed(0, 3) != derive_seed(0, 4) != derive_seed(1, 3)
    given = SamplingParams(temperature=0.9, top_k=40, max_tokens=6, ignore_eos=True, seed=11)
    a = base.generate([ps[0], ps[0]], given, use_tqdm=False)
    assert a[0].outputs[0].token_ids == a[1].outputs[0].token_ids


@pytest.mark.parametrize("scenario", ["silent", "dead"])
def test_control_plane_names_the_rank_that_failed(tmp_path, scenario):
    """comm/control.py: a silent rank is named after the deadline, a dead one at once, each with .peer."""
    import json

    import torch.multiprocessing as mp

    from tests.helpers.control_case import run

    mp.spawn(run, args=(scenario, str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    res = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3) if (tmp_path / f"rank{r}.json").exists()}
    if scenario == "silent":
        assert res[1] == {"broadcast_ok": True, "max_sending": 0} == res[2]
        assert res[0]["gather"] == [19, 20, 23] and res[0]["broadcast_ok"]
        assert res[0]["error"] == "step report: no answer from rank 2 (expert) within 2 s (rank 0 waiting)"
        assert res[0]["peer"] == 2 and 1.5 < res[0]["after_s"] < 4.5
    else:
        assert res[0]["error"] == "step report: rank 1 (attention) is gone (connection lost; rank 0 was waiting for it)"
        assert res[0]["peer"] == 1  # "is gone": the closed connection, not the deadline
        assert res[2]["error"] == "step plan: no answer from rank 0 (attention) within 2 s (rank 2 waiting)"
        assert res[2]["peer"] == 0


def test_load_test_requests_mix_every_kind_of_bad_line():
    """launch/load_test.py's workload (its result is docs/benchmarks/load-cpu-2node.md)."""
    import json

    from launch.load_test import BAD_KINDS, make_requests

    lines, bad = make_requests(len(BAD_KINDS) * 10, 10, seed=0)
    assert sorted(set(bad.values())) == sorted(k for k, _ in BAD_KINDS) and len(bad) == len(BAD_KINDS)
    for i, line in enumerate(lines):
        if bad.get(i) == "not JSON":
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
        else:
            assert "prompt_token_ids" in json.loads(line)


def test_the_launcher_names_the_rank_that_failed_first(tmp_path):
    """launch/local_cluster.explain_failure on the evidence a failed job leaves (2 nodes: 2A | 2E)."""
    import json

    from comm.topology import NodeSpec, Topology
    from launch.local_cluster import explain_failure

    topo = Topology((NodeSpec(attention=2), NodeSpec(expert=2)))

    def explain(ranks=(), nodes=(), stopped=()):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for r, rep in ranks:
            (d / f"rank{r}.json").write_text(json.dumps({"rank": r, "time": 0, **rep}))
        for k, node in nodes:
            (d / f"node{k}.json").write_text(json.dumps(node))
        return explain_failure(topo, str(d), set(stopped), 0, 1, 20.0)

    blame = lambda s: {"message": f"layer 0 dispatch: rank {s} (expert) is gone", "suspect": s, "exit_code": 1}
    node1_kill = (1, {"failures": {"3": {"exitcode": -9}, "2": {"exitcode": -15}}, "first": 3})
    # the killed rank, though its node-mate (SIGTERMed by its agent) and rank 0 blame rank 2
    assert explain([(0, blame(2)), (1, blame(3))], [node1_kill]) == (
        "rank 3 (expert, node 1) died (SIGKILL); all ranks stopped", 1)
    assert explain([(0, blame(1)), (2, blame(1))], stopped=[1]) == (
        "rank 1 (attention, node 0) is stopped (SIGSTOP?) and stopped answering; its peers gave up after "
        "comm.timeout_s = 20 s; all ranks stopped", 1)
    assert explain([], [(1, {"failures": {"2": {"exitcode": 1}}, "first": 2})]) == (
        "rank 2 (expert, node 1) exited with code 1; all ranks stopped", 1)
    same = {"message": "ckpt/model.safetensors: not a valid safetensors file", "suspect": None, "exit_code": 2}
    assert explain([(r, same) for r in range(4)]) == ("ckpt/model.safetensors: not a valid safetensors file", 2)
    lost = {"message": "RuntimeError: Connection closed by peer", "suspect": None, "exit_code": 1, "time": -1}
    assert explain([(0, lost), (2, same)]) == ("rank 2 (expert, node 1): ckpt/model.safetensors: not a valid "
                                               "safetensors file", 2)
    assert explain([(0, blame(3)), (1, blame(3)), (2, blame(1))]) == (
        "rank 3 (expert, node 1) failed or stopped answering (rank 0: layer 0 dispatch: rank 3 (expert) is gone); "
        "all ranks stopped", 1)
    assert explain([], [(0, {"error": "DistNetworkError: address already in use"})]) == (
        "node 0 (torchrun --node-rank 0) failed: DistNetworkError: address already in use", 1)
    assert explain() == ("node 0 (torchrun --node-rank 0) failed with exit code 1", 1)
