"""afsplit vs transformers on the same tiny checkpoints, float32 on CPU.

For each family at two configs: logits over prefill and 16 decode steps agree (relative error
<= 1e-4) for a batch of mixed-length prompts crossing KV block boundaries, and 32 greedy tokens
are exactly what transformers would pick. The engine runs with a small token budget so prompts
are prefilled in chunks while other sequences decode.
"""

import pytest
import torch

from afsplit import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

CASES = {
    "qwen3_moe-default": ("qwen3_moe", {}),
    "qwen3_moe-d24-mqa-topall": ("qwen3_moe", dict(head_dim=24, num_key_value_heads=1, num_experts=4,
                                                 num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0])),
    "qwen2_moe-default": ("qwen2_moe", {}),
    "qwen2_moe-d12-top1-mha": ("qwen2_moe", dict(hidden_size=48, num_key_value_heads=4, num_experts_per_tok=1,
                                                norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[])),
    "mixtral-default": ("mixtral", {}),
    "mixtral-window8-mqa": ("mixtral", dict(sliding_window=8, num_key_value_heads=1, num_local_experts=3,
                                            num_experts_per_tok=1, head_dim=20)),
    "olmoe-default": ("olmoe", {}),
    "olmoe-topall-norm-clip": ("olmoe", dict(num_experts=4, num_experts_per_tok=4, norm_topk_prob=True,
                                             clip_qkv=0.8, num_key_value_heads=1)),
}

PROMPT_LENS = [1, 5, 13, 17, 4]  # block_size 4: exactly one block, one block + 1, several
NEW_TOKENS = 32
LOGIT_STEPS = 17  # prefill + 16 decodes


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, tmp_path):
    from afsplit.models.tiny import make_tiny

    family, overrides = CASES[case]
    model_dir = make_tiny(family, tmp_path / case, seed=1, **overrides)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]

    llm = LLM(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)
    captured: dict[int, list[torch.Tensor]] = {}
    run = llm.engine.runner.run

    def recording_run(batch):
        logits, sampling = run(batch)
        for row, i in enumerate(sampling):
            captured.setdefault(batch.seqs[i].request_id, []).append(logits[row].clone())
        return logits, sampling

    llm.engine.runner.run = recording_run
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + ours])).logits[0].double()  # teacher-forced on our tokens
        rows = ref[len(prompt) - 1: len(prompt) - 1 + NEW_TOKENS]
        assert rows.argmax(-1).tolist() == ours, f"{case}: greedy tokens differ from transformers"
        mine = torch.stack(captured[out.request_id][:LOGIT_STEPS]).double()
        err = ((mine - rows[:LOGIT_STEPS]).norm() / rows[:LOGIT_STEPS].norm()).item()
        assert err <= 1e-4, f"{case}: prompt of {len(prompt)} tokens: logits relative error {err:.2e}"
