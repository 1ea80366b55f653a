"""The warm start (afsplit/warm_start.py): every decode bucket and prefill token bucket runs twice before the
first request (eager, then what would be the capture), and leaves the engine as a fresh one."""

import pytest
import torch

from afsplit import LLM, SamplingParams
from afsplit.cuda_graphs import STATIC_ON_CPU_ENV, GraphCache, graph_buckets
from afsplit.piecewise_prefill import PiecewisePrefill, token_buckets, token_bucket
from afsplit.warm_start import _prefill_lengths, capture_every_bucket


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return str(make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3", seed=8))


def build(tiny_dir, **kw):
    kw = {"block_size": 4, "num_kv_blocks": 400, "max_num_seqs": 6, "max_num_batched_tokens": 300,
          "max_model_len": 120, **kw}
    return LLM(model=tiny_dir, **kw)


def record_shapes(monkeypatch) -> tuple[dict, dict]:
    """Counts of each decode-graph key and each prefill token bucket the engine runs."""
    decode, prefill = {}, {}
    run_graph, run_prefill = GraphCache.run, PiecewisePrefill.run

    def graph(self, key, fn):
        decode[key] = decode.get(key, 0) + 1
        return run_graph(self, key, fn)

    def pieces(self, token_ids, meta, rows):
        tb = token_bucket(token_ids.shape[0], self.max_tokens)
        prefill[tb] = prefill.get(tb, 0) + 1
        return run_prefill(self, token_ids, meta, rows)

    monkeypatch.setattr(GraphCache, "run", graph)
    monkeypatch.setattr(PiecewisePrefill, "run", pieces)
    return decode, prefill


def test_prefill_lengths_fill_the_bucket_with_prompts_that_fit():
    assert _prefill_lengths(300, 120) == [119, 119, 62]
    assert _prefill_lengths(16, 120) == [16]
    assert _prefill_lengths(238, 120) == [119, 119]


def test_every_bucket_runs_twice_and_the_engine_is_left_fresh(tiny_dir, monkeypatch):
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    reqs = [{"prompt_token_ids": torch.randint(0, 256, (int(n),), generator=torch.Generator().manual_seed(n)).tolist()}
            for n in (3, 40, 9, 77, 1)]
    params = [SamplingParams(temperature=0.8, top_k=20, max_tokens=6),  # seeds derived from the request index
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)] * 2 + [SamplingParams(max_tokens=4)]
    cold = build(tiny_dir)
    assert cold.engine.warm_start is None  # on the CPU nothing is captured, so nothing is warmed by default
    want = [o.outputs[0].token_ids for o in cold.generate(reqs, params, use_tqdm=False)]

    llm = build(tiny_dir)
    e = llm.engine
    decode, prefill = record_shapes(monkeypatch)
    report = capture_every_bucket(e)
    assert report.decode_buckets == graph_buckets(6) == [1, 2, 4, 8]
    assert all(decode.get((1, b), 0) >= 2 for b in report.decode_buckets), decode
    assert report.prefill_buckets == token_buckets(300) and not report.skipped_prefill
    assert all(prefill.get(tb, 0) >= 2 for tb in token_buckets(300)), prefill
    assert e.kv.num_free_blocks == 400 and not e.scheduler.has_work()
    assert e._next_id == 0 and e.steps_run == 0
    assert [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)] == want


def test_buckets_that_do_not_fit_are_left_for_later(tiny_dir, monkeypatch):
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    e = build(tiny_dir, num_kv_blocks=40).engine  # 160 tokens of KV: the 256- and 300-token steps do not fit
    report = capture_every_bucket(e)
    assert report.skipped_prefill == [256, 512] and report.prefill_buckets == [16, 32, 64, 128]
    assert e.kv.num_free_blocks == 40


def test_an_engine_with_requests_is_refused(tiny_dir, monkeypatch):
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    llm = build(tiny_dir)
    llm.engine.add_request({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="already has requests"):
        capture_every_bucket(llm.engine)


@pytest.mark.parametrize("on", [True, False])
def test_the_engine_warms_itself_when_it_captures(tiny_dir, monkeypatch, on):
    """Where graphs are captured (CUDA), runtime.capture_at_start runs the warm start when the engine is built."""
    import afsplit.engine as engine_mod

    calls = []

    def uncaptured(e):  # the real warm start, at the end of the engine's construction, with nothing captured
        e.runner.static.graphs.capture = e.runner.piecewise.capture = False
        calls.append(e)
        return capture_every_bucket(e)

    monkeypatch.setattr(engine_mod, "graphs_wanted", lambda enabled, device: (enabled, enabled))
    monkeypatch.setattr(engine_mod, "capture_every_bucket", uncaptured)
    llm = build(tiny_dir, capture_at_start=on)
    assert calls == ([llm.engine] if on else [])
    if on:
        assert llm.engine.warm_start.decode_buckets == [1, 2, 4, 8] and llm.engine.runner.static.graphs.warmed
    else:
        assert llm.engine.warm_start is None
        report = llm.engine.start_warm()  # later, by hand (as engine_bench does once its counter wraps fused_moe)
        assert calls == [llm.engine] and report is llm.engine.warm_start and report.decode_buckets == [1, 2, 4, 8]
    assert llm.engine.start_warm() is llm.engine.warm_start and len(calls) == 1  # once only


def test_mla_and_micro_batches_warm_the_decode_buckets_only(tmp_path, monkeypatch):
    """DeepSeek (MLA prefill stays eager) with 2 micro-batches: decode keys (2, bucket), no prefill graphs."""
    from afsplit.models.tiny import make_tiny

    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    model = str(make_tiny("deepseek_v3", tmp_path / "ds3", seed=3))
    llm = build(model, micro_batches=2, max_num_seqs=8)
    assert llm.engine.runner.piecewise is None
    decode, prefill = record_shapes(monkeypatch)
    report = capture_every_bucket(llm.engine)
    # bucket 8 a micro-batch is out of reach: 8 sequences make two parts of 4
    assert report.decode_buckets == [1, 2, 4] and report.prefill_buckets == [] and not prefill
    assert all(decode.get((2, b), 0) >= 2 for b in (1, 2, 4)), decode
    assert llm.engine.kv.num_free_blocks == 400
