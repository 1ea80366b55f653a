"""The Python API, in vLLM's shape::

    from afsplit import LLM, SamplingParams
    llm = LLM(model="path/to/hf_dir", dtype="float32")        # or LLM(config="configs/tiny.yaml")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
    print(out[0].outputs[0].text, out[0].outputs[0].token_ids)
"""

from __future__ import annotations

from afsplit.config import Config, config_from_dict, load_config
from afsplit.engine import LLMEngine, RequestOutput
from afsplit.sampling_params import SamplingParams

# LLM(...) keyword -> config section
_RUNTIME_KEYS = {"block_size", "num_kv_blocks", "kv_cache_memory_gb", "max_num_seqs", "max_num_batched_tokens",
                 "chunked_prefill", "seed", "micro_batches", "cuda_graphs", "prefill_graphs", "async_scheduling",
                 "capture_at_start"}
_MODEL_KEYS = {"dtype", "max_model_len", "weights", "preset", "tiny"}


class LLM:
    def __init__(self, model: str | None = None, config: str | Config | None = None, overrides=(), device: str | None = None,
                 **kwargs):
        if isinstance(config, Config):
            cfg = config
        elif config is not None:
            cfg = load_config(config, list(overrides))
        else:
            data = {"model": {"path": model}, "runtime": {}, "topology": {}}
            for key, value in kwargs.items():
                section = "runtime" if key in _RUNTIME_KEYS else "model" if key in _MODEL_KEYS else None
                if section is None:
                    raise TypeError(f"LLM() got an unexpected keyword {key!r}; runtime keys: {sorted(_RUNTIME_KEYS)}, "
                                    f"model keys: {sorted(_MODEL_KEYS)}")
                data[section][key] = value
            if device:
                data["topology"]["device"] = device
            cfg = config_from_dict(data, "LLM()")
        self.engine = LLMEngine(cfg)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self.engine.generate(list(prompts), sampling_params or SamplingParams(), use_tqdm=use_tqdm)
