"""A toy tensor-core GEMM written with kernels/warp.cuh: ldmatrix + mma.sync + a two-stage
cp.async pipeline, C = A @ B in bfloat16 with float32 accumulation.

It must match a float64 matmul under every emulator schedule, and each injected bug must
fail with the named error.  The same source compiles with NVRTC (sm_80, sm_90) and its SASS
shows the instructions meant (HMMA, LDSM, LDGSTS).
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from gpuconv._cuda import sources as K

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
from gpuconv.testing.cudasim import (SCHEDULES, AsyncCopyError, MemoryAccessError,  # noqa: E402
                                     SimRuntime, WarpSyncError)

SIM_OK, SIM_WHY = cudasim.probe()[:2]
needs_sim = pytest.mark.skipif(not SIM_OK, reason=f"cudasim unusable: {SIM_WHY}")

BM, BN, BK = 64, 64, 16
SMEM = 2 * (BM * BK + BK * BN) * 2  # two stages of the A and B tiles, bfloat16

SRC = "// ---- warp.cuh\n" + K.read_source(K.WARP) + "\n" + r"""// ---- toy_gemm.cu
// C[M][N] = A[M][K] @ B[K][N], all row-major; A, B bfloat16 bits, C float32.
// Block: 128 threads = 2x2 warps, a 64x64 tile of C; warp (wm, wn) owns a 32x32 sub-tile
// = 2 (m16) x 4 (n8) mma tiles.  K in steps of 16 through two shared-memory stages filled
// by cp.async (16 bytes = 8 elements per copy, one A and one B copy per thread per stage).
// bug: 0 none, 1 no cp.async wait at all, 2 wait<1> at the last stage (wait<0> needed),
// 3 one lane skips an mma, 4 a misaligned ldmatrix row, 5 an ldmatrix row past the tile
// (past the end of shared memory), 6 no barrier between the wait and the reads.
#define TOY_BM 64
#define TOY_BN 64
#define TOY_BK 16

__device__ __forceinline__ void toy_load_stage(unsigned short* As, unsigned short* Bs,
                                               const unsigned short* A, const unsigned short* B,
                                               int N, int K, int m0, int n0, int kt, int stage,
                                               int tid) {
  const int ar = tid >> 1, ac = (tid & 1) * 8;  // A tile 64 x 16: two copies per row
  gc_cp_async_16(As + (stage * TOY_BM + ar) * TOY_BK + ac,
                 A + (long long)(m0 + ar) * K + kt * TOY_BK + ac, 16);
  const int br = tid >> 3, bc = (tid & 7) * 8;  // B tile 16 x 64: eight copies per row
  gc_cp_async_16(Bs + (stage * TOY_BK + br) * TOY_BN + bc,
                 B + (long long)(kt * TOY_BK + br) * N + n0 + bc, 16);
}

