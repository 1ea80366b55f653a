"""The chosen plan as an afsplit config (one instance), checked with afsplit's own loader before writing."""

from __future__ import annotations

from pathlib import Path

import yaml

from afsplit.errors import ConfigError

KV_HEADROOM = 1.1  # KV memory above the planned batch's worst case (all sequences at their last token)


def plan_config(cand, shape, model: str, workload, header: str = "") -> tuple[dict, str]:
    """(config dict, YAML text with a comment header) for candidate `cand` of `model` (preset or directory)."""
    if not shape.runnable:
        raise ConfigError(f"--out: {shape.source}; a config needs a model afsplit can serve (a preset or a "
                          "Hugging Face directory)")
    if cand.layout.kind == "engine":
        nodes = [{"colocated": 1}]
    else:
        nodes = cand.layout.topology_nodes()
    if Path(model).is_dir():
        model_sec = {"path": str(Path(model).resolve()), "dtype": shape.dtype}
    else:
        model_sec = {"weights": "random", "preset": model, "dtype": shape.dtype}
    model_sec["max_model_len"] = workload.seq_tokens
    kv_gb = cand.batch * workload.seq_tokens * shape.kv_bytes_per_token * KV_HEADROOM / 2**30
    cfg = {
        "model": model_sec,
        "topology": {"device": "cuda", "nodes": nodes},
        "runtime": {"max_num_seqs": cand.batch, "micro_batches": str(cand.m),
                    "kv_cache_memory_gb": round(max(0.1, kv_gb), 2),
                    "max_num_batched_tokens": workload.max_batched_tokens},
        # the padded regions the plan's exchange model prices (and CUDA graphs need)
        "comm": {"transport": cand.transport, "metadata": "padded"},
    }
    if cand.spare_slots:  # the balancer's measured max/mean assumed least-loaded selection over replicas
        cfg["balancer"] = {"replicas": "auto", "spare_slots_per_rank": cand.spare_slots}
    from afsplit.config import config_from_dict

    config_from_dict(yaml.safe_load(yaml.safe_dump(cfg)), "planned config")  # what check-config will say
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    return cfg, "\n".join(lines + [yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)])


def write_plan_config(path: str, cand, shape, model: str, workload, header: str) -> None:
    _, text = plan_config(cand, shape, model, workload, header)
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write ({e.strerror})") from None


def instances_note(cand) -> str:
    n = cand.instances
    return "run 1 instance of this config" if n == 1 else f"run {n} instances of this config side by side"

