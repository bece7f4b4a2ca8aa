#!/usr/bin/env bash
# One prepared GPU check (H200 budget: keep it under 5 minutes):
#   1. the gpu-marked tests and the parametrized suite on the cupy backend,
#   2. the GPU layer suite (python -m gpuconv bench --backend cupy) vs PyTorch/cuDNN
#      (TF32 off), table printed last.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpuconv_gpu_check}
mkdir -p "$OUT"
echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import gpuconv, json; print(json.dumps(gpuconv.backend_info()['backends']['cupy'], default=str))"
echo "== precompile"; time $PY -c "import gpuconv; print(len(gpuconv.precompile()), 'entry points')"
echo "== gpu tests"
timeout 150 $PY -m pytest -q -x -p no:cacheprovider -m gpu tests 2>&1 | tail -25
echo "tests rc=${PIPESTATUS[0]}"
echo "== GPU benchmark (cupy backend vs PyTorch/cuDNN, TF32 off, CUDA events, medians)"
timeout 150 $PY -m gpuconv bench --backend cupy ${1:-} --json "$OUT/gpu_bench.json" 2>"$OUT/gpu_bench.log"
echo "bench rc=$?"
echo "== algorithm comparison (quick layers): direct kernels only"
GPUCONV_CUDA_ALGO=direct timeout 60 $PY -m gpuconv bench --backend cupy --quick --no-peers 2>/dev/null | tail -8
echo "== GPU benchmark table"
cat "$OUT/gpu_bench.log" | tail -3
$PY - "$OUT/gpu_bench.json" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no benchmark json:", e); sys.exit(0)
rows = d.get("rows", d if isinstance(d, list) else [])
print("| layer | pass | ms | GFLOP/s | torch ms | ratio |")
print("|---|---|---|---|---|---|")
for r in rows:
    pm = "-" if r.get("peer_time_ms") is None else f"{r['peer_time_ms']:.3f}"
    ra = "-" if r.get("ratio") is None else f"{r['ratio']:.3f}"
    print(f"| {r['layer']} | {r['pass']} | {r['time_ms']:.3f} | {r['gflops']:.0f} | {pm} | {ra} |")
PYEOF
