#!/usr/bin/env bash
# The GPU check: one prepared run for a lent H200 (about 6 minutes, a cold kernel cache
# included; never more than GLOBAL_LIMIT, 7 min 50 s).  Steps, in order, each with its
# own timeout (benchmarks/gpu_check.py STEPS is the one home of the numbers):
#   env        nvidia-smi, versions, is compute-sanitizer there
#   ceilings   2 GiB device-to-device copy; 8192^3 matmul f32 (TF32 off), tf32, bf16, f16
#   precompile import gpuconv, build every module with NVRTC into a fresh CuPy cache
#   tests      pytest -m gpu with GPUCONV_POISON_OUTPUTS=1 (NaN-filled outputs) and a
#              fresh seed (GPUCONV_TEST_SEED, --hypothesis-seed), printed below
#   memcheck   compute-sanitizer --tool memcheck  on one small case per kernel family
#   racecheck  compute-sanitizer --tool racecheck on the same cases (skipped cleanly when
#              the tool is missing or refuses the device)
#   overhead   per-call host time of the real CuPy path, stage by stage
#   bench      every layer of the suite, float32 and bfloat16, vs PyTorch/cuDNN (TF32
#              off): graph replay of rotated input sets (> 2 x L2), >= 24 replays, eager
#              latency and host time separately; stops at its deadline, rows kept
#   report     one JSON line and one short table, printed LAST (partial results too)
# Files: everything under a work dir; $OUT (the device tool's folder) receives
# gpu_check.json, gpu_check_rows.md, report.txt and gpu_check_logs.tar.gz.
#
# Usage (repo root):  bash benchmarks/gpu_check.sh            # on the GPU machine
#                     bash benchmarks/gpu_check.sh --dry-run  # anywhere: the plan + skeleton
# GPUCONV_COMMIT=<hash> names the commit where the tree travels without .git;
# GPUCONV_TEST_SEED=<n> repeats a run's random inputs; GPU_CHECK_SKIP=tests,racecheck
# (step names) leaves steps out, e.g. to rerun the benchmark alone.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${1:-}" = "--dry-run" ]; then
    exec $PY benchmarks/gpu_check.py plan ${2:+--json "$2"}
fi

eval "$($PY benchmarks/gpu_check.py steps)" || { echo "cannot read the step plan"; exit 2; }
T0=$SECONDS
OUT=${OUT:-/tmp/gpuconv_gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export CUPY_CACHE_DIR="$WORK/cupy_cache"     # cold kernel cache, reused by later steps
export CUPY_TF32=0
SEED=${GPUCONV_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
: > "$WORK/steps.tsv"
echo "gpu check: work dir $WORK, seed $SEED, limit ${GLOBAL_LIMIT}s"

# effective timeout of a step: its own, cut to what the global limit leaves (the
# report's time is kept back); 0 means skip
eff_timeout() {
    local own left
    case ",${GPU_CHECK_SKIP:-}," in *",$1,"*) echo 0; return ;; esac
    own=$(eval echo "\$TIMEOUT_$1")
    if [ "$1" = report ]; then left=$((GLOBAL_LIMIT - (SECONDS - T0)))
    else left=$((GLOBAL_LIMIT - (SECONDS - T0) - TIMEOUT_report)); fi
    [ "$left" -lt "$own" ] && own=$left
    [ "$own" -lt 5 ] && own=0
    echo "$own"
}

# run_step NAME TIMEOUT LOG CMD...: SIGINT at the timeout (pytest and python still print),
# SIGKILL 5 s later
run_step() {
    local name=$1 t=$2 log=$3 s rc
    shift 3
    if [ "$t" -le 0 ]; then
        printf '%s\tskipped\t0\t0\n' "$name" >> "$WORK/steps.tsv"
        echo "== $name: skipped (GPU_CHECK_SKIP or the global limit)"
        return 0
    fi
    s=$SECONDS
    timeout -k 5 -s INT "$t" "$@" > "$log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && rc="timeout"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - s))" "$t" >> "$WORK/steps.tsv"
    echo "== $name: rc=$rc, $((SECONDS - s)) s (timeout $t s)"
}

# ---- env
t=$(eff_timeout env)
run_step env "$t" "$WORK/env.txt" bash -c '
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
'"$PY"' -c "import sys, numpy, cupy; print(sys.version); print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__)"
'"$PY"' -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.backends.cudnn.version())" || echo "torch: not usable"
command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo "compute-sanitizer: not found"
nvcc --version | tail -2 || true
git rev-parse --short HEAD 2>/dev/null || true'
head -5 "$WORK/env.txt"

