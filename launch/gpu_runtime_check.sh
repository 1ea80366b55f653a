#!/usr/bin/env bash
# One device call for the runtime: bf16 parity of the tiny models on the GPUs, then decode runs of the
# Qwen3-30B-A3B-shaped model (random weights) in AF and colocated layouts with TPOT, tokens/s/GPU and
# the per-layer time split. Results land in $OUT. Usage: bash launch/gpu_runtime_check.sh [BATCH] [IN] [OUT_LEN]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/afsplit-out}; mkdir -p "$OUT"
BATCH=${1:-128}; IN=${2:-512}; OUTLEN=${3:-64}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

if [ "${PARITY:-1}" = 1 ]; then  # PARITY=0: only the decode runs
  python3 launch/gpu_parity.py --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log" | grep -v "^INFO"
fi

python3 -m launch.make_prompts --n "$BATCH" --input-len "$IN" --output-len "$OUTLEN" --vocab 151936 --out /tmp/prompts.jsonl
if [ "$NGPU" -ge 4 ]; then layouts="2a2e colocated4"; else layouts="1a1e colocated2"; fi
for layout in $layouts; do
  for profile in false true; do
    name="qwen3-30b-a3b-$layout-b$BATCH-profile_$profile"
    timeout 110 python3 -m afsplit.cli generate --config "configs/qwen3-30b-a3b-$layout.yaml" \
      --set runtime.profile=$profile --prompts-file /tmp/prompts.jsonl --output /dev/null --no-progress \
      --stats-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "$name rc=$?"; grep "run stats" "$OUT/$name.log" | tail -1 | cut -c1-600
  done
done
