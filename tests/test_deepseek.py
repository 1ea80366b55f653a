"""DeepSeek-V2/V3 beyond the parity cases: config forms and spellings, routers against transformers'
own router modules, MTP layers, the latent KV cache, the CUDA-graph decode path, errors, presets,
and the distributed runtime (configs/cpu-2node.yaml: two-phase, micro-batches 2) against the
single-process engine.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from afsplit import LLM, SamplingParams
from afsplit.cli import main
from afsplit.errors import CheckpointError
from afsplit.models.presets import PRESETS
from afsplit.models.spec import spec_from_hf_config
from afsplit.models.tiny import TINY_FAMILIES, make_tiny
from tests.helpers.hf_checkpoint import save_with_transformers

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("deepseek_v2", "deepseek_v3")


def prompts(n=6, seed=0, longest=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(n_),), generator=g).tolist() for n_ in torch.randint(1, longest, (n,), generator=g)]


def greedy_tokens(model_dir, reqs, max_tokens=12, **kw):
    llm = LLM(model=str(model_dir), block_size=4, **{"num_kv_blocks": 256, **kw})
    outs = llm.generate([{"prompt_token_ids": p} for p in reqs],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


# ---------------------------------------------------------------- config forms

def _as_transformers_writes_it(cfg: dict) -> dict:
    """The same config after a round trip through the installed transformers' config class (to_dict)."""
    arch = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return transformers.AutoConfig.for_model(cfg["model_type"], **arch).to_dict()


FORMS = {**{f"tiny-{k}": v for k, v in TINY_FAMILIES.items()}, **{f"preset-{k}": v for k, v in PRESETS.items()},
         # transformers 4.x / hub spellings
         "qwen3-4.x": dict(TINY_FAMILIES["qwen3_moe"], rope_parameters=None, rope_theta=5e5),
         "deepseek_v3-hub-yarn-mscale-ne": dict(TINY_FAMILIES["deepseek_v3"], rope_theta=50000.0, rope_scaling={
             "type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 0.707,
             "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}, rope_parameters=None,
             topk_method="noaux_tc", scoring_func="sigmoid", n_routed_experts=8)}


@pytest.mark.parametrize("name", list(FORMS))
def test_every_config_form_gives_the_same_spec(name):
    """The hub / 4.x spelling and transformers 5.x's re-serialisation of it normalise identically."""
    cfg = FORMS[name]
    assert spec_from_hf_config(_as_transformers_writes_it(cfg)) == spec_from_hf_config(cfg)


def test_spellings_and_defaults():
    q = dict(TINY_FAMILIES["qwen3_moe"])
    n = q.pop("num_experts")
    assert spec_from_hf_config(dict(q, num_local_experts=n)).num_experts == n  # transformers 5.x (the issue)
    with pytest.raises(CheckpointError, match=r"missing field 'num_experts' or 'num_local_experts' or 'n_routed_exp"):
        spec_from_hf_config(q)
    v3 = dict(TINY_FAMILIES["deepseek_v3"])
    for k in ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
              "rope_interleave", "n_shared_experts", "q_lora_rank"):
        v3.pop(k)
    s = spec_from_hf_config(dict(v3, n_routed_experts=16, num_hidden_layers=4))  # transformers' class defaults
    assert (s.routing.n_group, s.routing.topk_group, s.routing.routed_scaling_factor, s.norm_topk_prob) == (8, 4, 2.5, True)
    assert s.moe_layers == (False, False, False, True) and s.mla.q_lora_rank == 1536 and s.mla.rope_interleaved
    lite = spec_from_hf_config(PRESETS["deepseek-v2-lite"])
    assert lite.mla.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)
    assert lite.rope_yarn.attention_factor == 1.0 and lite.num_kv_heads == 1 and lite.head_dim == 576
    assert lite.shared_expert_intermediate_size == 2 * 1408 and not lite.shared_expert_gated


@pytest.mark.parametrize("change,message", [
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), r"topk_method 'noaux_tc' is not a DeepSeek-V2 router"),
    (dict(quantization_config={"quant_method": "fp8"}), r"quantized checkpoints \(fp8\) are not supported"),
    (dict(moe_layer_freq=2), r"moe_layer_freq 2 is not supported"),
    (dict(n_group=3), r"n_routed_experts 8 must split into n_group 3 groups"),
    (dict(num_experts_per_tok=5), r"num_experts_per_tok 5 > the 4 experts of topk_group 2 groups"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), r"rope type 'linear' is not supported for deepseek_v3"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(CheckpointError, match=message):
        spec_from_hf_config(dict(TINY_FAMILIES["deepseek_v3"], **change), "x/config.json")