# ---- ceilings (before anything of gpuconv)
t=$(eff_timeout ceilings)
run_step ceilings "$t" "$WORK/ceilings.log" $PY benchmarks/gpu_check.py ceilings --out "$WORK"
tail -1 "$WORK/ceilings.log"

# ---- precompile: cold NVRTC build
t=$(eff_timeout precompile)
run_step precompile "$t" "$WORK/precompile.log" env GPUCONV_PRECOMPILE=0 $PY -c "
import json, sys, time
t0 = time.perf_counter()
import gpuconv
t1 = time.perf_counter()
names = gpuconv.precompile()
t2 = time.perf_counter()
d = {'import_s': t1 - t0, 'precompile_cold_s': t2 - t1, 'entry_points': len(names)}
json.dump(d, open(sys.argv[1], 'w'))
print(d)
" "$WORK/precompile.json"
tail -1 "$WORK/precompile.log"

# ---- gpu tests: poisoned outputs, fresh seed
TIMEOUT_ARG=
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=60"
t=$(eff_timeout tests)
run_step tests "$t" "$WORK/gpu_tests.log" env GPUCONV_POISON_OUTPUTS=1 GPUCONV_TEST_SEED="$SEED" \
    $PY -m pytest -q -p no:cacheprovider -m gpu --maxfail=20 -rfE $TIMEOUT_ARG \
    --hypothesis-seed="$SEED" --junitxml="$WORK/gpu_tests.xml" tests
grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/gpu_tests.log" | tail -6

# ---- compute-sanitizer: memcheck, racecheck
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
for tool in memcheck racecheck; do
    log="$WORK/sanitizer_$tool.log"
    t=$(eff_timeout $tool)
    if [ "$t" -le 0 ]; then
        run_step $tool 0 "$log"
        continue
    fi
    if [ -z "$SAN" ]; then
        echo "SKIPPED: compute-sanitizer not found" > "$log"
        printf '%s\tskipped (no tool)\t0\t0\n' "$tool" >> "$WORK/steps.tsv"
        echo "== $tool: skipped (compute-sanitizer not found)"
        continue
    fi
    extra=
    [ $tool = memcheck ] && extra="--leak-check no"
    run_step $tool "$t" "$log" env GPUCONV_PRECOMPILE=0 GPUCONV_TEST_SEED="$SEED" \
        "$SAN" --tool $tool $extra --error-exitcode 86 --print-limit 20 \
        $PY benchmarks/gpu_check.py sanitize-cases
    grep -E "SUMMARY|SANITIZE-CASES-DONE|WRONG|not supported" "$log" | head -4
done

# ---- host overhead of the real CuPy path
t=$(eff_timeout overhead)
run_step overhead "$t" "$WORK/overhead.txt" $PY benchmarks/host_overhead.py --runtime cupy \
    --quick --json "$WORK/overhead.json"

# ---- the benchmark (stops starting rows 10 s before its timeout)
t=$(eff_timeout bench)
run_step bench "$t" "$WORK/bench.log" $PY benchmarks/gpu_check.py bench --out "$WORK" \
    --deadline-s $((t > 15 ? t - 10 : 5)) --seed "$SEED"
grep -c '"status": "ok"' "$WORK/bench.jsonl" 2>/dev/null | sed 's/^/bench rows ok: /'
grep -v '"status": "ok"' "$WORK/bench.jsonl" 2>/dev/null | cut -c1-200 | head -5

# ---- report: written, copied to $OUT, then printed last
t=$(eff_timeout report)
[ "$t" -le 0 ] && t=5
GPUCONV_TEST_SEED="$SEED" timeout -k 3 -s INT "$t" $PY benchmarks/gpu_check.py report \
    --out "$WORK" > "$WORK/report.txt" 2>&1
rc=$?
printf 'report\t%s\t%s\t%s\n' "$rc" 0 "$t" >> "$WORK/steps.tsv"
cp "$WORK/report.txt" "$OUT/" 2>/dev/null
cp "$WORK/gpu_check.json" "$WORK/gpu_check_rows.md" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude=cupy_cache . 2>/dev/null
echo "== report rc=$rc; total $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$WORK/report.txt"   # the per-row table, then the JSON line and the short table: last
[ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"   # everything is in $OUT now
