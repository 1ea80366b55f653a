#!/usr/bin/env bash
# The 2-GPU measurements of issue 14 (symmetric-memory intra-node mover, the new exchange), for nvidia-h200-x2.
#
#   bash launch/gpu_2gpu_runs.sh "PARTS" ["BATCHES"]     PARTS: any of "tests parity bench perf profile"
#
# Each part fits one 10-minute device call with the others it is paired with below; every run has its own timeout
# and the script stops starting runs when DEADLINE_S (default 560 s) is near, so a call always returns its files.
# Suggested calls (about 4 x 6-9 minutes), with the run tool's kind nvidia-h200-x2:
#   bash launch/gpu_2gpu_runs.sh "tests parity"       # ~1 + ~5 min
#   bash launch/gpu_2gpu_runs.sh "bench profile"      # ~3 + ~3 min
#   bash launch/gpu_2gpu_runs.sh perf 64              # ~6 min
#   bash launch/gpu_2gpu_runs.sh perf 256             # ~7 min
# (the times are estimates: each part prints its own elapsed seconds; nothing here has run on GPUs yet)
#
# tests:   pytest -m gpu tests/test_symm_mem.py: nccl vs symm_mem movers on 2 GPUs (1A+1E, 2C; direct, two_phase),
#          eager and captured in a CUDA graph, every output against the reference and bitwise across movers
# parity:  launch/gpu_parity.py, tiny qwen3_moe (FAMILIES to change) in bf16 against the fp32 CPU engine and the
#          eager single-GPU engine: AF 1A+1E and colocated 2 with intra_node nccl and symm_mem, two_phase + replicas
#          with symm_mem, two_phase + replicas on 2 simulated nodes x 1 GPU (NCCL across), CUDA graphs on
# bench:   launch/comm_bench.py, dispatch and combine timed separately (median, p99), eager and as replayed CUDA
#          graphs, 1-4096 tokens per rank x hidden 2048/4096/7168: 1A+1E and 2C with intra_node nccl / symm_mem
#          (+ adaptive through symm_mem, counts) and 1A,1E on 2 simulated nodes (direct, two_phase, adaptive,
#          counts), each against a raw NCCL all_to_all_single (a2a) and the links' ceilings measured in the run
# perf:    Qwen3-30B-A3B shapes, random weights, Zipf(1.0) routing, BATCHES (default "64 256") x (512 in, 128 out),
#          --warmup, --stats-json: AF 1A+1E m = 1, 2, 3, auto (intra_node auto), AF m = 2 over NCCL, colocated 2,
#          and the single-GPU engine on GPU 0 (PERF_RUNS="single af-m1 ..." picks runs; a later call can finish
#          what a deadline skipped)
# profile: launch/step_profile.py: one replayed decode step per rank under torch.profiler at 256 x (512 in, 64 out)
#          (AF 1A+1E m = 2, colocated 2, single-GPU engine): GPU window split into experts / compute / exchange / idle
#
# Everything lands in $OUT: results-<parts>.tar.gz (all raw JSON, logs, traces), summary-<parts>.md (markdown tables
# and the goals' verdicts, from launch/gpu_2gpu_summary.py), summary-<parts>.json, console-<parts>.log.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/afsplit-out}; R="$OUT/results"; mkdir -p "$R"
PARTS=${1:-"tests parity"}; BATCHES=${2:-"64 256"}; DEADLINE_S=${DEADLINE_S:-560}; FAMILIES=${FAMILIES:-qwen3_moe}
PERF_RUNS=${PERF_RUNS:-"single af-m1 af-m2 af-m3 af-mauto af-m2-nccl colocated2"}
TAG=$(echo "$PARTS $([[ " $PARTS " == *" perf "* ]] && echo "$BATCHES")" | tr ' ' '-' | sed 's/-*$//')
exec > >(tee -a "$OUT/console-$TAG.log") 2>&1
finish() {
  python3 -m launch.gpu_2gpu_summary "$R" "$OUT/summary-$TAG.md" "$OUT/summary-$TAG.json" || true
  tar -C "$OUT" -czf "$OUT/results-$TAG.tar.gz" results && rm -rf "$R"
  ls -la "$OUT"
}
trap finish EXIT
left() { echo $((DEADLINE_S - SECONDS)); }
# run NAME SECONDS CMD...: with a timeout of min(SECONDS, time left - 10); skipped when less than 30 s are left
run() {
  local name=$1 want=$2; shift 2
  local t; t=$(left); t=$((t - 10)); [[ $t -gt $want ]] && t=$want
  if [[ $t -lt 30 ]]; then echo "SKIPPED $name (deadline)"; return; fi
  local t0=$SECONDS
  timeout "$t" "$@" > "$R/$name.log" 2>&1
  echo "$name rc=$? ($((SECONDS - t0)) s)"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -4
  git rev-parse --short HEAD 2>/dev/null || echo "commit: unknown (no .git)"
  date -u
  python3 - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())
try:
    import torch.distributed._symmetric_memory as sm
    print("symmetric memory: empty/rendezvous", hasattr(sm, "empty") and hasattr(sm, "rendezvous"),
          "nvshmem", sm.is_nvshmem_available() if hasattr(sm, "is_nvshmem_available") else "n/a")
except Exception as e:
    print("symmetric memory: unavailable:", e)
PY
} | tee "$R/env.txt"

if [[ " $PARTS " == *" tests "* ]]; then
  t0=$SECONDS
  run tests-symm-mem 240 python3 -m pytest -q -x -m gpu tests/test_symm_mem.py
  tail -5 "$R/tests-symm-mem.log" | tee "$R/tests.log"
  echo "part tests: $((SECONDS - t0)) s"
fi

