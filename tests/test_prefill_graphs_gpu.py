"""GPU test of piecewise prefill graphs (afsplit/piecewise_prefill.py): captured replays give the
same bits as the same padded pieces run eagerly, and the same greedy tokens as eager prefill.
Run in its own process, without TRITON_INTERPRET (the CPU tests cover the uncaptured path)."""

import os

import pytest
import torch

from afsplit import LLM, SamplingParams
from tests.helpers.runtime_case import record_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set: run the GPU tests in their own process"),
]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_captured_prefill_pieces_are_bit_identical(family, tmp_path):
    from afsplit.models.tiny import make_tiny

    model = str(make_tiny(family, tmp_path / family, seed=7))
    g = torch.Generator().manual_seed(0)
    reqs = [{"prompt_token_ids": torch.randint(0, 256, (int(n),), generator=g).tolist()} for n in (5, 17, 33, 64, 1, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def generate(rounds, capture=True, **kw):
        kw.setdefault("capture_at_start", False)  # lazy graphs: the rounds below go eager -> capture -> replay
        llm = LLM(model=model, dtype="bfloat16", device="cuda", num_kv_blocks=256, block_size=16,
                  max_num_batched_tokens=48, **kw)  # 48: prompts are chunked next to decodes (mixed steps)
        pw = llm.engine.runner.piecewise
        if pw is not None:
            pw.capture = capture
        logits = {}
        record_logits(llm.engine, logits)
        for _ in range(rounds):  # eager warm-up, capture, replay: the last round's logits are kept
            logits.clear()
            outs = llm.generate(reqs, greedy, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], logits, pw

    eager_tokens, _, none = generate(3, prefill_graphs=False)
    assert none is None
    padded_tokens, padded_logits, _ = generate(3, capture=False)
    graph_tokens, graph_logits, pw = generate(3)
    assert pw.graphs and pw.replays > 0 and not pw.failed
    assert graph_tokens == padded_tokens == eager_tokens
    for rid, rows in padded_logits.items():
        for a, b in zip(rows, graph_logits[rid]):
            assert torch.equal(a, b), f"request {rid}: replayed logits differ from the eager padded pieces"
    # the warm start (afsplit/warm_start.py) captures every bucket before the first request: its first round
    # replays, with the lazily captured graphs' bits
    warm_tokens, warm_logits, pw = generate(1, capture_at_start=True)
    assert pw.graphs and not pw.failed and warm_tokens == eager_tokens
    for rid, rows in graph_logits.items():
        for a, b in zip(rows, warm_logits[rid]):
            assert torch.equal(a, b), f"request {rid}: logits after the warm start differ from lazily captured graphs"
