#!/usr/bin/env bash
# The 4xH200 runs that issues #4, #6 and #7 still need, in one device call (pick with $1):
#   comm     python -m launch.comm_bench on 2 simulated nodes x 2 GPUs: attention node + expert node, then the mixed layout
#   parity   launch/gpu_parity.py: tiny-model bf16 parity, eager and CUDA graphs, incl. 2 simulated nodes x 2 GPUs
#   runtime  launch/gpu_decode_runs.sh: Qwen3-30B-A3B 2A+2E vs colocated 4, m = 1, 2, CUDA graphs on and off
#   profile  launch/gpu_decode_runs.sh: the same layouts eagerly with runtime.profile (exact per-layer time split)
#   sweep    launch/sweep.py configs/sweeps/h200x4-qwen3.yaml (trim with SPLITS="AF 2A+2E|colocated 4")
# Everything lands in $OUT/results.tar.gz (the device tool returns at most 8 files). The sweep needs DeepSpeed:
# carry wheels in .whl (see docs/benchmarks/e2e-h200x2.md) and name .whl in the call's carry list.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
OUT=${OUT:-/tmp/afsplit-out}; R="$OUT/results"; mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.txt"; date -u > "$R/date.txt"
case "${1:-runtime}" in
  comm)
    timeout 280 python3 -m launch.comm_bench --nodes 2A,2E --device cuda --out "$R/comm-2x2" --timeout 270 2>&1 | tail -40
    timeout 200 python3 -m launch.comm_bench --nodes 1A+1E,1A+1E --device cuda --tokens 1,8,64,1024 --out "$R/comm-2x2-mixed" \
      --timeout 190 2>&1 | tail -20 ;;
  parity)
    timeout 560 python3 launch/gpu_parity.py --out "$R/parity.json" 2>&1 | grep -v "^INFO" | tail -24 ;;
  runtime)
    OUT="$R" timeout 560 bash launch/gpu_decode_runs.sh 128 1024 64 "2a2e colocated4" "1 2" ;;
  profile)
    OUT="$R" timeout 560 bash launch/gpu_decode_runs.sh 128 1024 64 "2a2e colocated4" "1 2" "runtime.profile=true" ;;
  sweep)
    args=()
    IFS='|' read -ra splits <<< "${SPLITS:-}"
    for s in "${splits[@]}"; do args+=(--split "$s"); done
    timeout 540 python3 launch/sweep.py configs/sweeps/h200x4-qwen3.yaml --output "$R/sweep.jsonl" "${args[@]}" 2>&1 | tail -20
    python3 launch/plot.py "$R/sweep.jsonl" --out-dir "$R" --tpot-line 100 > /dev/null 2>&1 ;;
esac
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$R"
ls -la "$OUT"
