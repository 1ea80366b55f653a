#!/usr/bin/env bash
# Deployment planner (issue 18) on 1 GPU, one device call of ~4-5 minutes on 1 H200:
#   1. afsplit profile, Qwen3-30B-A3B shapes (random weights, bf16): kernel tables (with mixed prefill + decode
#      points), then whole runs of
#      2-layer and full-depth (48-layer) copies (engine in-process at B = 1, 8, 32, 64, 256, one long-prompt
#      run and one with CUDA graphs off; 1-rank runtime under torchrun at B = 256, graphs off, 8)  -> profile.json
#   2. the single-GPU engine, one model load, 5 workloads                            -> runs/engine-*.json
#   3. the distributed runtime with one colocated rank (torchrun --nproc-per-node 1), 5 workloads (one with m=2),
#      each `afsplit generate --warmup --stats-json`, until the time budget           -> runs/runtime-*.json
#   4. afsplit plan validate on them; its last line: max relative error X over N runs -> validate.txt
#   5. with MIXTRAL=1 and time left: a kernels-only profile of Mixtral-8x7B shapes   -> profile-mixtral.json
# Every run is Qwen3-30B-A3B-shaped with random weights, greedy, ignore_eos, all requests submitted at once.
# Everything lands in $OUT/planner.tar.gz (unpack into docs/benchmarks/planner-h200/).
# Usage: bash launch/planner_runs.sh [BUDGET_S]   (runtime runs are skipped past BUDGET_S, default 240; the
#        profile's runtime points past PROFILE_BUDGET_S of the profile, default 140)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${1:-240}; PROFILE_BUDGET=${PROFILE_BUDGET_S:-140}
OUT=${OUT:-/tmp/afsplit-out}; P="$OUT/planner"; mkdir -p "$P/runs" "$P/logs"
CFG=configs/qwen3-30b-a3b-colocated2.yaml
SETS=(--set "topology.nodes=[{colocated: 1}]" --set runtime.max_num_seqs=256 --set runtime.kv_cache_memory_gb=40
      --set runtime.micro_batches=1)
ENGINE_RUNS=8x512x128,64x512x128,256x512x64,64x2048x128,32x4096x64
# the worst-predicted first (a budget drops the last); the m=2 run right after its m=1 twin
RUNTIME_RUNS="256x512x64 64x2048x128 8x512x128 64x512x128 64x512x128:m2"  # :m2 = runtime.micro_batches=2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u; echo "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; } \
  | tee "$P/machine.txt"

echo "== profile ($SECONDS s)"
timeout $((PROFILE_BUDGET + 70)) python3 -m afsplit.cli profile --config $CFG "${SETS[@]}" --out "$P/profile.json" \
  --time-budget-s $PROFILE_BUDGET \
  > "$P/logs/profile.log" 2>&1; echo "profile rc=$?"; tail -3 "$P/logs/profile.log"

echo "== engine runs ($SECONDS s)"
timeout 100 python3 -m afsplit.planner.engine_runs --config $CFG "${SETS[@]}" --runs $ENGINE_RUNS --out-dir "$P/runs" \
  > "$P/logs/engine.log" 2>&1; echo "engine rc=$?"; grep "decode step" "$P/logs/engine.log"

runtime_run() {  # BxINxOUT [extra --set ...]: one afsplit generate under torchrun, workload added to its stats JSON
  local w=$1; shift
  IFS=x read -r b il ol <<< "$w"
  local name="runtime-b$b-in$il-out$ol$([ $# -gt 0 ] && echo "-m2")"
  python3 -m launch.make_prompts --n "$b" --input-len "$il" --output-len "$ol" --vocab 151936 --out /tmp/planner-p.jsonl
  timeout 60 torchrun --nproc-per-node 1 -m afsplit.cli generate --config $CFG "${SETS[@]}" "$@" \
    --prompts-file /tmp/planner-p.jsonl --output /dev/null --no-progress --warmup --stats-json "$P/runs/$name.json" \
    > "$P/logs/$name.log" 2>&1
  echo "$name rc=$? ($SECONDS s)"
  [ -f "$P/runs/$name.json" ] && python3 - "$P/runs/$name.json" "$b" "$il" "$ol" <<'EOF'
import json, sys
path, b, il, ol = sys.argv[1], *map(int, sys.argv[2:])
s = json.load(open(path))
s.update(mode="runtime", warmup=True, workload={"input_len": il, "output_len": ol, "num_requests": b})
json.dump(s, open(path, "w"), indent=1)
print(f"  decode step {s['decode_step_ms_median']:.2f} ms (median), {s['tokens_per_s_per_gpu']:.1f} tok/s/GPU")
EOF
}
echo "== runtime runs ($SECONDS s)"
for w in $RUNTIME_RUNS; do
  if [ $SECONDS -gt $BUDGET ]; then echo "skip $w: past the time budget"; continue; fi
  case $w in *:m2) runtime_run "${w%:m2}" --set runtime.micro_batches=2 ;; *) runtime_run "$w" ;; esac
done

echo "== validate ($SECONDS s)"
python3 -m afsplit.cli plan validate --profile "$P/profile.json" "$P/runs" | tee "$P/validate.txt"

if [ "${MIXTRAL:-0}" = 1 ] && [ $SECONDS -lt $((BUDGET - 60)) ]; then
  echo "== mixtral kernels-only profile ($SECONDS s)"
  timeout 100 python3 -m afsplit.cli profile --config configs/mixtral-8x7b-2a2e.yaml \
    --set "topology.nodes=[{colocated: 1}]" --system none --out "$P/profile-mixtral.json" \
    > "$P/logs/profile-mixtral.log" 2>&1; echo "mixtral profile rc=$?"
fi
echo "== done ($SECONDS s)"
tar -czf "$OUT/planner.tar.gz" -C "$OUT" planner && rm -rf "$P"
ls -la "$OUT"
