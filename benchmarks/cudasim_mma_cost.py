"""Emulator cost of the warp-matrix instructions (gpuconv.testing.cudasim, kernels/warp.cuh).

    python benchmarks/cudasim_mma_cost.py [--iters 2000] [--warps 1 4] [--repeat 5]

Times launches of a kernel whose warps each run `iters` dependent mma.sync (or ldmatrix.x4)
and prints the median seconds per warp-instruction, minus the same loop without the
instruction.  Shared machine: run it alone, read `uptime` first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpuconv._cuda import sources as K  # noqa: E402
from gpuconv.testing.cudasim import SimRuntime  # noqa: E402

SRC = "// ---- warp.cuh\n" + K.read_source(K.WARP) + r"""
// ---- mma_cost.cu
extern "C" __global__ void loop_mma(float* out, int iters, int op) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned short* s = reinterpret_cast<unsigned short*>(smem);
  for (int i = threadIdx.x; i < 32 * 8 * (int)(blockDim.x / 32); i += blockDim.x) s[i] = 0x3f80;
  __syncthreads();
  const unsigned short* row = s + 8 * threadIdx.x;
  for (int it = 0; it < iters; ++it) {
    if (op == 1) gc_mma_m16n8k16_bf16(acc, a, b, acc);
    else if (op == 2) gc_ldmatrix_x4(a, row);
    else if (op == 3) __syncwarp();
    else acc[0] += 1.0f;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc[0] + acc[1] + acc[2] + acc[3] + (float)a[0];
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--schedule", default="forward")
    args = ap.parse_args()
    sim = SimRuntime(schedule=args.schedule)
    fn = sim.get_function(sim.build(SRC, ["loop_mma"], ("--std=c++14",)), "loop_mma")
    print(f"load: {os.getloadavg()}  schedule: {args.schedule}  iters: {args.iters}")
    for w in args.warps:
        out = sim.empty(32 * w, np.float32)
        times = {}
        for op, name in ((0, "empty loop"), (1, "mma m16n8k16 bf16"), (2, "ldmatrix x4"),
                         (3, "__syncwarp")):
            ts = []
            for _ in range(args.repeat + 1):
                t0 = time.perf_counter()
                sim.launch(fn, 1, 32 * w, (out, np.int32(args.iters), np.int32(op)), 32 * 8 * 2 * w)
                ts.append(time.perf_counter() - t0)
            times[name] = float(np.median(ts[1:]))
        base = times["empty loop"]
        for name, t in times.items():
            if name == "empty loop":
                continue
            per = (t - base) / (args.iters * w)
            print(f"warps {w}: {name:20s} {per * 1e6:8.2f} us per warp-instruction "
                  f"({per * 1e9 / 32:7.1f} ns per lane)")


if __name__ == "__main__":
    main()
