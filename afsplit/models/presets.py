"""Real-shaped model presets for `weights: random` (benchmarks without downloading checkpoints).

Each is the Hugging Face config.json of the public model (architecture fields only).
"""

PRESETS: dict[str, dict] = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, hidden_act="silu"),
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=14336, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        hidden_act="silu"),
}
