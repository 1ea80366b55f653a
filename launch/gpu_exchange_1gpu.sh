#!/usr/bin/env bash
# One device call on 1 GPU: the exchange's own cost and graph safety (issue "the exchange at full speed").
#   bash launch/gpu_exchange_1gpu.sh [PARTS] [BATCHES]      PARTS: any of "tests parity perf" (default: all)
# tests:  GPU tests of the balancer (graph capture of least-loaded replica choice, padding ids -1)
# parity: tiny models in bf16, single-GPU engine (eager, graphs) vs the runtime with one colocated rank
#         (graphs; two_phase + replicas; counts): every decode step bit-identical to the graphed engine
# perf:   Qwen3-30B-A3B shapes, random weights, BATCH x (512 in, 128 out), --warmup: the single-process engine
#         vs the distributed runtime with one colocated rank (defaults; two_phase + replicas auto), same call
# Results: $OUT/*.json and $OUT/*.log (stats JSON per run, parity JSON, pytest log).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/afsplit-out}; mkdir -p "$OUT"
PARTS=${1:-"tests parity perf"}; BATCHES=${2:-"64 256"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
CFG=configs/qwen3-30b-a3b-1gpu.yaml
if [[ " $PARTS " == *" tests "* ]]; then
  timeout 120 python3 -m pytest -q -x tests/test_balancer.py -k cuda 2>&1 | tail -5 | tee "$OUT/tests.log"
fi
if [[ " $PARTS " == *" parity "* ]]; then
  timeout 300 python3 launch/gpu_parity.py --out "$OUT/parity.json" --families qwen3_moe qwen2_moe \
    --layouts "single-gpu eager" "single-gpu graphs" "colocated 1 graphs" "colocated 1 two_phase+replicas graphs" \
    "colocated 1 counts" > "$OUT/parity.log" 2>&1; echo "parity rc=$?"; tail -12 "$OUT/parity.log"
fi
if [[ " $PARTS " == *" perf "* ]]; then
  for B in $BATCHES; do
    python3 -m launch.make_prompts --n "$B" --input-len 512 --output-len 128 --vocab 151936 --out /tmp/p$B.jsonl
    run() {  # name, launcher..., extra args
      local name=$1; shift
      timeout 200 "$@" --config $CFG --prompts-file /tmp/p$B.jsonl --output /dev/null --no-progress --warmup \
        --stats-json "$OUT/$name-b$B.json" > "$OUT/$name-b$B.log" 2>&1
      echo "$name b$B rc=$?"
      python3 - "$OUT/$name-b$B.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(f"  tok/s {s['output_throughput']:.0f}  decode step median {s['decode_step_ms_median']:.2f} ms  "
          f"mean TTFT {s.get('mean_ttft_ms', 0):.0f} ms  TPOT {s.get('mean_tpot_ms', 0):.2f} ms  steps {s['steps']}")
except Exception as e:
    print("  no stats:", e)
PY
      grep -hi "capture failed\|error\|cuda_graphs: off" "$OUT/$name-b$B.log" | head -3
    }
    run single python3 -m afsplit.cli generate
    run colocated1 torchrun --nproc-per-node 1 -m afsplit.cli generate
    run colocated1-two_phase-replicas torchrun --nproc-per-node 1 -m afsplit.cli generate \
      --set comm.transport=two_phase --set balancer.replicas=auto --set balancer.spare_slots_per_rank=2
  done
fi