extern "C" __global__ void __launch_bounds__(128)
toy_gemm_bf16(const unsigned short* A, const unsigned short* B, float* C, int M, int N, int K,
              int bug) {
  extern __shared__ __align__(16) unsigned char toy_smem[];
  unsigned short* As = reinterpret_cast<unsigned short*>(toy_smem);  // [2][64][16]
  unsigned short* Bs = As + 2 * TOY_BM * TOY_BK;                     // [2][16][64]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int m0 = blockIdx.y * TOY_BM, n0 = blockIdx.x * TOY_BN;
  float acc[2][4][4];
  for (int mi = 0; mi < 2; ++mi)
    for (int nj = 0; nj < 4; ++nj)
      for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.0f;
  const int KT = K / TOY_BK;

  toy_load_stage(As, Bs, A, B, N, K, m0, n0, 0, 0, tid);
  gc_cp_async_commit();
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt & 1;
    if (kt + 1 < KT) {
      toy_load_stage(As, Bs, A, B, N, K, m0, n0, kt + 1, s ^ 1, tid);
      gc_cp_async_commit();
      if (bug != 1) gc_cp_async_wait<1>();  // stage kt has landed, stage kt+1 in flight
    } else if (bug == 2) {
      gc_cp_async_wait<1>();  // BUG: the newest committed group is stage kt itself
    } else if (bug != 1) {
      gc_cp_async_wait<0>();
    }
    if (bug != 6) __syncthreads();  // every thread's copies of stage kt are visible
    const unsigned short* as = As + s * TOY_BM * TOY_BK;
    const unsigned short* bs = Bs + s * TOY_BK * TOY_BN;
    unsigned af[2][4], bfr[4][2];
    for (int mi = 0; mi < 2; ++mi) {  // A: the four 8x8 quadrants of a 16x16 tile
      int row = wm * 32 + mi * 16 + (lane & 15), col = (lane >> 4) * 8;
      if (bug == 4 && lane == 3) col += 4;  // 8 bytes off
      gc_ldmatrix_x4(af[mi], as + row * TOY_BK + col);
    }
    for (int nj = 0; nj < 4; nj += 2) {  // B: k 0-7 / 8-15 of two n8 tiles, transposed
      int krow = (lane & 7) + ((lane >> 3) & 1) * 8, col = wn * 32 + nj * 8 + (lane >> 4) * 8;
      if (bug == 5 && s == 1 && lane == 30) krow += TOY_BK;  // the next stage's tile: off the end
      unsigned r[4];
      gc_ldmatrix_x4_trans(r, bs + krow * TOY_BN + col);
      bfr[nj][0] = r[0];
      bfr[nj][1] = r[1];
      bfr[nj + 1][0] = r[2];
      bfr[nj + 1][1] = r[3];
    }
    for (int mi = 0; mi < 2; ++mi)
      for (int nj = 0; nj < 4; ++nj) {
        if (bug == 3 && warp == 1 && lane == 7 && kt == KT - 1 && mi == 1 && nj == 3) continue;
        gc_mma_m16n8k16_bf16(acc[mi][nj], af[mi], bfr[nj], acc[mi][nj]);
      }
    __syncthreads();  // before the next iteration's copies overwrite this stage
  }
  for (int mi = 0; mi < 2; ++mi)  // C fragment: c0,c1 (g, 2t+{0,1}), c2,c3 (g+8, 2t+{0,1})
    for (int nj = 0; nj < 4; ++nj) {
      const int row = m0 + wm * 32 + mi * 16 + (lane >> 2);
      const int col = n0 + wn * 32 + nj * 8 + 2 * (lane & 3);
      C[(long long)row * N + col] = acc[mi][nj][0];
      C[(long long)row * N + col + 1] = acc[mi][nj][1];
      C[(long long)(row + 8) * N + col] = acc[mi][nj][2];
      C[(long long)(row + 8) * N + col + 1] = acc[mi][nj][3];
    }
}
"""


def bf16_bits(x):
    """float64 -> bfloat16 bits (round to nearest even) and the float64 value they hold."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r, (r.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def problem(M, N, Kd, seed):
    rng = np.random.default_rng(seed)
    a_bits, a = bf16_bits(rng.standard_normal((M, Kd)))
    b_bits, b = bf16_bits(rng.standard_normal((Kd, N)))
    return a_bits, b_bits, a @ b, np.abs(a) @ np.abs(b)


@pytest.fixture(scope="module")
def gemm():
    if not SIM_OK:
        pytest.skip(f"cudasim unusable: {SIM_WHY}")
    sim = SimRuntime()
    mod = sim.build(SRC, ["toy_gemm_bf16"], ("--std=c++14",))
    return sim, sim.get_function(mod, "toy_gemm_bf16")


