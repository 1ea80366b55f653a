"""Synthetic requests for benchmarks: N prompts of L random token ids, as afsplit generate JSON lines.

    python -m launch.make_prompts --n 64 --input-len 1024 --output-len 128 --vocab 151936 --out prompts.jsonl
"""

import argparse
import json

import torch


def make_prompts(n: int, input_len: int, output_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, input_len), generator=g)
    return [{"prompt_token_ids": row.tolist(), "max_tokens": output_len, "ignore_eos": True, "temperature": 0}
            for row in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--input-len", type=int, required=True)
    ap.add_argument("--output-len", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.out, "w") as f:
        for p in make_prompts(args.n, args.input_len, args.output_len, args.vocab, args.seed):
            f.write(json.dumps(p) + "\n")


if __name__ == "__main__":
    main()
