"""Serving benchmark: a load generator shaped like `vllm bench serve`, against any OpenAI-compatible server.

    python -m launch.bench_serve --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 512 --random-output-len 128 --num-prompts 200 --request-rate 8 --ignore-eos \\
        --save-result --result-dir OUT

Requests stream through the HTTP API (``stream: true`` with ``stream_options.include_usage``), so
TTFT is the first chunk's arrival and ITL the gaps between chunks, as a client sees them. Arrivals
are a Poisson process of ``--request-rate`` requests/s (``inf``: all at once); ``--max-concurrency``
caps the requests in flight. Datasets:

* ``random``: token-id prompts of ``--random-input-len`` tokens (+-``--random-range-ratio``), ids
  drawn from [0, ``--random-vocab-size``), and ``--random-output-len`` tokens to generate;
* ``sharegpt``: a ShareGPT-format JSON list (``conversations``: [{"from", "value"}, ...]); the
  first turn is the prompt, the second's token count (``--tokenizer``) or ``--sharegpt-output-len``
  the output length; vLLM's filter (prompt >= 4 and <= 1024 tokens, prompt + output <= 2048).

Printed and saved (``--save-result``) under vLLM's names: request_throughput, output_throughput,
total_token_throughput, and mean/median/std/p99 of ttft_ms, tpot_ms, itl_ms, e2el_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens (the server's usage replaces it when it reports one)
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds
    itl: list = field(default_factory=list)
    latency: float = 0.0
    prompt_len: int = 0
    output_len: int = 0


# -- datasets ------------------------------------------------------------------------------------


def load_tokenizer(path: str | None):
    if not path:
        return None
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                    seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    out = []
    for _ in range(n):
        lin, lout = length(input_len), length(output_len)
        out.append(BenchRequest([rng.randrange(vocab) for _ in range(lin)], lin, lout))
    return out


def sharegpt_requests(path: str, n: int, tokenizer, output_len: int | None, seed: int) -> list[BenchRequest]:
    if tokenizer is None and output_len is None:
        raise SystemExit("bench_serve: the sharegpt dataset needs --tokenizer DIR (output lengths) or --sharegpt-output-len N")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"bench_serve: {path}: cannot read a ShareGPT JSON list ({e})") from None
    if not isinstance(data, list):
        raise SystemExit(f"bench_serve: {path}: expected a JSON list of {{'conversations': [...]}} entries")
    convs = [d.get("conversations") or d.get("conversation") or [] for d in data if isinstance(d, dict)]
    pairs = [(c[0].get("value", c[0].get("content")), c[1].get("value", c[1].get("content")))
             for c in convs if len(c) >= 2]
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, completion in pairs:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            continue
        plen = len(tokenizer.encode(prompt, add_special_tokens=False).ids) if tokenizer else 0
        olen = output_len or len(tokenizer.encode(completion, add_special_tokens=False).ids)
        if tokenizer is not None and (plen < 4 or (output_len is None and olen < 4) or plen > 1024 or plen + olen > 2048):
            continue
        out.append(BenchRequest(prompt, plen, olen))
        if len(out) == n:
            break
    if len(out) < n:
        print(f"bench_serve: {path} gave only {len(out)} usable requests of {n}", file=sys.stderr)
    return out


# -- the client ----------------------------------------------------------------------------------


def payload(args, model: str, req: BenchRequest) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        if not isinstance(req.prompt, str):
            raise SystemExit("bench_serve: the chat endpoint needs text prompts (use --dataset-name sharegpt)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


async def send(session, url: str, body: dict, req: BenchRequest) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    res.output_len = chunk["usage"].get("completion_tokens", 0)
                    res.prompt_len = chunk["usage"].get("prompt_tokens", res.prompt_len)
            res.latency = time.perf_counter() - start
            res.success = res.ttft > 0
            if not res.success:
                res.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def arrivals(requests: list[BenchRequest], rate: float, seed: int):
    """The requests at Poisson arrival times (exponential gaps of mean 1/rate); all at once for inf."""
    rng = random.Random(seed)
    for i, req in enumerate(requests):
        if i and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield req


async def run(args, url: str, model: str, requests: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        test = await send(session, url, payload(args, model, requests[0]), requests[0])
        if not test.success:
            raise SystemExit(f"bench_serve: the test request failed: {test.error}")
        bar = None
        if not args.disable_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="bench", unit="req", dynamic_ncols=True)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(req: BenchRequest) -> RequestResult:
            if limit is None:
                res = await send(session, url, payload(args, model, req), req)
            else:
                async with limit:
                    res = await send(session, url, payload(args, model, req), req)
            if bar:
                bar.update(1)
            return res

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(req)) async for req in arrivals(requests, args.request_rate, args.seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar:
            bar.close()
    return list(results), duration


# -- results -------------------------------------------------------------------------------------


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    per = {"ttft": [1e3 * r.ttft for r in ok], "itl": [1e3 * x for r in ok for x in r.itl],
           "e2el": [1e3 * r.latency for r in ok],
           "tpot": [1e3 * (r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]}
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration}
    for name in METRICS:
        vals = per[name] or [0.0]
        out[f"mean_{name}_ms"] = statistics.fmean(vals)
        out[f"median_{name}_ms"] = statistics.median(vals)
        out[f"std_{name}_ms"] = statistics.pstdev(vals)
        out[f"p99_{name}_ms"] = percentile(vals, 99)
    out.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_len for r in results],
               ttfts=[r.ttft for r in results], itls=[r.itl for r in results], errors=[r.error for r in results])
    return out


def percentile(vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM reports p99)."""
    v = sorted(vals)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def print_summary(d: dict) -> None:
    rows = [("Successful requests", d["completed"]), ("Failed requests", d["failed"]),
            ("Maximum request concurrency", d["max_concurrency"]), ("Request rate (req/s)", d["request_rate"]),
            ("Benchmark duration (s)", f"{d['duration']:.2f}"), ("Total input tokens", d["total_input_tokens"]),
            ("Total generated tokens", d["total_output_tokens"]),
            ("Request throughput (req/s)", f"{d['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{d['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{d['total_token_throughput']:.2f}")]
    for name, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        rows.append((f"-- {title}", ""))
        rows += [(f"{stat.capitalize()} {name.upper()} (ms)", f"{d[f'{stat}_{name}_ms']:.2f}")
                 for stat in ("mean", "median", "p99")]
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    for k, v in rows:
        print(f"{k:<42}{v}")
    print("=" * 66)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (default from --host/--port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    ap.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    ap.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random")
    ap.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals; inf = all at once")
    ap.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    ap.add_argument("--random-input-len", type=int, default=1024)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--random-vocab-size", type=int, default=None,
                    help="random prompt ids are drawn from [0, this); default: the tokenizer's size, else 256")
    ap.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (ShareGPT lengths, random vocab)")
    ap.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT requests")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly the requested output lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disable-tqdm", action="store_true")
    ap.add_argument("--save-result", action="store_true")
    ap.add_argument("--result-dir", default=".")
    ap.add_argument("--result-filename", default=None)
    return ap


def server_model(base_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    model = args.model or server_model(base)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset_name == "random":
        vocab = args.random_vocab_size or (tokenizer.get_vocab_size(with_added_tokens=False) if tokenizer else 256)
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, vocab, args.seed)
    else:
        if not args.dataset_path:
            raise SystemExit("bench_serve: --dataset-name sharegpt needs --dataset-path FILE.json")
        requests = sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len, args.seed)
    if not requests:
        raise SystemExit("bench_serve: no requests to send")
    results, duration = asyncio.run(run(args, base + args.endpoint, model, requests))
    out = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "afsplit", "base_url": base,
           "endpoint": args.endpoint, "model_id": model, "dataset_name": args.dataset_name,
           "num_prompts": len(requests), "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
           **summarize(results, duration)}
    print_summary(out)
    if args.save_result:
        rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}"
        name = args.result_filename or f"afsplit-{rate}qps-concurrency{args.max_concurrency}-{model}-{out['date']}.json"
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {**out, "request_rate": "inf" if rate == "inf" else args.request_rate}  # JSON has no Infinity
        path.write_text(json.dumps(saved, indent=1))
        print(f"saved {path}")
    return out


if __name__ == "__main__":
    main()