def run_gemm(gemm, a_bits, b_bits, bug=0, schedule="forward", seed=None):
    sim, fn = gemm
    M, Kd = a_bits.shape
    N = b_bits.shape[1]
    c = sim.empty((M, N), np.float32)  # poisoned (NaN) until the kernel writes
    A, B = sim.ascontiguous(a_bits), sim.ascontiguous(b_bits)
    sim.launch(fn, (N // BN, M // BM), (128,),
               (A, B, c, np.int32(M), np.int32(N), np.int32(Kd), np.int32(bug)), SMEM,
               schedule=schedule, seed=seed)
    np.testing.assert_array_equal(A, a_bits)  # inputs unchanged
    return c


def check(c, want, absw, Kd):
    # float32 accumulation of Kd exact products: |error| <= Kd * u * sum|a||b| (u = 2^-24)
    err = np.abs(c.astype(np.float64) - want)
    assert not np.isnan(c).any()
    assert (err <= Kd * 2.0**-24 * absw + 1e-30).all(), float((err / absw).max())


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_toy_gemm_64x64x64_matches_float64(gemm, schedule):
    a_bits, b_bits, want, absw = problem(64, 64, 64, seed=1)
    c = run_gemm(gemm, a_bits, b_bits, schedule=schedule, seed=11)
    check(c, want, absw, 64)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_toy_gemm_grid_and_long_pipeline(gemm, schedule):
    a_bits, b_bits, want, absw = problem(128, 64, 160, seed=2)  # 2 blocks, 10 stages
    c = run_gemm(gemm, a_bits, b_bits, schedule=schedule, seed=12)
    check(c, want, absw, 160)


BUGS = [
    (1, AsyncCopyError, r"ldmatrix.*reads bytes that a cp\.async has not delivered yet.*no "
                        r"cp\.async\.wait_group of that thread covers"),
    (2, AsyncCopyError, r"not delivered yet.*wait<1> where wait<0> is needed"),
    (3, WarpSyncError, r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32 .*warp 1.*"
                       r"lane 7 waits at __syncthreads"),
    (4, MemoryAccessError, r"ldmatrix\.sync\.aligned\.m8n8\.x4\.shared\.b16 at toy_gemm\.cu:\d+: "
                           r"lane 3 .*must be 16-byte aligned"),
    (5, MemoryAccessError, r"ldmatrix\.sync\.aligned\.m8n8\.x4\.trans\.shared\.b16 at "
                           r"toy_gemm\.cu:\d+: lane 30 .*past the end of the launch's dynamic "
                           r"shared memory"),
]


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("bug,exc,pattern", BUGS, ids=[f"bug{b[0]}" for b in BUGS])
def test_toy_gemm_injected_bugs_are_reported(gemm, bug, exc, pattern, schedule):
    a_bits, b_bits, _, _ = problem(64, 64, 64, seed=3)
    with pytest.raises(exc, match=pattern):
        run_gemm(gemm, a_bits, b_bits, bug=bug, schedule=schedule, seed=13)


@needs_sim
@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "forward"])
def test_toy_gemm_missing_barrier_after_wait_fails(gemm, schedule):
    """Without the __syncthreads after the wait a warp reads the other threads' copies
    before they arrive: an AsyncCopyError, or NaN bytes (poisoned shared memory).  (The
    'forward' schedule happens to run every copier before its readers here: the other
    schedules are what catch a missing barrier.)"""
    a_bits, b_bits, want, absw = problem(64, 64, 64, seed=4)
    try:
        c = run_gemm(gemm, a_bits, b_bits, bug=6, schedule=schedule, seed=14)
    except AsyncCopyError:
        return
    err = np.abs(c.astype(np.float64) - want)
    assert np.isnan(c).any() or (err > 64 * 2.0**-24 * absw).any()


# ---------------------------------------------------------------------------- NVRTC and SASS
@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_toy_gemm_nvrtc_and_sass(arch, tmp_path):
    from test_warp_mma import _nvrtc, sass_counts
    compiler = _nvrtc()
    prog = compiler._NVRTCProgram(SRC, "toy_gemm.cu", method="cubin")
    log = io.StringIO()
    cubin, _ = prog.compile(options=(f"--gpu-architecture={arch}", "--std=c++14", "-Xptxas=-v"),
                            log_stream=log)
    text = log.getvalue()
    assert "warning" not in text.lower(), text
    assert "0 bytes spill stores, 0 bytes spill loads" in text, text
    ops = sass_counts(cubin, tmp_path)["toy_gemm_bf16"]
    n = {p: sum(op.startswith(p) for op in ops) for p in ("HMMA.16816.F32.BF16", "LDSM.16.M88.4",
                                                         "LDSM.16.MT88.4", "LDGSTS")}
    # per k-step: 8 mma, 2 + 2 ldmatrix.x4, 2 cp.async (the loop may be unrolled or peeled)
    assert n["HMMA.16816.F32.BF16"] >= 8 and n["HMMA.16816.F32.BF16"] % 8 == 0, n
    assert n["LDSM.16.M88.4"] >= 2 and n["LDSM.16.MT88.4"] >= 2, n
    assert n["LDGSTS"] >= 2, n
