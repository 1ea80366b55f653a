#!/usr/bin/env bash
# One GPU call on 1 H200: GPU kernel tests, tuning sweep, kernel benchmark against measured ceilings
# and torch baselines, single-GPU engine benchmark. At most 9 min 10 s (the sum of the phase limits;
# less when phases finish early). Every phase runs under its own time limit, a failing or cut phase
# does not stop the others, and every phase writes its results as it goes.
#
#   bash launch/kernels_h200.sh            # from the repo root; results under $OUT (default /tmp/afsplit-out)
#   COMMIT=abc1234 bash launch/kernels_h200.sh   # where the working copy has no .git
#
# Knobs (environment; defaults = the full run above):
#   TEST_K='flash or moe'   pytest -k expression for the GPU tests (default: all of tests/test_kernels_gpu.py)
#   TUNE_ARGS='--only prefill,moe --prefill-prefix none'   extra kernels/tune.py arguments (compile and tune)
#   TUNE_BUDGET=115         tuner wall-clock budget (s); the tune phase's limit is TUNE_BUDGET + 15
#   BENCH_ONLY=moe,prefill  kernels/bench.py parts, in this order (default decode,prefill,moe)
#   BENCH_LIMIT=100         the bench phase's limit (s)
#   ENGINE=0                skip the engine benchmark
#   OVERLAP=1               run the GPU tests and the candidate compiles side by side (one phase, limit TC_LIMIT=130)
#
# Writes under $OUT:
#   tests.log, tests.[0-7].log    pytest -v of tests/test_kernels_gpu.py in 8 concurrent shards (limit 120 s)
#   compile.[0-7].log             every tuning candidate compiled once by 8 processes (limit 80 s)
#   tuning/<device>.json          the tuning table (commit it as kernels/tuning/<device>.json), tune.log,
#   tuning.md                     chosen config vs the heuristic per shape (limit 130 s, budget 115 s)
#   kernels.json, kernels.md      ceilings + decode / prefill / MoE vs ceilings and baselines, with the
#                                 table just measured active (limit 100 s)
#   engine.json, engine.md        Qwen3-30B-A3B shapes, 64 and 256 x (512 in, 128 out), warm-up on:
#                                 decode step vs weight+KV read floor, TTFT (limit 120 s)
#   summary.md                    all of the above in one page (draft of docs/benchmarks/kernels-h200.md)
#   times.txt                     rc and seconds per phase
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET AFSPLIT_KERNEL_TUNING
OUT=${OUT:-/tmp/afsplit-out}
mkdir -p "$OUT/tuning"
: > "$OUT/times.txt"
T0=$(date +%s)

