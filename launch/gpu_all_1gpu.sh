#!/usr/bin/env bash
# A session's 1-GPU checks and measurements in few device calls: choose the parts per call.
#   bash launch/gpu_all_1gpu.sh "ktests parity serve"      then      bash launch/gpu_all_1gpu.sh "planner mla"
# ktests  every gpu-marked test, 8 concurrent shards (limit 300 s: GPU engines warm-start, runtime.capture_at_start)
# parity  tiny models in bf16 (launch/gpu_parity.py): single-GPU engine eager/graphs, the 1-rank runtime, for
#         qwen3_moe, deepseek_v2, deepseek_v3 (limit 120 s)
# serve   launch/serve_gpu_bench.sh: afsplit serve + the load generator at 3 rates (limit 320 s; wheels in .whl/)
# planner launch/planner_runs.sh 320 (limit 380 s)
# mla     launch/mla_gpu_check.py --only ceilings,decode,engine (limit 150 s)
# engine  launch/engine_bench.py 64,256 x (512 in, 128 out): decode floor, async scheduling on vs off (same engine),
#         TTFT with piecewise prefill graphs
#         against eager prefill in the same engine, tokens compared, the warm start's seconds (limit 480 s)
# esample launch/engine_bench.py 64 x (512 in, 128 out) sampled on the device (temperature 0.8, top-p 0.95): decode
#         step with async scheduling on vs off, tokens compared (limit 200 s)
# pattn   launch/prefill_attn_ab.py: whole-prompt prefill attention, paged-prefix path vs no-prefix path (limit 60 s)
# mattn   launch/mixed_attn_ab.py: a mixed step's attention, decode rows on the decode kernel vs one prefill call (limit 90 s)
# align   launch/moe_align_bench.py: MoE alignment, one launch vs two, against the torch reference (limit 90 s)
# moetune fused-MoE tuning for Qwen3-30B-A3B shapes (compile in 8 shards, then kernels/tune.py --only moe, budget
#         MOE_BUDGET=130 s), then the engine benchmark at 64 x (512, 128) with that table (limit 420 s)
# kbench  the kernels benchmark against measured ceilings (kernels/bench.py via launch/kernels_h200.sh parts)
# Everything lands in $OUT/<part>.tgz (at most 8 files come back from a device call).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PARTS=${1:-"ktests parity"}; ROOT_OUT=${OUT:-/tmp/afsplit-out}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; export COMMIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$ROOT_OUT/gpu.txt"; echo "commit $COMMIT" >> "$ROOT_OUT/gpu.txt"
part() {  # part NAME LIMIT CMD...: its own $OUT, a time limit, a tarball
  local name=$1 limit=$2 start=$SECONDS; shift 2
  export OUT="$ROOT_OUT/$name"; mkdir -p "$OUT"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(( SECONDS - start ))s"; tail -25 "$OUT/$name.log"
  tar -C "$ROOT_OUT" -czf "$ROOT_OUT/$name.tgz" "$name" && rm -rf "$OUT"
}
ktests() {
  python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests | grep '::' > "$OUT/ids.txt"
  for i in 0 1 2 3 4 5 6 7; do
    awk -v i=$i 'NR % 8 == i' "$OUT/ids.txt" > "$OUT/ids.$i"
    (mapfile -t ids < "$OUT/ids.$i"; [ ${#ids[@]} -gt 0 ] && python3 -m pytest -v -p no:cacheprovider "${ids[@]}" \
      > "$OUT/shard.$i.log" 2>&1) &
  done
  wait
  grep -h " FAILED\| ERROR" "$OUT"/shard.*.log | head -40
  echo "GPU tests: $(cat "$OUT"/shard.*.log | grep -c ' PASSED') passed, $(cat "$OUT"/shard.*.log | grep -c ' FAILED') failed," \
       "$(cat "$OUT"/shard.*.log | grep -c ' SKIPPED') skipped of $(wc -l < "$OUT/ids.txt")"
}
moetune() {
  local args="--only moe --moe-models qwen3-30b-a3b" i
  for i in 0 1 2 3 4 5 6 7; do
    python3 kernels/tune.py --compile-only --shard $i/8 --out /dev/null --budget-s 70 $args > "$OUT/compile.$i.log" 2>&1 &
  done
  wait
  grep -h "compile pass" "$OUT"/compile.[0-7].log
  python3 kernels/tune.py --out "$OUT/moe-table.json" --md "$OUT/tuning.md" --budget-s "${MOE_BUDGET:-130}" $args \
    > "$OUT/tune.log" 2>&1
  tail -15 "$OUT/tune.log"
  AFSPLIT_KERNEL_TUNING="$OUT/moe-table.json" python3 launch/engine_bench.py --out "$OUT/engine.json" \
    --md "$OUT/engine.md" --requests 64 --no-prefill-ab --profile 64
}
export -f ktests moetune
for p in $PARTS; do
  case $p in
    ktests) part ktests 300 bash -c ktests ;;
    parity) part parity 120 python3 launch/gpu_parity.py --out "$ROOT_OUT/parity/parity.json" \
              --families qwen3_moe deepseek_v2 deepseek_v3 --layouts "single-gpu eager" "single-gpu decode graphs" "single-gpu graphs" "colocated 1 graphs" ;;
    engine) part engine 480 python3 launch/engine_bench.py --out "$ROOT_OUT/engine/engine.json" \
              --md "$ROOT_OUT/engine/engine.md" --requests 64,256 --profile 64 ;;
    esample) part esample 200 python3 launch/engine_bench.py --out "$ROOT_OUT/esample/engine.json" \
              --md "$ROOT_OUT/esample/engine.md" --requests 64 --temperature 0.8 --top-p 0.95 --no-prefill-ab ;;
    pattn) part pattn 60 python3 launch/prefill_attn_ab.py --out "$ROOT_OUT/pattn/prefill_attn_ab.json" ;;
    serve) part serve 320 bash launch/serve_gpu_bench.sh ;;
    planner) part planner 380 bash launch/planner_runs.sh 320 ;;
    mla) part mla 150 python3 launch/mla_gpu_check.py --only ceilings,decode,engine ;;
    mattn) part mattn 90 python3 launch/mixed_attn_ab.py --out "$ROOT_OUT/mattn/mixed_attn_ab.json" ;;
    align) part align 90 python3 launch/moe_align_bench.py --out "$ROOT_OUT/align" ;;
    moetune) part moetune 420 bash -c moetune ;;
    kbench) part kbench 200 python3 kernels/bench.py --out "$ROOT_OUT/kbench/kernels.json" --md "$ROOT_OUT/kbench/kernels.md" ;;
    *) echo "unknown part $p" ;;
  esac
done
