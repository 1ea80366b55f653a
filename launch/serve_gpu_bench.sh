#!/usr/bin/env bash
# Serving benchmark on 1 GPU (H200): `afsplit serve` from the single-GPU engine with Qwen3-30B-A3B shapes
# (random bf16 weights), driven by launch/bench_serve.py at 3 request rates up to saturation:
#   1. warm-up (Triton compiles, CUDA graphs of many batch buckets get captured; not recorded);
#   2. saturation: every request at once (--request-rate inf) -> the server's peak request throughput R;
#   3. Poisson arrivals at 0.3 R and 0.7 R (about 40 s of arrivals each).
# Workload: random token-id prompts of 512 tokens, 128 output tokens (--ignore-eos), as the e2e runs use.
# Writes under $OUT: bench-*.json (vLLM's field names), summary.json, summary.md (a markdown table), server.log,
# metrics.txt (the server's /metrics after the runs), config.yaml, gpu.txt, commit.txt.
# Expected runtime: 4-6 minutes (model set-up ~1 min, Triton compilation on a fresh machine ~1-2 min).
# FastAPI/uvicorn/pydantic/aiohttp are not on the GPU machine: carry their wheels in .whl/ (see the server report).
# Usage: OUT=/path bash launch/serve_gpu_bench.sh [INPUT_LEN] [OUTPUT_LEN] [SAT_PROMPTS]
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/afsplit-serve}; mkdir -p "$OUT"
IN=${1:-512}; OUTLEN=${2:-128}; SAT=${3:-256}
PORT=${PORT:-8123}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
cat > "$OUT/config.yaml" <<EOF
# Qwen3-30B-A3B shapes, deterministic random weights, one GPU (the single-process engine)
model: {weights: random, preset: qwen3-30b-a3b, dtype: bfloat16, max_model_len: 4096, routing_skew: 1.0}
topology: {device: cuda, nodes: [{colocated: 1}]}
runtime: {block_size: 16, kv_cache_memory_gb: 40, max_num_seqs: 256, max_num_batched_tokens: 8192}
EOF
python3 -m afsplit.cli serve --config "$OUT/config.yaml" --port "$PORT" --max-waiting 4096 > "$OUT/server.log" 2>&1 &
SERVER=$!
stop_server() {
  kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER"; echo "server exit code $? (0 = clean shutdown)" | tee -a "$OUT/server.log"
}
trap stop_server EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server died:"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server not ready after 300 s"; tail -30 "$OUT/server.log"; exit 1; }
echo "server ready after ${SECONDS} s"

bench() {  # bench NAME RATE NUM_PROMPTS [extra args]
  local name=$1 rate=$2 n=$3; shift 3
  timeout 300 python3 -m launch.bench_serve --port "$PORT" --dataset-name random --random-input-len "$IN" \
    --random-output-len "$OUTLEN" --ignore-eos --num-prompts "$n" --request-rate "$rate" --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename "bench-$name.json" "$@" > "$OUT/bench-$name.log" 2>&1
  echo "bench $name (rate $rate, $n prompts) rc=$? at ${SECONDS} s"
  grep -E "Successful|Failed|Request throughput|Output token|Mean TTFT|Median TTFT|P99 TTFT|Mean TPOT|P99 TPOT" "$OUT/bench-$name.log"
}
bench warmup inf 256 --random-input-len 64 --random-output-len 64 --random-range-ratio 0.9
bench saturation inf "$SAT"
R=$(python3 -c "import json; print(json.load(open('$OUT/bench-saturation.json'))['request_throughput'])" 2>/dev/null || echo 0)
for f in 0.3 0.7; do
  rate=$(python3 -c "print(round($R * $f, 2))")
  n=$(python3 -c "print(max(32, min(400, round($R * $f * 40))))")
  bench "rate$f" "$rate" "$n"
done
curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics.txt"
rm -f "$OUT/bench-warmup.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = []
for name in ("rate0.3", "rate0.7", "saturation"):
    p = out / f"bench-{name}.json"
    if p.exists():
        d = json.loads(p.read_text())
        runs.append({"run": name, **{k: v for k, v in d.items() if not isinstance(v, list)}})
(out / "summary.json").write_text(json.dumps(runs, indent=1))
cols = [("run", "run", "{}"), ("request_rate", "rate (req/s)", "{}"), ("completed", "done", "{}"), ("failed", "failed", "{}"),
        ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.0f}"),
        ("mean_ttft_ms", "TTFT mean", "{:.0f}"), ("median_ttft_ms", "TTFT med", "{:.0f}"), ("p99_ttft_ms", "TTFT p99", "{:.0f}"),
        ("mean_tpot_ms", "TPOT mean", "{:.1f}"), ("median_tpot_ms", "TPOT med", "{:.1f}"), ("p99_tpot_ms", "TPOT p99", "{:.1f}"),
        ("mean_itl_ms", "ITL mean", "{:.1f}"), ("p99_e2el_ms", "E2E p99", "{:.0f}")]
lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
for r in runs:
    lines.append("| " + " | ".join(fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else str(r.get(k)) for k, _, fmt in cols) + " |")
text = "Latencies in ms. " + "\n".join(["", *lines]) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
