#!/usr/bin/env bash
# One device call: Qwen3-30B-A3B-shaped decode runs (random weights) per layout, micro-batch count and variant
# (a --set override: CUDA graphs on/off, or runtime.profile for the exact per-layer time split), each layout
# after a warm-up run (Triton compiles once per machine). Prints each run's stats line; JSON stats and logs
# land in $OUT/runs.tar.gz.
# Usage: bash launch/gpu_decode_runs.sh [BATCH] [IN] [OUT_LEN] [LAYOUTS] [MS] [VARIANTS]
#   LAYOUTS e.g. "1a1e colocated2" (configs/qwen3-30b-a3b-<layout>.yaml), MS e.g. "1 2",
#   VARIANTS e.g. "runtime.cuda_graphs=true runtime.cuda_graphs=false" (default) or "runtime.profile=true"
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/afsplit-out}; mkdir -p "$OUT/runs"
BATCH=${1:-64}; IN=${2:-512}; OUTLEN=${3:-64}; LAYOUTS=${4:-"1a1e colocated2"}; MS=${5:-"1 2"}
VARIANTS=${6:-"runtime.cuda_graphs=true runtime.cuda_graphs=false"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/runs/gpus.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/runs/commit.txt"
python3 -m launch.make_prompts --n "$BATCH" --input-len "$IN" --output-len "$OUTLEN" --vocab 151936 --out /tmp/prompts.jsonl
python3 -m launch.make_prompts --n 8 --input-len 64 --output-len 8 --vocab 151936 --out /tmp/warm.jsonl
for layout in $LAYOUTS; do
  cfg="configs/qwen3-30b-a3b-$layout.yaml"
  timeout 120 python3 -m afsplit.cli generate --config "$cfg" --prompts-file /tmp/warm.jsonl --output /dev/null \
    --no-progress > "$OUT/runs/warmup-$layout.log" 2>&1; echo "warmup $layout rc=$?"
  for m in $MS; do
    for v in $VARIANTS; do
      tag=${v#runtime.}; name="qwen3-30b-a3b-$layout-b$BATCH-m$m-${tag//=/_}"
      timeout 150 python3 -m afsplit.cli generate --config "$cfg" --set runtime.micro_batches=$m \
        --set "$v" --prompts-file /tmp/prompts.jsonl --output /dev/null --no-progress \
        --stats-json "$OUT/runs/$name.json" > "$OUT/runs/$name.log" 2>&1
      echo "$name rc=$?"
      grep -h "run stats" "$OUT/runs/$name.log" | tail -1 | cut -c1-420
      grep -hi "capture failed\|Error\|error:" "$OUT/runs/$name.log" | head -5
    done
  done
done
tar -C "$OUT" -czf "$OUT/runs.tar.gz" runs && rm -rf "$OUT/runs"