phase() {  # phase NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, record rc + seconds
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/times.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null \
  || python3 -c "import torch; print(torch.cuda.get_device_name(0))" > "$OUT/gpu.txt" 2>/dev/null || echo "unknown GPU" > "$OUT/gpu.txt"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # set COMMIT= where the copy has no .git
export COMMIT
SLUG=$(python3 -c "import torch; from kernels._tuning import device_slug; print(device_slug(torch.cuda.get_device_name(0)))" 2>/dev/null || echo gpu)
TABLE="$OUT/tuning/$SLUG.json"

TEST_K=${TEST_K:-}
TUNE_ARGS=${TUNE_ARGS:-}
TUNE_BUDGET=${TUNE_BUDGET:-115}
BENCH_ONLY=${BENCH_ONLY:-decode,prefill,moe}
BENCH_LIMIT=${BENCH_LIMIT:-100}
ENGINE=${ENGINE:-1}
OVERLAP=${OVERLAP:-0}
TC_LIMIT=${TC_LIMIT:-130}

gpu_tests() {  # the GPU tests in 8 concurrent pytest processes (their Triton compiles are the slow part)
  python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_gpu.py ${TEST_K:+-k "$TEST_K"} \
    | grep '::' > "$OUT/test_ids.txt"
  local i
  for i in 0 1 2 3 4 5 6 7; do
    awk -v i=$i 'NR % 8 == i' "$OUT/test_ids.txt" > "$OUT/test_ids.$i"
    (mapfile -t ids < "$OUT/test_ids.$i"; [ ${#ids[@]} -gt 0 ] && \
      python3 -m pytest -v -p no:cacheprovider "${ids[@]}" > "$OUT/tests.$i.log" 2>&1) &
  done
  wait
  cat "$OUT"/tests.[0-7].log
}

test_counts() {  # from the shard logs, so a phase cut by its limit still reports what ran
  local logs=("$OUT"/tests.[0-7].log) n
  n=$(wc -l < "$OUT/test_ids.txt" 2>/dev/null || echo "?")
  echo "GPU tests: $(cat "${logs[@]}" 2>/dev/null | grep -c ' PASSED') passed, $(cat "${logs[@]}" 2>/dev/null | grep -c ' FAILED') failed, $(cat "${logs[@]}" 2>/dev/null | grep -c ' SKIPPED') skipped, $(cat "${logs[@]}" 2>/dev/null | grep -c ' ERROR') errors, of $n collected"
}

compile_candidates() {  # every tuning candidate compiled once, 8 processes at a time, into Triton's cache
  local i
  for i in 0 1 2 3 4 5 6 7; do
    python3 kernels/tune.py --compile-only --shard $i/8 --out /dev/null --budget-s 70 $TUNE_ARGS \
      > "$OUT/compile.$i.log" 2>&1 &
  done
  wait
  grep -h "compile pass" "$OUT"/compile.[0-7].log
}

tests_and_compile() {  # both at once: the compiles use the CPUs the tests leave idle
  bash -c gpu_tests > "$OUT/tests.log" 2>&1 &
  compile_candidates
  wait
}

export OUT TEST_K TUNE_ARGS
export -f gpu_tests compile_candidates tests_and_compile
if [ "$OVERLAP" = 1 ]; then
  phase tests_compile "$TC_LIMIT" bash -c tests_and_compile
  test_counts | tee -a "$OUT/tests.log"
else
  phase tests 120 bash -c gpu_tests
  test_counts | tee -a "$OUT/tests.log"
  phase compile 80 bash -c compile_candidates
fi
# shellcheck disable=SC2086
phase tune $(( TUNE_BUDGET + 15 )) python3 kernels/tune.py --out "$TABLE" --md "$OUT/tuning.md" --budget-s "$TUNE_BUDGET" \
  $TUNE_ARGS
cp "$OUT/tune.log" "$OUT/tuning/" 2>/dev/null
if [ -s "$TABLE" ]; then export AFSPLIT_KERNEL_TUNING="$TABLE"; fi
phase bench "$BENCH_LIMIT" python3 kernels/bench.py --out "$OUT/kernels.json" --md "$OUT/kernels.md" --only "$BENCH_ONLY"
if [ "$ENGINE" != 0 ]; then
  phase engine 120 python3 launch/engine_bench.py --out "$OUT/engine.json" --md "$OUT/engine.md" --requests 64,256
fi

{
  echo "# Kernels and single-GPU engine: $(head -1 "$OUT/gpu.txt")"
  echo
  echo "* Date: $(date -u +%Y-%m-%dT%H:%MZ); commit $COMMIT; $(python3 -c 'import torch, triton; print(f"torch {torch.__version__}, Triton {triton.__version__}")' 2>/dev/null)"
  echo "* Command: \`bash launch/kernels_h200.sh\` ($(( $(date +%s) - T0 )) s in all); phases:"
  sed 's/^/  * /' "$OUT/times.txt"
  echo "* $(grep -h '^GPU tests:' "$OUT/tests.log" || echo 'GPU tests: no summary (see tests.*.log)')"
  grep -hE " (FAILED|ERROR)" "$OUT"/tests.[0-7].log 2>/dev/null | head -20 | sed 's/^/  * /'
  echo
  echo "## Tuning (kernels/tune.py)"
  echo
  cat "$OUT/tuning.md" 2>/dev/null || echo "(no tuning table: see tune.log)"
  echo
  echo "## Kernels (kernels/bench.py)"
  echo
  cat "$OUT/kernels.md" 2>/dev/null || echo "(no kernel results: see bench.log)"
  echo
  echo "## Single-GPU engine (launch/engine_bench.py)"
  echo
  cat "$OUT/engine.md" 2>/dev/null || echo "(no engine results: see engine.log)"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
