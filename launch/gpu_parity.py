"""Tiny-model parity on GPUs in bf16: single-process engine and runtime ranks vs the fp32 CPU reference.

    python launch/gpu_parity.py --out parity.json [--layouts "1A+1E" "2C"]

For each family: the fp32 CPU engine is the reference; the bf16 GPU single-process engine and the
runtime (AF and colocated layouts, launched as a simulated cluster) must give prefill logits within
bf16 tolerance (relative Frobenius error < 2e-2) and mostly the same greedy tokens (bf16 rounding
may flip near-ties, so the token match rate is reported, not required to be 1).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from afsplit import LLM, SamplingParams  # noqa: E402
from afsplit.models.tiny import make_tiny  # noqa: E402
from tests.helpers.runtime_case import record_logits  # noqa: E402

PROMPT_LENS = [5, 17, 33, 64, 1]
NEW = 12


def run_single(model_dir, prompts, dtype, device):
    llm = LLM(model=model_dir, dtype=dtype, device=device, num_kv_blocks=256, block_size=16)
    logits = {}
    record_logits(llm.engine, logits)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    return {o.request_id: o.outputs[0].token_ids for o in outs}, logits


def run_runtime(model_dir, prompts, nodes, work: Path):
    cfg = {"model": {"path": model_dir, "dtype": "bfloat16"}, "topology": {"device": "cuda", "nodes": nodes},
           "runtime": {"num_kv_blocks": 256, "micro_batches": 2}, "comm": {"timeout_s": 120}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (work / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "launch.local_cluster", "--config", str(work / "cfg.yaml"), "--",
           "tests/helpers/runtime_case.py", str(work / "cfg.yaml"), str(work / "prompts.json"), str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    tokens = {int(k): v for k, v in json.loads((work / "tokens.json").read_text()).items()}
    logits = {}
    for f in work.glob("logits-rank*.pt"):
        logits.update(torch.load(f))
    return tokens, logits


def compare(ref, got):
    (rt, rl), (gt, gl) = ref, got
    errs = [((gl[r][0].double().cpu() - rl[r][0].double()).norm() / rl[r][0].double().norm()).item() for r in rl]
    match = sum(a == b for r in rt for a, b in zip(rt[r], gt[r])) / sum(len(v) for v in rt.values())
    first = sum(rt[r][0] == gt[r][0] for r in rt) / len(rt)
    return {"prefill_logits_rel_err_max": max(errs), "first_token_match": first, "greedy_token_match": match,
            "pass": max(errs) < 2e-2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", nargs="+", default=["qwen3_moe", "mixtral"])
    args = ap.parse_args()
    layouts = {"single-gpu": None, "AF 1A+1E": [{"attention": 1, "expert": 1}], "colocated 2": [{"colocated": 2}]}
    if torch.cuda.device_count() >= 4:
        layouts["AF 2 nodes 2A|2E"] = [{"attention": 2}, {"expert": 2}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            model_dir = str(make_tiny(family, Path(tmp) / family, seed=11))
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
            ref = run_single(model_dir, prompts, "float32", "cpu")
            for name, nodes in layouts.items():
                work = Path(tmp) / f"{family}-{len(rows)}"
                work.mkdir()
                try:
                    got = run_single(model_dir, prompts, "bfloat16", "cuda") if nodes is None else \
                        run_runtime(model_dir, prompts, nodes, work)
                    row = {"family": family, "layout": name, **compare(ref, got)}
                except Exception as e:  # report and go on: one layout failing must not hide the others
                    row = {"family": family, "layout": name, "pass": False, "error": str(e)[-1500:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    print(f"{'family':<10} {'layout':<18} {'pass':<5} {'logit err':>9} {'1st tok':>8} {'tokens':>7}")
    for r in rows:
        print(f"{r['family']:<10} {r['layout']:<18} {str(r['pass']):<5} {r.get('prefill_logits_rel_err_max', float('nan')):>9.2e} "
              f"{r.get('first_token_match', float('nan')):>8.2f} {r.get('greedy_token_match', float('nan')):>7.2f}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