# ---------------------------------------------------------------- routers

ROUTERS = {
    "v2-greedy": ("deepseek_v2", dict(n_routed_experts=64, num_experts_per_tok=6, topk_method="greedy",
                                      routed_scaling_factor=1.0)),
    "v2-group-limited-160/8": ("deepseek_v2", dict(n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3,
                                                   topk_method="group_limited_greedy", routed_scaling_factor=16.0)),
    "v3-256/8": ("deepseek_v3", dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4)),
    "v3-no-norm-one-group": ("deepseek_v3", dict(n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1,
                                                 norm_topk_prob=False, routed_scaling_factor=1.0)),
}


@pytest.mark.parametrize("case", list(ROUTERS))
def test_router_matches_transformers_router(case):
    """Our route() against transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter on 500 tokens."""
    from afsplit.models.moe_model import AttentionModel
    from afsplit.models.weights import AttentionWeights, AttnLayerWeights

    family, change = ROUTERS[case]
    cfg = dict(TINY_FAMILIES[family], **change)
    spec = spec_from_hf_config(cfg)
    hf_cfg = transformers.AutoConfig.for_model(family, **{k: v for k, v in cfg.items() if k != "model_type"})
    mod = transformers.models.__dict__[family]
    router_cls = getattr(mod, "modeling_" + family).__dict__["DeepseekV2TopkRouter" if family == "deepseek_v2"
                                                            else "DeepseekV3TopkRouter"]
    router = router_cls(hf_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(spec.num_experts, generator=g) * 0.1)
    x = torch.randn(500, spec.hidden_size, generator=g)
    _, w_ref, ids_ref = router(x)
    lw = AttnLayerWeights(input_norm=None, post_norm=None, qkv_w=None, qkv_b=None, o_w=None, o_b=None, q_norm=None,
                          k_norm=None, gate_w=router.weight.detach(),
                          score_bias=getattr(router, "e_score_correction_bias", None))
    layer = spec.moe_layer_ids[0]
    layers = [lw] * spec.num_layers
    model = AttentionModel(spec, AttentionWeights(embed=torch.zeros(1, 1), final_norm=None, lm_head=None,
                                                  layers=layers), max_positions=4)
    w, ids = model.route(layer, x)
    ours, theirs = ids.long().sort(-1), ids_ref.long().sort(-1)  # transformers' top-k order is unspecified
    assert torch.equal(ours.values, theirs.values)
    assert torch.allclose(w.gather(1, ours.indices), w_ref.gather(1, theirs.indices), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- loading, cache, decode paths

def test_mtp_layers_past_num_hidden_layers_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    plain = save_with_transformers("deepseek_v3", tmp_path / "plain", seed=4)
    mtp = save_with_transformers("deepseek_v3", tmp_path / "mtp", seed=4)
    tensors = load_file(mtp / "model.safetensors")
    n = json.loads((mtp / "config.json").read_text())["num_hidden_layers"]
    for name in [k for k in tensors if k.startswith(f"model.layers.{n - 1}.")]:  # a hub-like MTP block
        tensors[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = tensors[name].clone()
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128)
    tensors[f"model.layers.{n}.enorm.weight"] = torch.ones(64)
    save_file(tensors, str(mtp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=1)))
    reqs = prompts(3)
    assert greedy_tokens(mtp, reqs)[0] == greedy_tokens(plain, reqs)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_cache_static_decode_and_chunking(family, tmp_path, monkeypatch):
    """The cache holds one latent per token; the CUDA-graph decode path (uncaptured on CPU), chunked
    prefill with decodes in the same step, micro-batches and preemption all give the same tokens."""
    from afsplit.cuda_graphs import STATIC_ON_CPU_ENV
    from afsplit.model_runner import KVCache

    model = make_tiny(family, tmp_path / family, seed=2)
    reqs = prompts(6, seed=1)
    base, llm = greedy_tokens(model, reqs, max_num_batched_tokens=4096)
    spec = llm.engine.spec
    latent, none = llm.engine.kv_cache.layers[0]
    assert none is None and latent.shape == (256, 4, 1, spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim)
    assert KVCache.bytes_per_block(3, 4, 1, 40, torch.float32, latent=True) == 3 * 4 * 40 * 4
    chunked, _ = greedy_tokens(model, reqs, max_num_batched_tokens=5, micro_batches=2)
    tight, llm = greedy_tokens(model, reqs, num_kv_blocks=14, max_num_batched_tokens=64)
    assert chunked == base and tight == base and llm.engine.scheduler.num_preemptions > 0
    monkeypatch.setenv(STATIC_ON_CPU_ENV, "1")
    got, llm = greedy_tokens(model, reqs, micro_batches=2, max_num_batched_tokens=8)
    assert got == base and llm.engine.runner.static.graphs.calls > 0


