"""The reference engine: scheduling invariance, sampling, bad requests, CLI."""

import json

import pytest
import torch

from afsplit import LLM, SamplingParams
from afsplit.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return str(make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3", seed=3))


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 256, (int(l),), generator=g).tolist()}
            for l in torch.randint(1, 40, (n,), generator=g)]


def run(tiny_dir, params, **kw):
    llm = LLM(model=tiny_dir, block_size=4, **kw)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine.scheduler.num_preemptions


def test_outputs_identical_with_preemption_and_chunked_prefill(tiny_dir):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base, pre = run(tiny_dir, greedy, num_kv_blocks=512, max_num_batched_tokens=4096, chunked_prefill=False,
                    max_model_len=256)
    assert pre == 0
    chunked, _ = run(tiny_dir, greedy, num_kv_blocks=512, max_num_batched_tokens=7)
    assert chunked == base
    tight, preemptions = run(tiny_dir, greedy, num_kv_blocks=20, max_num_batched_tokens=64)
    assert preemptions > 0, "the KV cache was meant to force preemption"
    assert tight == base
    micro, _ = run(tiny_dir, greedy, num_kv_blocks=512, max_num_batched_tokens=64, micro_batches=3)
    assert micro == base


def test_micro_batch_split_balances_tokens_and_keeps_order():
    from afsplit.model_runner import split_micro_batches
    from afsplit.scheduler import ScheduledBatch

    def split(num_tokens, m):
        batch = ScheduledBatch(seqs=list(range(len(num_tokens))), num_tokens=list(num_tokens))
        parts = split_micro_batches(batch, m)
        assert sum((p.seqs for p in parts), []) == batch.seqs  # contiguous, in order, nothing lost
        return [p.num_tokens for p in parts]

    assert split([1] * 8, 2) == [[1] * 4, [1] * 4]
    assert split([1] * 7, 3) == [[1, 1, 1], [1, 1], [1, 1]]
    assert split([1, 1, 1, 1, 60], 2) == [[1, 1, 1, 1], [60]]  # the chunk gets the part it fills
    assert split([1, 60], 2) == [[1], [60]]
    assert split([5], 2) == [[5], []]  # fewer sequences than parts
    assert split([], 2) == [[], []]


def test_bucket_rule():
    from afsplit.cuda_graphs import bucket_for, graph_buckets, step_tokens_hint

    assert graph_buckets(20) == [1, 2, 4, 8, 16, 24]
    assert [bucket_for(n, 64) for n in (1, 3, 8, 9, 17, 64, 65)] == [1, 4, 8, 16, 24, 64, None]
    assert step_tokens_hint(5, True, 64, 4096) == (8, True)
    assert step_tokens_hint(5, False, 64, 4096) == (5, False)  # a prefill somewhere: exact size, eager
    assert step_tokens_hint(0, True, 64, 4096) == (0, False)  # nobody has work
    assert step_tokens_hint(70, True, 64, 4096) == (70, False)  # beyond the largest bucket
    assert step_tokens_hint(5, True, 64, 6) == (5, False)  # bucket larger than the comm buffers


def test_static_decode_path_matches_eager(tiny_dir, monkeypatch):
    """The CUDA-graph code path (bucket-padded static inputs, padding rows masked), run uncaptured on CPU,
    gives the eager engine's tokens, with and without micro-batches and with preemption."""
    from afsplit.cuda_graphs import STATIC_ON_CPU_ENV

    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = prompts(n=8)
    base = [o.outputs[0].token_ids for o in LLM(model=tiny_dir, block_size=4, num_kv_blocks=512).generate(
        reqs, greedy, use_tqdm=False)]
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    # budget 4 with 8 prompts: decodes + a 1-token mid-prompt chunk (static path; that chunk must not sample)
    for kw in ({}, {"micro_batches": 2}, {"num_kv_blocks": 20}, {"max_num_batched_tokens": 4}):
        llm = LLM(model=tiny_dir, block_size=4, **{"num_kv_blocks": 512, "max_num_batched_tokens": 64, **kw})
        outs = llm.generate(reqs, greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == base, kw
        assert llm.engine.runner.static.graphs.calls > 0


def test_seeded_sampling_is_reproducible_and_independent_of_batching(tiny_dir):
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    a, _ = run(tiny_dir, params, num_kv_blocks=512)
    b, pre = run(tiny_dir, params, num_kv_blocks=20, max_num_batched_tokens=5)
    assert pre > 0 and a == b
    c, _ = run(tiny_dir, SamplingParams(temperature=0.8, seed=8, max_tokens=16, ignore_eos=True), num_kv_blocks=512)
    assert c != a


def test_stop_tokens_and_max_tokens(tiny_dir):
    llm = LLM(model=tiny_dir, num_kv_blocks=64)
    first = llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    toks = first.outputs[0].token_ids
    assert len(toks) == 5 and first.outputs[0].finish_reason == "length"
    stopped = llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[toks[2]]),
                           use_tqdm=False)[0]
    assert stopped.outputs[0].token_ids == toks[:toks.index(toks[2]) + 1]
    assert stopped.outputs[0].finish_reason == "stop"


def test_bad_requests_fail_alone(tiny_dir):
    llm = LLM(model=tiny_dir, num_kv_blocks=64, max_model_len=32)
    good = {"prompt_token_ids": [5, 6, 7]}
    outs = llm.generate(
        [good, "", {"prompt_token_ids": list(range(40))}, good, {"prompt_token_ids": [10**6]}],
        [SamplingParams(temperature=0, max_tokens=4), SamplingParams(), SamplingParams(),
         SamplingParams(max_tokens=0), SamplingParams(max_tokens=4)], use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) >= 1
    assert "empty prompt" in outs[1].error
    assert "prompt has 40 tokens, max_model_len is 32" in outs[2].error
    assert "max_tokens must be an integer >= 1" in outs[3].error
    assert "token ids must be in [0, 320)" in outs[4].error


