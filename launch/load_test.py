"""Sustained load through the distributed runtime: nothing lost, no KV leak, flat memory.

    python3 launch/load_test.py                                   # 10,000 requests through configs/cpu-2node.yaml
    python3 launch/load_test.py --requests 2000 --out docs/benchmarks/load-cpu-2node

Writes a prompts file of mixed requests (prompt 1-48 tokens, 1-16 new tokens, greedy and sampled,
some seeded) in which every ``--bad-every``-th line is bad in one of the ways users get wrong (NaN /
inf / negative temperature, top_p 0, top_k -5, max_tokens 0, an empty prompt, a prompt longer than
max_model_len, a token id outside the vocabulary, an unknown field, a line that is not JSON), runs
``afsplit generate --config CONFIG --prompts-file ... --output ... --stats-json ...`` once, samples
the resident memory (RSS) of every rank once a second, and reports:

* requests completed, failed as expected (exactly the bad lines, each with its error record),
  failed unexpectedly, and lost (no record at all) -- the last two must be 0;
* KV blocks in use at the end (from --stats-json; must be 0);
* RSS per rank and in total at the start (first result written), middle (half written) and end.

Results: OUT.json (everything) and OUT.md (a table to paste into a report). Exit status 0 only when
nothing was lost or failed unexpectedly and no KV block is left in use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python3 launch/load_test.py` from anywhere
    sys.path.insert(0, str(REPO))

BAD_KINDS = [  # (name, the request's JSON line), the ways a line can be wrong
    ("temperature NaN", lambda ids: json.dumps({"prompt_token_ids": ids, "temperature": math.nan})),
    ("temperature inf", lambda ids: json.dumps({"prompt_token_ids": ids, "temperature": math.inf})),
    ("temperature < 0", lambda ids: json.dumps({"prompt_token_ids": ids, "temperature": -1.0})),
    ("top_p 0", lambda ids: json.dumps({"prompt_token_ids": ids, "top_p": 0})),
    ("top_k -5", lambda ids: json.dumps({"prompt_token_ids": ids, "top_k": -5})),
    ("max_tokens 0", lambda ids: json.dumps({"prompt_token_ids": ids, "max_tokens": 0})),
    ("empty prompt", lambda ids: json.dumps({"prompt_token_ids": []})),
    ("prompt too long", lambda ids: json.dumps({"prompt_token_ids": [7] * 600})),
    ("token id out of range", lambda ids: json.dumps({"prompt_token_ids": ids + [10**6]})),
    ("unknown field", lambda ids: json.dumps({"prompt_token_ids": ids, "temprature": 0.5})),
    ("not JSON", lambda ids: "{prompt_token_ids: " + str(ids)),
]


def make_requests(n: int, bad_every: int, seed: int) -> tuple[list[str], dict[int, str]]:
    """(JSON lines, {index of a bad line: what is wrong with it})."""
    rng = random.Random(seed)
    lines, bad = [], {}
    for i in range(n):
        ids = [rng.randrange(256) for _ in range(rng.randint(1, 48))]
        if bad_every and i % bad_every == bad_every - 1:
            name, make = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            lines.append(make(ids))
            bad[i] = name
            continue
        req = {"prompt_token_ids": ids, "max_tokens": rng.randint(1, 16), "ignore_eos": rng.random() < 0.5,
               "temperature": rng.choice([0.0, 0.7, 1.0])}
        if req["temperature"] and rng.random() < 0.3:
            req["seed"] = rng.randrange(2**31)
        lines.append(json.dumps(req))
    return lines, bad


def _ranks_rss_mb(tag: str) -> dict[int, float]:
    """Global rank -> RSS in MB of every live rank of the job (processes carrying LOAD_TEST_TAG=tag)."""
    from launch.local_cluster import processes_with_env

    out = {}
    for pid, env in processes_with_env("LOAD_TEST_TAG", tag).items():
        if b"LOCAL_RANK" not in env:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                rss_kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        out[int(env[b"RANK"])] = rss_kb / 1024
    return out


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run(config: str, n: int, bad_every: int, seed: int, workdir: Path) -> dict:
    lines, bad = make_requests(n, bad_every, seed)
    prompts, out, stats = workdir / "prompts.jsonl", workdir / "out.jsonl", workdir / "stats.json"
    prompts.write_text("\n".join(lines) + "\n")
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "afsplit.cli", "generate", "--config", config, "--prompts-file", str(prompts),
           "--output", str(out), "--stats-json", str(stats), "--no-progress"]
    env = {**os.environ, "LOAD_TEST_TAG": tag, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                       os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    log = open(workdir / "run.log", "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples = []  # (seconds, results written, {rank: rss MB})
    while proc.poll() is None:
        rss = _ranks_rss_mb(tag)
        if rss:
            samples.append((time.monotonic() - start, _count_lines(out), rss))
        time.sleep(1.0)
    log.close()
    wall = time.monotonic() - start
    records = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        rec = json.loads(line)
        records[rec["index"]] = rec
    errors = {i for i, r in records.items() if "error" in r}
    completed = [i for i, r in records.items() if "token_ids" in r]
    summary = json.loads(stats.read_text()) if stats.exists() else {}

    def at(pred):
        for t, written, rss in samples:
            if pred(written):
                return {"t_s": round(t, 1), "results_written": written, "rss_mb_by_rank": rss,
                        "rss_mb_total": round(sum(rss.values()), 1)}
        return None

    world = max((len(s[2]) for s in samples), default=0)
    # "end": the last sample of the run itself (every rank alive, not all results written: after the
    # last one the ranks shut down and free memory)
    running = [s for s in samples if len(s[2]) == world and s[1] < n]
    end = running[-1] if running else None
    return {
        "config": config, "requests": n, "bad_lines": len(bad), "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "completed": len(completed), "failed_as_expected": len(errors & set(bad)),
        "failed_unexpectedly": len(errors - set(bad)), "bad_but_completed": len(set(bad) - errors),
        "lost": n - len(records),
        "kv_blocks_in_use_at_end": summary.get("kv_blocks_in_use_at_end"),
        "generated_tokens": summary.get("generated_tokens"), "steps": summary.get("steps"),
        "output_throughput_tok_s": summary.get("output_throughput"),
        "rss": {"start": at(lambda w: w >= 1), "middle": at(lambda w: w >= n // 2),
                "end": None if end is None else {"t_s": round(end[0], 1), "results_written": end[1],
                                                 "rss_mb_by_rank": end[2], "rss_mb_total": round(sum(end[2].values()), 1)}},
        "rss_timeline": [{"t_s": round(t, 1), "results_written": w, "rss_mb_total": round(sum(rss.values()), 1),
                          "rss_mb_by_rank": {k: round(v, 1) for k, v in sorted(rss.items())}} for t, w, rss in samples[::10]],
        "bad_kinds": sorted({v for v in bad.values()}),
        "example_errors": {bad[i]: records[i]["error"] for i in sorted(errors & set(bad))[:len(BAD_KINDS)]},
        "command": " ".join(cmd[1:]),
    }


def markdown(r: dict) -> str:
    """The report: what ran where, then the table."""
    rss = r["rss"]
    head = (f"# Sustained load: {r['requests']:,} requests through {r['config']}\n\n"
            f"{r['date']}, commit {r['commit']}, {r['machine']} (shared with other work: the wall time is not a "
            "speed measurement). Command: `python3 launch/load_test.py --requests "
            f"{r['requests']} --out OUT`, which runs `afsplit generate --config {r['config']} "
            "--prompts-file P --output O --stats-json S --no-progress` once. Mixed requests: prompts of 1-48 tokens, "
            "1-16 new tokens, greedy and sampled (some seeded); every 50th line bad in one of "
            f"{len(r['bad_kinds'])} ways ({', '.join(r['bad_kinds'])}). RSS is sampled once a second per rank; start = "
            "first result written, middle = half written, end = the last sample before the last result (then the "
            "ranks shut down); every 10th sample is in the JSON (`rss_timeline`).\n\n")

    def cell(point):
        if not point:
            return "-"
        ranks = ", ".join(f"r{k}: {v:.0f}" for k, v in sorted(point["rss_mb_by_rank"].items()))
        return f"{point['rss_mb_total']:.0f} MB ({ranks}) at {point['t_s']} s, {point['results_written']} written"

    rows = [("requests", r["requests"]), ("completed", r["completed"]),
            ("failed as expected (bad lines)", f"{r['failed_as_expected']} of {r['bad_lines']}"),
            ("failed unexpectedly", r["failed_unexpectedly"]), ("bad but completed", r["bad_but_completed"]),
            ("lost (no record)", r["lost"]), ("KV blocks in use at the end", r["kv_blocks_in_use_at_end"]),
            ("RSS start", cell(rss["start"])), ("RSS middle", cell(rss["middle"])), ("RSS end", cell(rss["end"])),
            ("wall time", f"{r['wall_s']} s"), ("generated tokens", r["generated_tokens"]), ("engine steps", r["steps"]),
            ("exit status", f"{r['exit_code']} (2 = some requests failed as input errors, as intended)")]
    drift = ""
    if rss["middle"] and rss["end"]:
        drift = (f"\nMemory from the middle to the end of the run: {rss['end']['rss_mb_total'] - rss['middle']['rss_mb_total']:+.0f} MB "
                 "in total.\n")
    examples = "".join(f"- {kind}: `{err.split(': ', 1)[1]}`\n" for kind, err in r["example_errors"].items())
    return (head + "| what | result |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
            + drift + "\nThe error record of one bad line of each kind (after `prompts.jsonl line N: `):\n\n" + examples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cpu-2node.yaml")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--bad-every", type=int, default=50, help="every N-th line is bad (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="afsplit-load-") as tmp:
        result = run(args.config, args.requests, args.bad_every, args.seed, Path(tmp))
        if result["lost"] or result["failed_unexpectedly"] or result["bad_but_completed"]:
            print((Path(tmp) / "run.log").read_text()[-3000:], file=sys.stderr)
    result["date"] = dt.date.today().isoformat()
    result["machine"] = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        result["commit"] = "unknown"
    md = markdown(result)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(md)
    ok = not (result["lost"] or result["failed_unexpectedly"] or result["bad_but_completed"]) and \
        result["kv_blocks_in_use_at_end"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
