"""afsplit vs transformers on the same tiny checkpoints, float32 on CPU.

Every checkpoint is written by the installed transformers (`save_pretrained` of a randomly
initialised model, tests/helpers/hf_checkpoint.py), so a field that a new transformers release
renames in config.json fails here. For each family at two or more configs: logits over prefill
and 16 decode steps agree (relative error <= 1e-4) for a batch of mixed-length prompts crossing
KV block boundaries, and 32 greedy tokens are exactly what transformers would pick. The engine
runs with a small token budget so prompts are prefilled in chunks while other sequences decode.
"""

import pytest
import torch

from afsplit import LLM, SamplingParams
from tests.helpers.hf_checkpoint import save_with_transformers

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
    # hub form: YaRN (mscale == mscale_all_dim), q without LoRA, group-limited greedy
    "deepseek_v2-default": ("deepseek_v2", {}),
    # greedy top-3, q LoRA, attention biases, every layer MoE, default RoPE
    "deepseek_v2-greedy-lora-bias": ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None,
                                                        num_experts_per_tok=3, q_lora_rank=24, attention_bias=True,
                                                        first_k_dense_replace=0, n_shared_experts=1,
                                                        rope_scaling=None, routed_scaling_factor=1.0)),
    # 5.x form: sigmoid + bias, 4 groups, q LoRA, interleaved default RoPE
    "deepseek_v3-default": ("deepseek_v3", {}),
    # YaRN with mscale != mscale_all_dim (cos/sin and softmax scale both change), NeoX RoPE,
    # no q LoRA, one group, no renormalisation, top-3, rope 16 / nope 8 / v 24
    "deepseek_v3-yarn-neox-nolora": ("deepseek_v3", dict(
        rope_interleave=False, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
        num_experts_per_tok=3, qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=24, head_dim=16,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "mscale": 1.0,
                         "mscale_all_dim": 0.8, "original_max_position_embeddings": 64,
                         "beta_fast": 16, "beta_slow": 1})),
}

PROMPT_LENS = [1, 5, 13, 17, 4]  # block_size 4: exactly one block, one block + 1, several
NEW_TOKENS = 32
LOGIT_STEPS = 17  # prefill + 16 decodes


def check_against_transformers(model_dir, case: str, **llm_kwargs) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]

    llm = LLM(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=16,
              **llm_kwargs)
    captured: dict[int, list[torch.Tensor]] = {}
    run = llm.engine.runner.run

    def recording_run(batch, feed=None):
        logits, sampling = run(batch, feed)
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


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, tmp_path):
    family, overrides = CASES[case]
    check_against_transformers(save_with_transformers(family, tmp_path / case, seed=1, **overrides), case)