def test_text_prompts_round_trip_through_tokenizer(tiny_dir):
    llm = LLM(model=tiny_dir, num_kv_blocks=64)
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == list(b"hello") and isinstance(out.outputs[0].text, str)


def test_checkpoint_errors(tiny_dir, tmp_path):
    import shutil

    from afsplit.models.spec import read_model_spec

    with pytest.raises(CheckpointError, match="config.json: not found"):
        read_model_spec(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama4")))
    with pytest.raises(CheckpointError, match="model_type 'llama4' is not supported; supported: qwen3_moe"):
        LLM(model=str(bad))
    (bad / "config.json").write_text(json.dumps(dict(cfg, moe_intermediate_size=50)))
    with pytest.raises(CheckpointError, match=r"has shape \[48, 64\] but config.json implies \[50, 64\]"):
        LLM(model=str(bad))
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        LLM(model=str(bad))


def test_sharded_checkpoint_loads(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{tiny_dir}/model.safetensors")
    shard = tmp_path / "sharded"
    shard.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shard / f).write_text(open(f"{tiny_dir}/{f}").read())
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(shard / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    p = SamplingParams(temperature=0, max_tokens=6)
    ref = LLM(model=tiny_dir, num_kv_blocks=32).generate(prompts(2), p, use_tqdm=False)
    got = LLM(model=str(shard), num_kv_blocks=32).generate(prompts(2), p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_roles_read_only_their_own_tensors(tiny_dir):
    """The attention part never touches routed-expert tensors; an expert rank reads only its experts."""
    import torch

    from afsplit.models.checkpoint import CheckpointReader
    from afsplit.models.spec import read_model_spec
    from afsplit.models.weights import load_attention_weights, load_expert_weights

    class Recording(CheckpointReader):
        def __init__(self, d):
            super().__init__(d)
            self.read = []

        def get(self, name, shape, device=None):
            self.read.append(name)
            return super().get(name, shape, device)

    spec = read_model_spec(tiny_dir)
    src = Recording(tiny_dir)
    load_attention_weights(src, spec, torch.float32)
    assert src.read and not any(".experts." in n for n in src.read)
    src.read.clear()
    w = load_expert_weights(src, spec, torch.float32, experts={0: [3, 5, 3]})
    assert sorted(set(src.read)) == sorted(f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
                                           for e in (3, 5) for p in ("gate", "up", "down"))
    assert w.w13[0].shape == (3, 2 * spec.moe_intermediate_size, spec.hidden_size)
    assert torch.equal(w.w13[0][0], w.w13[0][2])  # a replica holds the same weights


def test_tiny_tokenizer_loads_in_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert tok("hello").input_ids == list(b"hello")
    assert tok.decode(list("wörld".encode())) == "wörld"


def test_token_buckets():
    from afsplit.piecewise_prefill import token_bucket, token_buckets

    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert token_buckets(7) == [16] and token_buckets(300) == [16, 32, 64, 128, 256, 512]
    assert [token_bucket(n, 2048) for n in (0, 1, 16, 17, 257, 2048, 2049)] == [None, 16, 16, 32, 512, 2048, None]


class _ReplayByRerun:
    """A stand-in for a CUDA graph on CPU: a replay reruns the captured piece (which reads and
    writes only the static buffers, as the real graph does)."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _fake_capture(self, layer, tb):
    return _ReplayByRerun(lambda: self._piece(layer, tb))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_piecewise_prefill_graphs_match_eager(family, tmp_path, monkeypatch):
    """Prefill and mixed steps cut at attention and padded to token buckets (the piecewise-graph code
    path, uncaptured on CPU, then with replays emulated) give the eager engine's tokens and logits:
    whole prompts, chunks next to decodes, a budget above 256 tokens, preemption."""
    from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
    from afsplit.models.tiny import make_tiny
    from afsplit.piecewise_prefill import PiecewisePrefill
    from tests.helpers.runtime_case import record_logits

    model = str(make_tiny(family, tmp_path / family, seed=5))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = prompts(n=8, seed=1)

    def generate(**kw):
        llm = LLM(model=model, block_size=4, **{"num_kv_blocks": 512, "max_num_batched_tokens": 64, **kw})
        logits = {}
        record_logits(llm.engine, logits)
        outs = llm.generate(reqs, greedy, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], logits, llm.engine.runner.piecewise

    base, base_logits, none = generate(cuda_graphs=False)
    assert none is None
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    for kw in ({}, {"max_num_batched_tokens": 300}, {"max_num_batched_tokens": 9}, {"num_kv_blocks": 24}):
        tokens, logits, pw = generate(**kw)
        assert tokens == base, kw
        assert pw is not None and pw.calls > 0 and not pw.capture  # CPU: never captured
        for rid, rows in base_logits.items():
            for a, b in zip(rows, logits[rid]):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # replays emulated: a second run of the same prompts captures, a third replays every piece
    monkeypatch.setattr(PiecewisePrefill, "_capture_piece", _fake_capture)
    llm = LLM(model=model, block_size=4, num_kv_blocks=512, max_num_batched_tokens=64)
    pw = llm.engine.runner.piecewise
    pw.capture = True
    for _ in range(3):
        outs = llm.generate(reqs, greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == base
    assert pw.graphs and pw.replays > 0 and not pw.failed