if [[ " $PARTS " == *" parity "* ]]; then
  t0=$SECONDS; mkdir -p "$R/parity"
  run parity/parity 480 python3 launch/gpu_parity.py --out "$R/parity/parity.json" --families $FAMILIES --layouts \
    "single-gpu eager" "single-gpu graphs" "AF 1A+1E graphs nccl" "AF 1A+1E graphs symm_mem" \
    "colocated 2 graphs nccl" "colocated 2 graphs symm_mem" "AF 1A+1E two_phase+replicas graphs symm_mem" \
    "colocated 2 two_phase+replicas graphs symm_mem" "AF 2 nodes 1A|1E two_phase+replicas graphs"
  grep -v "^INFO\|^\[local_cluster\]\|^{" "$R/parity/parity.log" | tail -14
  echo "part parity: $((SECONDS - t0)) s"
fi

if [[ " $PARTS " == *" bench "* ]]; then
  t0=$SECONDS; mkdir -p "$R/bench"
  TOK=${BENCH_TOKENS:-1,4,16,64,128,256,1024,4096}; HID=${BENCH_HIDDEN:-2048,4096,7168}
  bench() {  # name nodes transports seconds
    run "bench/$1" "$4" python3 -m launch.comm_bench --nodes "$2" --device cuda --tokens "$TOK" --hidden "$HID" \
      --transports "$3" --out "$R/bench/$1" --timeout "$4"
    grep -E "symm_mem|a2a|direct " "$R/bench/$1.log" | grep -E " T=(1|64|256) +D=2048 " | head -16
  }
  bench comm-1a1e "1A+1E" "direct,direct@symm_mem,adaptive@symm_mem,direct:counts,a2a" 200
  bench comm-2c "2C" "direct,direct@symm_mem,a2a" 120
  bench comm-2nodes "1A,1E" "direct,two_phase,adaptive,direct:counts,a2a" 200
  echo "part bench: $((SECONDS - t0)) s"
fi

prompts() {  # n out_len -> path
  local f="/tmp/prompts-$1-$2.jsonl"
  [[ -f $f ]] || python3 -m launch.make_prompts --n "$1" --input-len 512 --output-len "$2" --vocab 151936 --out "$f"
  echo "$f"
}
stats_line() {
  python3 - "$1" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(f"  tok/s {s['output_throughput']:.0f} ({s['tokens_per_s_per_gpu']:.0f}/GPU)  decode step median "
          f"{s['decode_step_ms_median']:.2f} ms  TPOT {s.get('mean_tpot_ms', 0):.2f} ms  TTFT {s.get('mean_ttft_ms', 0):.0f} ms"
          f"  m {s.get('micro_batches')}")
except Exception as e:
    print("  no stats:", e)
PY
}
AF=configs/qwen3-30b-a3b-1a1e.yaml; COL=configs/qwen3-30b-a3b-colocated2.yaml; ONE=configs/qwen3-30b-a3b-1gpu.yaml
GEN=(--output /dev/null --no-progress --warmup)

if [[ " $PARTS " == *" perf "* ]]; then
  t0=$SECONDS; mkdir -p "$R/perf"
  for B in $BATCHES; do
    P=$(prompts "$B" 128)
    perf() {  # name seconds launcher... (then the afsplit arguments)
      local name=$1 secs=$2; shift 2
      run "perf/$name-b$B" "$secs" "$@" --prompts-file "$P" "${GEN[@]}" --stats-json "$R/perf/$name-b$B.json"
      stats_line "$R/perf/$name-b$B.json"
      grep -hi "capture failed\|error\|cuda_graphs: off\|comm.intra_node" "$R/perf/$name-b$B.log" | head -3
    }
    TR=(torchrun --nproc-per-node 2 -m afsplit.cli generate)
    for name in $PERF_RUNS; do
      case $name in
        single) perf single 150 env CUDA_VISIBLE_DEVICES=0 python3 -m afsplit.cli generate --config $ONE ;;
        af-m2-nccl) perf af-m2-nccl 150 "${TR[@]}" --config $AF --set runtime.micro_batches=2 --set comm.intra_node=nccl ;;
        af-m*) perf "$name" 150 "${TR[@]}" --config $AF --set "runtime.micro_batches=${name#af-m}" ;;
        colocated2) perf colocated2 150 "${TR[@]}" --config $COL ;;
        *) echo "unknown perf run $name" ;;
      esac
    done
  done
  echo "part perf: $((SECONDS - t0)) s"
fi

if [[ " $PARTS " == *" profile "* ]]; then
  t0=$SECONDS; mkdir -p "$R/profile"
  P=$(prompts 256 64)  # all 256 decode together from step ~17 (16 prompts of 512 per 8192-token step) to ~64
  prof() {  # name seconds launcher... (its afsplit arguments follow the wrapper's --)
    local name=$1 secs=$2; shift 2
    run "profile/$name" "$secs" "$@" --prompts-file "$P" "${GEN[@]}"
    grep -h "step_profile:" "$R/profile/$name.log"
  }
  SP=(-m launch.step_profile --replay 15)  # the 15th replayed step of the measured run: ~step 32, batch 256
  prof af-m2 170 torchrun --nproc-per-node 2 "${SP[@]}" --out "$R/profile/af-m2" -- generate --config $AF \
    --set runtime.micro_batches=2
  prof colocated2 170 torchrun --nproc-per-node 2 "${SP[@]}" --out "$R/profile/colocated2" -- generate --config $COL
  prof single 150 env CUDA_VISIBLE_DEVICES=0 python3 "${SP[@]}" --out "$R/profile/single" -- generate --config $ONE
  echo "part profile: $((SECONDS - t0)) s"
fi
