#!/usr/bin/env bash
# One-command GPU check, for a CUDA host (e.g. an H200), from the repository root:
#
#   bash benchmarks/gpu_check.sh            # OUT=folder for logs and results (default results/gpu_check)
#   DEVICE=cpu bash benchmarks/gpu_check.sh # the same steps on the CPU path (no GPU needed)
#   BENCH_ARGS="--size small --rounds 3"     # extra arguments for `pyfast bench all`
#
# 1. builds pyfast._C from source against this host's torch (in place, no install, no network);
# 2. runs the whole test suite on this host, where every CUDA test must run: a CUDA test that skips
#    fails the check;
# 3. runs `pyfast bench all --device cuda` (kernels against stock PyTorch, side by side);
# 4. where compute-sanitizer exists, runs every CUDA kernel once under memcheck and racecheck
#    (benchmarks/cuda_sanitize.py: small shapes, results checked against the references);
# 5. prints a short summary table last.
# TEST_TIMEOUT / SANITIZE_TIMEOUT (seconds) bound steps 2 and 4; PYTEST_ARGS adds pytest
# arguments (e.g. "-n 8" where pytest-xdist is installed: a crashing test then fails alone).
# Budget: about 10 minutes on an H200, build included (two .cu files compile in parallel).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX} MAX_JOBS=${MAX_JOBS:-8}

DEVICE=${DEVICE:-cuda}
t0=$(date +%s)
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible (DEVICE=cpu runs the CPU path)'" || exit 2
fi

echo "== build (log: $OUT/build.log)"
rm -rf build/temp.* pyfast/_C*.so
if "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then build=ok; else build=FAILED; fi
tail -3 "$OUT/build.log"
t_build=$(($(date +%s) - t0))
[ "$build" = ok ] || { echo "build failed; see $OUT/build.log"; exit 1; }
"$PY" -c "import pyfast; i = pyfast.extension_info(); print(i); \
assert i['compiled'] and (i['cuda_kernels'] or '$DEVICE' == 'cpu'), i" || exit 1

echo "== tests (log: $OUT/tests.log)"
timeout "${TEST_TIMEOUT:-1200}" "$PY" -m pytest -v -rs -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-} tests \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT/tests.log"
cuda_skips=0
[ "$DEVICE" = cuda ] && cuda_skips=$(grep -E "^SKIPPED" "$OUT/tests.log" | grep -ci "cuda" || true)
t_tests=$(($(date +%s) - t0 - t_build))

echo "== benchmarks (log: $OUT/bench.log)"
"$PY" -m pyfast.cli bench all --device "$DEVICE" --output "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
t_bench=$(($(date +%s) - t0 - t_build - t_tests))

sanitize="not run (DEVICE=$DEVICE)"
if [ "$DEVICE" = cuda ]; then
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer (log: $OUT/sanitize.log)"
    sanitize=""
    for tool in memcheck racecheck; do
      timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" benchmarks/cuda_sanitize.py cuda >>"$OUT/sanitize.log" 2>&1
      rc=$?
      sanitize="$sanitize $tool rc=$rc"
      [ "$rc" = 0 ] || sanitize_failed=1
    done
    tail -4 "$OUT/sanitize.log"
  else
    sanitize="not run (no compute-sanitizer on PATH)"
  fi
fi
t_total=$(($(date +%s) - t0))

echo
echo "== summary ($(date -u +%F), $("$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), device $DEVICE)"
printf '| step | result | seconds |\n|---|---|---|\n'
printf '| build | %s | %s |\n' "$build" "$t_build"
printf '| tests | %s (%s CUDA tests skipped where CUDA is required) | %s |\n' \
  "$(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1)" "$cuda_skips" "$t_tests"
printf '| bench | rc=%s (table: %s/bench/results.md) | %s |\n' "$bench_rc" "$OUT" "$t_bench"
printf '| compute-sanitizer | %s | %s |\n' "$sanitize" "$((t_total - t_build - t_tests - t_bench))"
[ -f "$OUT/bench/results.md" ] && tail -n +5 "$OUT/bench/results.md"
[ "$tests_rc" = 0 ] && [ "$cuda_skips" = 0 ] && [ "$bench_rc" = 0 ] && [ -z "${sanitize_failed:-}" ]
