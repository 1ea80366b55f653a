"""`afsplit make-tiny FAMILY DIR`: a real Hugging Face-format random checkpoint, deterministic.

Writes config.json, model.safetensors in hub tensor naming (per-expert tensors) and a byte-level
tokenizer (tokenizer.json + tokenizer_config.json) that `tokenizers` and `transformers` load.
Small enough to run on a laptop CPU; large enough to exercise GQA, several experts and top-k > 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from afsplit.errors import ConfigError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 256, 257  # ids of the first two special tokens (after the 256 byte tokens)
TINY_VOCAB = 320  # 256 bytes + specials, padded (embedding rows past the tokenizer are never produced by it)

_BASE = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
             bos_token_id=BOS_ID, eos_token_id=EOS_ID, hidden_act="silu", torch_dtype="float32")

TINY_FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=32,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(_BASE, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                      shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[1], qkv_bias=True),
    "mixtral": dict(_BASE, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=96, sliding_window=None),
    "olmoe": dict(_BASE, model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=8,
                  num_experts_per_tok=2, intermediate_size=48, norm_topk_prob=False, clip_qkv=None),
    # DeepSeek-V2 in the hub's form (top-level rope_theta, rope_scaling "type": YaRN), q without LoRA,
    # group-limited greedy routing; V3 in transformers 5.x's form (rope_parameters, head_dim =
    # qk_rope_head_dim), q with LoRA, sigmoid + bias routing over groups
    "deepseek_v2": dict(_BASE, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], num_hidden_layers=3,
                        num_key_value_heads=4, rope_parameters=None, rope_theta=10000.0,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                        intermediate_size=96, first_k_dense_replace=1, moe_layer_freq=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                        norm_topk_prob=False, scoring_func="softmax"),
    "deepseek_v3": dict(_BASE, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=3,
                        num_key_value_heads=4, head_dim=8, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, first_k_dense_replace=1,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                        num_nextn_predict_layers=0),
}


def tiny_hf_config(family: str, **overrides) -> dict:
    if family not in TINY_FAMILIES:
        raise ConfigError(f"make-tiny: unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return dict(TINY_FAMILIES[family], **overrides)


def write_byte_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars.sort(key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0],
        "unk_token": None, "pad_token": SPECIAL_TOKENS[0], "model_max_length": 512, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))


# ChatML, as Qwen checkpoints use it (rendered by afsplit serve and by transformers' apply_chat_template)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _byte_of(char: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, std: float = 0.15, **overrides) -> Path:
    """Write a random HF checkpoint of `family` into `out_dir` (created); returns the directory."""
    import torch
    from safetensors.torch import save_file

    from afsplit.models.checkpoint import RandomWeights
    from afsplit.models.spec import spec_from_hf_config
    from afsplit.models.weights import all_tensor_names_and_shapes

    cfg = tiny_hf_config(family, **overrides)
    spec = spec_from_hf_config(cfg, f"make-tiny {family}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = RandomWeights(seed=seed, std=std)
    tensors = {name: source.get(name, shape).to(torch.float32).contiguous()
               for name, shape in all_tensor_names_and_shapes(spec).items()}
    # Cosmetic: favour printable ASCII in the output layer so demo text is readable, not raw bytes.
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    scale = torch.full((spec.vocab_size, 1), 0.3)
    scale[ord(" "):ord("~") + 1] = 3.0
    tensors[head] = tensors[head] * scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    write_byte_tokenizer(out)
    return out