def test_roles_read_only_their_own_tensors(tmp_path):
    from afsplit.models.checkpoint import CheckpointReader
    from afsplit.models.spec import read_model_spec
    from afsplit.models.weights import load_attention_weights, load_expert_weights

    d = make_tiny("deepseek_v3", tmp_path / "m")
    read = []

    class Recording(CheckpointReader):
        def get(self, name, shape, device=None):
            read.append(name)
            return super().get(name, shape, device)

    spec = read_model_spec(d)
    w = load_attention_weights(Recording(d), spec, torch.bfloat16)
    assert read and not any(".experts." in n for n in read)
    assert any("shared_experts" in n for n in read) and any("e_score_correction_bias" in n for n in read)
    assert w.layers[1].gate_w.dtype == torch.float32 and w.layers[1].score_bias.dtype == torch.float32
    read.clear()
    load_expert_weights(Recording(d), spec, torch.bfloat16, experts={1: [0, 7]})
    assert sorted(read) == sorted(f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in (0, 7)
                                  for p in ("gate", "up", "down"))


@pytest.mark.parametrize("family", FAMILIES)
def test_make_tiny_cli_and_check_config(family, tmp_path, capsys):
    assert main(["make-tiny", family, str(tmp_path / "m")]) == 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "m")}}))
    assert main(["check-config", str(cfg)]) == 0
    assert f"model: {family}" in capsys.readouterr().out


def test_presets_have_the_published_sizes():
    from afsplit.models.weights import all_tensor_names_and_shapes

    def params(name):
        return sum(math.prod(s) for s in all_tensor_names_and_shapes(spec_from_hf_config(PRESETS[name])).values())

    assert params("deepseek-v2-lite") == pytest.approx(15.7e9, rel=0.01)  # DeepSeek-V2-Lite: 15.7B
    v3 = spec_from_hf_config(PRESETS["deepseek-v3-4l"])
    assert v3.num_layers == 4 and v3.moe_layers == (False, True, True, True) and v3.mla.latent_dim == 576
    assert v3.routing.n_group == 8 and v3.num_experts == 256 and v3.top_k == 8


# ---------------------------------------------------------------- distributed runtime

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_two_nodes_two_phase_matches_single_process_engine(family, tmp_path):
    """configs/cpu-2node.yaml (2 attention ranks | 2 expert ranks, two-phase, micro-batches 2)."""
    from tests.test_runtime import PROMPT_LENS, launch, reference

    model_dir = str(save_with_transformers(family, tmp_path / "model", seed=5))
    g = torch.Generator().manual_seed(7)
    reqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    (tmp_path / "prompts.json").write_text(json.dumps(reqs))
    cfg = yaml.safe_load((ROOT / "configs" / "cpu-2node.yaml").read_text())
    cfg["model"] = {"path": model_dir, "dtype": "float32"}
    cfg["runtime"].update(block_size=4, max_num_batched_tokens=32)  # chunked prompts next to decodes
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = launch(cfg_path, ["tests/helpers/runtime_case.py", str(cfg_path), str(tmp_path / "prompts.json"),
                             str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref_tokens, ref_logits = reference(model_dir, reqs)
    got = json.loads((tmp_path / "tokens.json").read_text())
    assert [got[str(i)] for i in range(len(reqs))] == ref_tokens
    logits: dict = {}
    for f in tmp_path.glob("logits-rank*.pt"):
        logits.update(torch.load(f))
    for rid, steps in ref_logits.items():
        a, b = torch.stack(logits[rid]).double(), torch.stack(steps).double()
        assert ((a - b).norm() / b.norm()).item() < 1e-5, f"request {rid}"
