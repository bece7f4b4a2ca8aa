#!/usr/bin/env bash
# One prepared GPU check, sized for a 15-minute device budget (about 4 minutes here):
#   1. the gpu-marked tests (the parametrized suite on the cupy backend + tests/test_gpu.py),
#   2. the GPU layer suite (python -m gpuconv bench --backend cupy) vs PyTorch/cuDNN
#      (TF32 off, CUDA events, medians), and the quick layers on the direct kernels only,
#   3. a short table printed last.
# Full logs and JSON go to $OUT (the device tool brings them back).
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_check.sh [--full]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpuconv_gpu_check}
mkdir -p "$OUT"
QUICK=--quick
[ "${1:-}" = "--full" ] && QUICK=

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import gpuconv, json; print(json.dumps(gpuconv.backend_info()['backends']['cupy'], default=str))"
echo "== import (builds every module with NVRTC) + precompile"
time $PY -c "import gpuconv; print(len(gpuconv.precompile()), 'entry points')"

echo "== gpu tests (full log: $OUT/gpu_tests.log)"
# SIGINT on timeout: pytest still prints its summary
timeout -s INT 120 $PY -m pytest -q -p no:cacheprovider -m gpu --maxfail=10 -rfE \
    --junitxml="$OUT/gpu_tests.xml" tests > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/gpu_tests.log" | tail -15

echo "== GPU benchmark ${QUICK:-(full suite)} (log: $OUT/gpu_bench.log)"
timeout -s INT 90 $PY -m gpuconv bench --backend cupy $QUICK --json "$OUT/gpu_bench.json" \
    > "$OUT/gpu_bench.txt" 2> "$OUT/gpu_bench.log"
echo "bench rc=$?"
echo "== direct kernels only (quick layers, no peers)"
GPUCONV_CUDA_ALGO=direct timeout -s INT 45 $PY -m gpuconv bench --backend cupy --quick --no-peers \
    --json "$OUT/gpu_bench_direct.json" > "$OUT/gpu_bench_direct.txt" 2>&1
echo "direct rc=$?"

echo "== table"
$PY - "$OUT/gpu_bench.json" "$OUT/gpu_bench_direct.json" <<'PYEOF'
import json, sys
direct = {}
try:
    for r in json.load(open(sys.argv[2]))["rows"]:
        direct[(r["layer"], r["pass"])] = r["time_ms"]
except Exception:
    pass
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    print("no benchmark json:", e)
    sys.exit(0)
print("| layer | pass | ms | GFLOP/s | torch ms | ratio torch/gpuconv | direct-only ms |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    pm = "-" if r.get("peer_time_ms") is None else f"{r['peer_time_ms']:.3f}"
    ra = "-" if r.get("ratio") is None else f"{r['ratio']:.3f}"
    dm = direct.get((r["layer"], r["pass"]))
    dm = "-" if dm is None else f"{dm:.3f}"
    print(f"| {r['layer']} | {r['pass']} | {r['time_ms']:.3f} | {r['gflops']:.0f} | {pm} | {ra} | {dm} |")
PYEOF
