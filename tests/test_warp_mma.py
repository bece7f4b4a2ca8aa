"""kernels/warp.cuh: the tensor-core and async-copy helpers, in the emulator and in NVRTC.

The fragment tables are written a second time here, in Python, straight from the PTX ISA's
per-element formulas ("row = groupID for ai where i < 2 || 4 <= i < 6, ..."); each test
gives every element a distinct value, gathers the fragments in Python, lets the emulator
run the instruction, scatters the result back with the same formulas and compares with a
float64 computation.  Then the injected bugs that the emulator must report.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuconv._cuda import sources as K

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
from gpuconv.testing.cudasim import (SCHEDULES, AsyncCopyError, MemoryAccessError,  # noqa: E402
                                     MmaOperandError, SimRuntime, WarpSyncError)

SIM_OK, SIM_WHY = cudasim.probe()[:2]
needs_sim = pytest.mark.skipif(not SIM_OK, reason=f"cudasim unusable: {SIM_WHY}")

HEADER = "// ---- warp.cuh\n" + K.read_source(K.WARP) + "\n"

SRC = HEADER + r"""// ---- warp_test.cu
#ifdef __CUDASIM__
typedef __half2 test_h2;  // the emulator's alignment-checked packed pair
#else
struct __align__(4) test_h2 { unsigned short x, y; };  // (no cuda_fp16.h under NVRTC here)
#endif
// every thread loads its own lane's fragments (lane-major arrays), one instruction, stores d
extern "C" __global__ void mma_f16(const unsigned* a, const unsigned* b, const float* c, float* d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned ra[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
  unsigned rb[2] = {b[2 * i], b[2 * i + 1]};
  float rc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
  float rd[4];
  gc_mma_m16n8k16_f16(rd, ra, rb, rc);
  for (int k = 0; k < 4; ++k) d[4 * i + k] = rd[k];
}
extern "C" __global__ void mma_bf16(const unsigned* a, const unsigned* b, const float* c, float* d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned ra[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
  unsigned rb[2] = {b[2 * i], b[2 * i + 1]};
  float acc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
  gc_mma_m16n8k16_bf16(acc, ra, rb, acc);  // accumulate in place (d aliases c)
  for (int k = 0; k < 4; ++k) d[4 * i + k] = acc[k];
}
// tf32 operands from float32 through gc_f32_to_tf32 (cvt.rna.tf32.f32)
extern "C" __global__ void mma_tf32(const float* a, const float* b, const float* c, float* d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned ra[4], rb[2];
  for (int k = 0; k < 4; ++k) ra[k] = gc_f32_to_tf32(a[4 * i + k]);
  for (int k = 0; k < 2; ++k) rb[k] = gc_f32_to_tf32(b[2 * i + k]);
  float rc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
  float rd[4];
  gc_mma_m16n8k8_tf32(rd, ra, rb, rc);
  for (int k = 0; k < 4; ++k) d[4 * i + k] = rd[k];
}
// bug: the raw float32 bits as TF32 operands (no gc_f32_to_tf32)
extern "C" __global__ void mma_tf32_unrounded(const float* a, const float* b, const float* c,
                                              float* d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned ra[4], rb[2];
  for (int k = 0; k < 4; ++k) ra[k] = __float_as_uint(a[4 * i + k]);
  for (int k = 0; k < 2; ++k) rb[k] = gc_f32_to_tf32(b[2 * i + k]);
  float rc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
  float rd[4];
  gc_mma_m16n8k8_tf32(rd, ra, rb, rc);
  for (int k = 0; k < 4; ++k) d[4 * i + k] = rd[k];
}
extern "C" __global__ void mma_f64(const double* a, const double* b, const double* c, double* d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  double ra[1] = {a[i]}, rb[1] = {b[i]}, rc[2] = {c[2 * i], c[2 * i + 1]}, rd[2];
  gc_mma_m8n8k4_f64(rd, ra, rb, rc);
  d[2 * i] = rd[0];
  d[2 * i + 1] = rd[1];
}
extern "C" __global__ void f32_to_tf32(const float* x, unsigned* y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = gc_f32_to_tf32(x[i]);
}

// bug: one lane (skip) does not execute the mma
extern "C" __global__ void mma_skip_lane(const unsigned* a, const unsigned* b, const float* c,
                                         float* d, int skip, int iters) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned ra[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
  unsigned rb[2] = {b[2 * i], b[2 * i + 1]};
  float acc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
  for (int it = 0; it < iters; ++it)
    if (!(threadIdx.x == skip && it == 0)) gc_mma_m16n8k16_bf16(acc, ra, rb, acc);
  for (int k = 0; k < 4; ++k) d[4 * i + k] = acc[k];
}

// ldmatrix: the tile goes to dynamic shared memory, each lane points at row rowoff[lane]
template <int NM, bool TR>
__device__ void ldsm_body(const unsigned short* tile, int n, const int* rowoff, unsigned* out) {
  extern __shared__ __align__(16) unsigned char ldsm_smem[];
  unsigned short* s = reinterpret_cast<unsigned short*>(ldsm_smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = tile[i];
  __syncthreads();
  const unsigned short* p = s + rowoff[threadIdx.x];
  unsigned r[4];
  if (NM == 1) { if (TR) gc_ldmatrix_x1_trans(r, p); else gc_ldmatrix_x1(r, p); }
  if (NM == 2) { if (TR) gc_ldmatrix_x2_trans(r, p); else gc_ldmatrix_x2(r, p); }
  if (NM == 4) { if (TR) gc_ldmatrix_x4_trans(r, p); else gc_ldmatrix_x4(r, p); }
  for (int i = 0; i < NM; ++i) out[NM * threadIdx.x + i] = r[i];
}
extern "C" __global__ void ldsm_x1(const unsigned short* tile, int n, const int* rowoff,
                                   unsigned* out) {
  ldsm_body<1, false>(tile, n, rowoff, out);
}
extern "C" __global__ void ldsm_x1_trans(const unsigned short* tile, int n, const int* rowoff,
                                         unsigned* out) {
  ldsm_body<1, true>(tile, n, rowoff, out);
}
extern "C" __global__ void ldsm_x2(const unsigned short* tile, int n, const int* rowoff,
                                   unsigned* out) {
  ldsm_body<2, false>(tile, n, rowoff, out);
}
extern "C" __global__ void ldsm_x2_trans(const unsigned short* tile, int n, const int* rowoff,
                                         unsigned* out) {
  ldsm_body<2, true>(tile, n, rowoff, out);
}
extern "C" __global__ void ldsm_x4(const unsigned short* tile, int n, const int* rowoff,
                                   unsigned* out) {
  ldsm_body<4, false>(tile, n, rowoff, out);
}
extern "C" __global__ void ldsm_x4_trans(const unsigned short* tile, int n, const int* rowoff,
                                         unsigned* out) {
  ldsm_body<4, true>(tile, n, rowoff, out);
}

// bug: lane 0 points ldmatrix at global memory
extern "C" __global__ void ldsm_global_row(const unsigned short* tile, unsigned* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned short* s = reinterpret_cast<unsigned short*>(smem);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s[i] = tile[i];
  __syncthreads();
  const unsigned short* p = threadIdx.x == 0 ? tile : s + 8 * threadIdx.x;
  unsigned r[4];
  gc_ldmatrix_x4(r, p);
  for (int i = 0; i < 4; ++i) out[4 * threadIdx.x + i] = r[i];
}
// ldmatrix from a static __shared__ array
extern "C" __global__ void ldsm_static_tile(const unsigned short* tile, const int* rowoff,
                                            unsigned* out) {
  __shared__ __align__(16) unsigned short s[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s[i] = tile[i];
  __syncthreads();
  unsigned r[4];
  gc_ldmatrix_x4(r, s + rowoff[threadIdx.x]);
  for (int i = 0; i < 4; ++i) out[4 * threadIdx.x + i] = r[i];
}

// cp.async of 16, 8 and 4 bytes with src_bytes = nb[3t + k]; wait<0>; the shared bytes out
extern "C" __global__ void cp_async_sizes(const unsigned char* src, const int* nb,
                                          unsigned char* out) {
  __shared__ __align__(16) unsigned char s[64 * 28];
  const int t = threadIdx.x;
  gc_cp_async_16(s + 16 * t, src + 16 * t, nb[3 * t]);
  gc_cp_async_8(s + 1024 + 8 * t, src + 1024 + 8 * t, nb[3 * t + 1]);
  gc_cp_async_4(s + 1536 + 4 * t, src + 1536 + 4 * t, nb[3 * t + 2]);
  gc_cp_async_commit();
  gc_cp_async_wait<0>();
  __syncthreads();
  for (int i = t; i < 64 * 28; i += blockDim.x) out[i] = s[i];
}
// three commit groups per thread; after wait<2>, wait<1>, wait<0> the thread copies its own
// destinations out (what it sees: the emulator delivers a group only at the covering wait)
extern "C" __global__ void cp_async_groups(const float* src, float* out) {
  __shared__ __align__(16) float s[3 * 4 * 64];
  const int t = threadIdx.x, n = blockDim.x;
  for (int g = 0; g < 3; ++g) {
    gc_cp_async_16(s + 4 * (g * n + t), src + 4 * (g * n + t), 16);
    gc_cp_async_commit();
  }
  gc_cp_async_wait<2>();
  for (int k = 0; k < 12; ++k) out[(0 * n + t) * 12 + k] = s[4 * ((k / 4) * n + t) + k % 4];
  gc_cp_async_wait<1>();
  for (int k = 0; k < 12; ++k) out[(1 * n + t) * 12 + k] = s[4 * ((k / 4) * n + t) + k % 4];
  gc_cp_async_wait<0>();
  for (int k = 0; k < 12; ++k) out[(2 * n + t) * 12 + k] = s[4 * ((k / 4) * n + t) + k % 4];
}
// mode 0: correct; 1: ldmatrix before the wait (bug); 2: no commit, wait<0> (bug);
// 3: misaligned destination (bug); 4: destination in global memory (bug)
extern "C" __global__ void cp_async_ldsm(const unsigned short* tile, unsigned* out,
                                         unsigned short* scratch, int mode) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned short* s = reinterpret_cast<unsigned short*>(smem);
  const int t = threadIdx.x;
  void* dst = mode == 3 ? (void*)(smem + 16 * t + 8) : mode == 4 ? (void*)(scratch + 8 * t)
                                                                 : (void*)(s + 8 * t);
  gc_cp_async_16(dst, tile + 8 * t, 16);
  if (mode != 2) gc_cp_async_commit();
  if (mode != 1) gc_cp_async_wait<0>();
  __syncthreads();
  unsigned r[4];
  gc_ldmatrix_x4(r, s + 8 * t);
  for (int i = 0; i < 4; ++i) out[4 * t + i] = r[i];
}
// bug: a plain load of the destination before the wait reads NaN
extern "C" __global__ void cp_async_read_early(const float* src, float* out) {
  __shared__ __align__(16) float s[4 * 64];
  const int t = threadIdx.x;
  gc_cp_async_16(s + 4 * t, src + 4 * t, 16);
  gc_cp_async_commit();
  float v = s[4 * t];
  gc_cp_async_wait<0>();
  out[2 * t] = v;
  out[2 * t + 1] = s[4 * t];
}

// 16-byte / 8-byte / packed 32-bit vector loads and stores (aligned by `shift` elements)
extern "C" __global__ void vec_copy(const float* x, float* y, int shift_in, int shift_out) {
  const int t = threadIdx.x;
  float4 v = *reinterpret_cast<const float4*>(x + 4 * t + shift_in);
  *reinterpret_cast<float4*>(y + 4 * t + shift_out) = v;
}
extern "C" __global__ void vec_copy_u4(const unsigned* x, unsigned* y, int shift) {
  const int t = threadIdx.x;
  uint4 v = reinterpret_cast<const uint4*>(x + shift)[t];
  reinterpret_cast<uint4*>(y)[t] = v;
}
extern "C" __global__ void vec_copy_d2(const double* x, double* y, int shift) {
  const int t = threadIdx.x;
  double2 v = reinterpret_cast<const double2*>(x + shift)[t];
  reinterpret_cast<double2*>(y)[t] = v;
}
extern "C" __global__ void vec_copy_h2(const unsigned short* x, unsigned short* y, int shift) {
  const int t = threadIdx.x;
  test_h2 v = reinterpret_cast<const test_h2*>(x + shift)[t];
  reinterpret_cast<test_h2*>(y)[t] = v;
}
"""

# ---------------------------------------------------------------------------- the tables
# PTX ISA formulas, per element index i of a lane's fragment (g = lane >> 2, t = lane % 4)


def a_m16n8k16(lane, i):
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_m16n8k16(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def c_m16n8(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def a_m16n8k8_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i in (0, 2) else g + 8), (t if i < 2 else t + 4)


def b_m16n8k8_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (t if i == 0 else t + 4), g


def gather(mat, fn, nelem):
    """(32, nelem) array: element i of lane l = mat[fn(l, i)]."""
    return np.array([[mat[fn(l, i)] for i in range(nelem)] for l in range(32)])


def scatter(frag, fn, shape):
    out = np.full(shape, np.nan)
    for l in range(32):
        for i in range(frag.shape[1]):
            assert np.isnan(out[fn(l, i)]), "table maps two elements to one place"
            out[fn(l, i)] = frag[l, i]
    assert not np.isnan(out).any(), "table misses an element"
    return out


def pack16(bits16):
    """(32, 2n) uint16 -> (32, n) uint32: element 2j in the low half of register j."""
    b = bits16.astype(np.uint32)
    return b[:, 0::2] | (b[:, 1::2] << 16)


def distinct_ints(rng, shape, lo, hi):
    n = int(np.prod(shape))
    return rng.permutation(np.arange(lo, hi))[:n].reshape(shape).astype(np.float64)


@pytest.fixture(scope="module")
def sim_mod():
    if not SIM_OK:
        pytest.skip(f"cudasim unusable: {SIM_WHY}")
    sim = SimRuntime()
    return sim, sim.build(SRC, None, ("--std=c++14",))


def _run(sim_mod, name, grid, block, args, smem=0, schedule="forward", seed=None):
    sim, mod = sim_mod
    fn = sim.get_function(mod, name)
    dev = [sim.ascontiguous(a) if isinstance(a, np.ndarray) and not sim.is_device_array(a) else a
           for a in args]
    sim.launch(fn, grid, block, dev, smem, schedule=schedule, seed=seed)
    return dev


def test_tables_are_bijections():
    for fn, n, shape in ((a_m16n8k16, 8, (16, 16)), (b_m16n8k16, 4, (16, 8)), (c_m16n8, 4, (16, 8)),
                         (a_m16n8k8_tf32, 4, (16, 8)), (b_m16n8k8_tf32, 2, (8, 8))):
        scatter(np.ones((32, n)), fn, shape)


# ---------------------------------------------------------------------------- mma
WARPS = 2  # two independent warps per block: the schedules interleave them


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_m16n8k16(sim_mod, dtype, schedule):
    rng = np.random.default_rng(16 + len(dtype))
    lo, hi = (-512, 512) if dtype == "f16" else (-128, 128)  # exact in the input type
    a_all, b_all, c_all, want = [], [], [], []
    for w in range(WARPS):
        A = distinct_ints(rng, (16, 16), lo, hi)
        B = distinct_ints(rng, (16, 8), lo, hi)
        C = distinct_ints(rng, (16, 8), -2**20, 2**20)
        want.append(A @ B + C)  # exact: every partial sum is an integer below 2^24
        if dtype == "f16":
            bits = lambda m: m.astype(np.float16).view(np.uint16)  # noqa: E731
        else:
            bits = lambda m: (m.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
        a_all.append(pack16(gather(bits(A), a_m16n8k16, 8)))
        b_all.append(pack16(gather(bits(B), b_m16n8k16, 4)))
        c_all.append(gather(C, c_m16n8, 4).astype(np.float32))
    sim, _ = sim_mod
    d = sim.empty((WARPS * 32, 4), np.float32)
    _run(sim_mod, f"mma_{dtype}", 1, 32 * WARPS,
         [np.concatenate(a_all), np.concatenate(b_all), np.concatenate(c_all), d],
         schedule=schedule, seed=3)
    for w in range(WARPS):
        got = scatter(d[32 * w:32 * (w + 1)].astype(np.float64), c_m16n8, (16, 8))
        np.testing.assert_array_equal(got, want[w])


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mma_m16n8k8_tf32(sim_mod, schedule):
    rng = np.random.default_rng(8)
    a_all, b_all, c_all, want = [], [], [], []
    for w in range(WARPS):
        # distinct values with 11 significant bits (exact in TF32) plus low bits that
        # cvt.rna must round away: x = (integer + 0.25) * 2^-6 has a 13-bit tail
        A = distinct_ints(rng, (16, 8), -1000, 1000)
        B = distinct_ints(rng, (8, 8), -1000, 1000)
        C = distinct_ints(rng, (16, 8), -2**20, 2**20)
        want.append(A @ B + C)
        tail = 2.0**-14  # far below the TF32 half-ulp of |x| >= 1: rounds away
        Af = (A + np.sign(A) * tail).astype(np.float32)
        Bf = (B - np.sign(B) * tail).astype(np.float32)
        a_all.append(gather(Af, a_m16n8k8_tf32, 4))
        b_all.append(gather(Bf, b_m16n8k8_tf32, 2))
        c_all.append(gather(C, c_m16n8, 4).astype(np.float32))
    sim, _ = sim_mod
    d = sim.empty((WARPS * 32, 4), np.float32)
    _run(sim_mod, "mma_tf32", 1, 32 * WARPS,
         [np.concatenate(a_all).astype(np.float32), np.concatenate(b_all).astype(np.float32),
          np.concatenate(c_all), d], schedule=schedule, seed=4)
    for w in range(WARPS):
        got = scatter(d[32 * w:32 * (w + 1)].astype(np.float64), c_m16n8, (16, 8))
        np.testing.assert_array_equal(got, want[w])


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mma_m8n8k4_f64(sim_mod, schedule):
    rng = np.random.default_rng(84)
    a_all, b_all, c_all, want = [], [], [], []
    for w in range(WARPS):
        A = rng.standard_normal((8, 4))
        B = rng.standard_normal((4, 8))
        C = rng.standard_normal((8, 8))
        # the documented order: fma(a3, b3, fma(a2, b2, fma(a1, b1, fma(a0, b0, c))))
        D = C.copy()
        for k in range(4):
            D = np.array([[_fma(A[m, k], B[k, n], D[m, n]) for n in range(8)] for m in range(8)])
        want.append(D)
        a_all.append(np.array([A[l >> 2, l % 4] for l in range(32)]))
        b_all.append(np.array([B[l % 4, l >> 2] for l in range(32)]))
        c_all.append(np.array([[C[l >> 2, 2 * (l % 4) + i] for i in range(2)] for l in range(32)]))
    sim, _ = sim_mod
    d = sim.empty((WARPS * 32, 2), np.float64)
    _run(sim_mod, "mma_f64", 1, 32 * WARPS,
         [np.concatenate(a_all), np.concatenate(b_all), np.concatenate(c_all), d],
         schedule=schedule, seed=5)
    for w in range(WARPS):
        dw = d[32 * w:32 * (w + 1)]
        got = np.full((8, 8), np.nan)
        for l in range(32):
            for i in range(2):
                got[l >> 2, 2 * (l % 4) + i] = dw[l, i]
        np.testing.assert_array_equal(got, want[w])


def _fma(a, b, c):
    """Correctly rounded a*b + c in float64 (exact product via fractions)."""
    from fractions import Fraction
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def tf32_reference(x):
    """cvt.rna.tf32.f32 from its definition: the nearest multiple of the TF32 ulp (10 mantissa
    bits; subnormals on the same 2^-136 grid), ties away from zero; overflow to inf."""
    out = []
    for v in np.asarray(x, np.float32).ravel().tolist():
        if v == 0 or np.isinf(v):
            out.append(np.float32(v).view(np.uint32))
            continue
        e = np.frexp(abs(v))[1]  # |v| = m * 2^e, 0.5 <= m < 1
        ulp = 2.0 ** max(e - 11, -136)
        r = np.floor(abs(v) / ulp + 0.5) * ulp  # exact in float64
        r = np.float32(np.copysign(r, v) if r < 2.0**128 else np.copysign(np.inf, v))
        out.append(r.view(np.uint32))
    return np.array(out, np.uint32)


@needs_sim
def test_f32_to_tf32_rounding(sim_mod):
    rng = np.random.default_rng(32)
    base = rng.standard_normal(2000).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -20, 20, 2000).astype(np.float32)
    # exact ties (bit 12 set, bits 0-11 clear), just below/above, and the edges
    b = base.view(np.uint32) & np.uint32(0xFFFFE000)
    ties = (b | np.uint32(0x1000)).view(np.float32)
    below = (b | np.uint32(0x0FFF)).view(np.float32)
    above = (b | np.uint32(0x1001)).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, 1e-40, -3e-39,
                      np.finfo(np.float32).tiny], np.float32)
    x = np.concatenate([base, ties, below, above, edges]).astype(np.float32)
    sim, _ = sim_mod
    y = sim.empty(x.shape, np.uint32)
    _run(sim_mod, "f32_to_tf32", 4, 64, [x, y, np.int32(x.size)])
    want = tf32_reference(x)
    assert (y & 0x1FFF == 0).all()
    np.testing.assert_array_equal(y, want)
    # NaN stays NaN (and TF32)
    nan_in = np.array([np.nan, -np.nan], np.float32)
    ny = sim.empty(2, np.uint32)
    _run(sim_mod, "f32_to_tf32", 1, 32, [nan_in, ny, np.int32(2)])
    assert np.isnan(ny.view(np.float32)).all() and (ny & 0x1FFF == 0).all()


# ---------------------------------------------------------------------------- ldmatrix
@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(sim_mod, nmat, trans, schedule):
    rng = np.random.default_rng(nmat * 2 + trans)
    nrows = 96  # rows of 8 16-bit elements (16 bytes); each lane points at a random one
    tile = (np.arange(nrows * 8) * 7 + 1000).astype(np.uint16)  # distinct
    rowoff = np.empty(64, np.int32)
    for w in range(2):
        rows = rng.permutation(nrows)[:32]
        rowoff[32 * w:32 * w + 32] = rows * 8
        rowoff[32 * w + 8 * nmat:32 * w + 32] = 1  # unused lanes: a misaligned address, ignored
    sim, _ = sim_mod
    out = sim.empty((64, nmat), np.uint32)
    name = f"ldsm_x{nmat}" + ("_trans" if trans else "")
    _run(sim_mod, name, 1, 64, [tile, np.int32(tile.size), rowoff, out], smem=tile.nbytes,
         schedule=schedule, seed=6)
    for w in range(2):
        for lane in range(32):
            for i in range(nmat):
                # M_i[row][col] = element col of the row given by lane 8i + row
                M = np.array([tile[rowoff[32 * w + 8 * i + j]:rowoff[32 * w + 8 * i + j] + 8]
                              for j in range(8)])
                q, c = lane // 4, 2 * (lane % 4)
                lo, hi = (M[c, q], M[c + 1, q]) if trans else (M[q, c], M[q, c + 1])
                assert out[32 * w + lane, i] == int(lo) | (int(hi) << 16), (w, lane, i)


@needs_sim
def test_ldmatrix_x4_is_the_a_fragment(sim_mod):
    """x4 over the quadrants of a row-major 16x16 tile = the m16n8k16 A fragment (the header's
    claim the engine relies on), and x2.trans of a row-major 16x8 (K x N) tile = B."""
    tile = (np.arange(256) * 3 + 7).astype(np.uint16)
    A = tile.reshape(16, 16)
    lane = np.arange(32)
    rowoff = ((lane % 16) * 16 + (lane // 16) * 8).astype(np.int32)  # &A[l % 16][8 (l / 16)]
    rowoff = np.concatenate([rowoff, rowoff])
    sim, _ = sim_mod
    out = sim.empty((64, 4), np.uint32)
    _run(sim_mod, "ldsm_x4", 1, 64, [tile, np.int32(256), rowoff, out], smem=512)
    np.testing.assert_array_equal(out[:32], pack16(gather(A, a_m16n8k16, 8)))
    Bt = tile[:128].reshape(16, 8)  # row-major K x N
    rowoff = np.concatenate([(lane % 16) * 8, (lane % 16) * 8]).astype(np.int32)
    out2 = sim.empty((64, 2), np.uint32)
    _run(sim_mod, "ldsm_x2_trans", 1, 64, [tile, np.int32(256), rowoff, out2], smem=512)
    np.testing.assert_array_equal(out2[:32], pack16(gather(Bt, b_m16n8k16, 4)))


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ldmatrix_from_static_shared(sim_mod, schedule):
    tile = (np.arange(256) * 5 + 3).astype(np.uint16)
    rowoff = (np.random.default_rng(5).permutation(32) * 8).astype(np.int32)
    sim, _ = sim_mod
    out = sim.empty((32, 4), np.uint32)
    _run(sim_mod, "ldsm_static_tile", 1, 32, [tile, rowoff, out], schedule=schedule, seed=10)
    lane = np.arange(32)
    for i in range(4):
        M = np.array([tile[o:o + 8] for o in rowoff[8 * i:8 * i + 8]])
        want = M[lane // 4, 2 * (lane % 4)].astype(np.uint32) | (
            M[lane // 4, 2 * (lane % 4) + 1].astype(np.uint32) << 16)
        np.testing.assert_array_equal(out[:, i], want)


# ---------------------------------------------------------------------------- cp.async
@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_sizes_and_zero_fill(sim_mod, schedule):
    rng = np.random.default_rng(11)
    src = rng.integers(1, 256, 64 * 28).astype(np.uint8)  # never 0: zero fill is visible
    nb = np.stack([rng.integers(0, 17, 64), rng.integers(0, 9, 64), rng.integers(0, 5, 64)],
                  1).astype(np.int32)
    nb[:3] = [[16, 8, 4], [0, 0, 0], [15, 7, 3]]
    sim, _ = sim_mod
    out = sim.empty(64 * 28, np.uint8)
    _run(sim_mod, "cp_async_sizes", 1, 64, [src, nb.ravel(), out], schedule=schedule, seed=7)
    want = np.zeros_like(src)
    for t in range(64):
        for k, (base, size) in enumerate(((0, 16), (1024, 8), (1536, 4))):
            o = base + size * t
            want[o:o + nb[t, k]] = src[o:o + nb[t, k]]
    np.testing.assert_array_equal(out, want)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_commit_groups_per_thread(sim_mod, schedule):
    n = 64
    src = (np.arange(3 * 4 * n) + 1).astype(np.float32)
    sim, _ = sim_mod
    out = sim.empty((3, n, 12), np.float32)
    _run(sim_mod, "cp_async_groups", 1, n, [src, out.reshape(-1)], schedule=schedule, seed=8)
    for stage in range(3):  # after wait<2-stage>: groups 0..stage delivered, the rest NaN
        for t in range(n):
            for g in range(3):
                got = out[stage, t, 4 * g:4 * g + 4]
                if g <= stage:
                    np.testing.assert_array_equal(got, src[4 * (g * n + t):4 * (g * n + t) + 4])
                else:
                    assert np.isnan(got).all(), (stage, t, g, got)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_then_ldmatrix(sim_mod, schedule):
    tile = (np.arange(32 * 8) + 500).astype(np.uint16)
    sim, _ = sim_mod
    out = sim.empty((32, 4), np.uint32)
    _run(sim_mod, "cp_async_ldsm", 1, 32, [tile, out, sim.empty(256, np.uint16), np.int32(0)],
         smem=512, schedule=schedule, seed=9)
    rows = tile.reshape(32, 8)
    lane = np.arange(32)
    for i in range(4):
        M = rows[8 * i:8 * i + 8]
        want = M[lane // 4, 2 * (lane % 4)].astype(np.uint32) | (
            M[lane // 4, 2 * (lane % 4) + 1].astype(np.uint32) << 16)
        np.testing.assert_array_equal(out[:, i], want)


# ---------------------------------------------------------------------------- injected bugs
def _frag_args(sim, rng):
    a = rng.integers(0, 2**16, (32 * WARPS, 4)).astype(np.uint32) & 0x3F3F3F3F  # finite bf16
    b = rng.integers(0, 2**16, (32 * WARPS, 2)).astype(np.uint32) & 0x3F3F3F3F
    c = rng.standard_normal((32 * WARPS, 4)).astype(np.float32)
    return a, b, c, sim.empty((32 * WARPS, 4), np.float32)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bug_lane_skips_mma(sim_mod, schedule):
    sim, _ = sim_mod
    a, b, c, d = _frag_args(sim, np.random.default_rng(1))
    for skip, iters in ((5, 1), (37, 2)):  # exits without it / skips one loop iteration
        with pytest.raises(WarpSyncError, match=r"mma\.sync\.aligned\.m16n8k16.*(exited|different "
                           r"dynamic instances|skipped)") as ei:
            _run(sim_mod, "mma_skip_lane", 1, 32 * WARPS, [a, b, c, d, np.int32(skip),
                                                           np.int32(iters)], schedule=schedule)
        assert "warp_test.cu:" in str(ei.value)  # the kernel's line
    # the same kernel with no lane skipping runs
    _run(sim_mod, "mma_skip_lane", 1, 32 * WARPS, [a, b, c, d, np.int32(-1), np.int32(2)],
         schedule=schedule)
    assert not np.isnan(d).any()


@needs_sim
def test_bug_mma_in_a_partial_warp(sim_mod):
    sim, _ = sim_mod
    a, b, c, d = _frag_args(sim, np.random.default_rng(2))
    with pytest.raises(WarpSyncError, match="needs all 32 lanes.*only 16 threads"):
        _run(sim_mod, "mma_bf16", 1, 48, [a, b, c, d])


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bug_unrounded_tf32_operand(sim_mod, schedule):
    sim, _ = sim_mod
    rng = np.random.default_rng(3)
    a = rng.standard_normal((32 * WARPS, 4)).astype(np.float32)
    b = rng.standard_normal((32 * WARPS, 2)).astype(np.float32)
    c = np.zeros((32 * WARPS, 4), np.float32)
    d = sim.empty((32 * WARPS, 4), np.float32)
    with pytest.raises(MmaOperandError, match=r"operand A .*not a TF32 value.*gc_f32_to_tf32"):
        _run(sim_mod, "mma_tf32_unrounded", 1, 32 * WARPS, [a, b, c, d], schedule=schedule)
    _run(sim_mod, "mma_tf32", 1, 32 * WARPS, [a, b, c, d], schedule=schedule)  # rounded: fine
    assert not np.isnan(d).any()


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bug_ldmatrix_rows(sim_mod, schedule):
    sim, _ = sim_mod
    tile = np.arange(512).astype(np.uint16)
    out = sim.empty((64, 4), np.uint32)
    good = np.concatenate([np.arange(32) * 8] * 2).astype(np.int32)
    bad = good.copy()
    bad[35] += 4  # lane 3 of warp 1: 8 bytes off
    with pytest.raises(MemoryAccessError, match=r"ldmatrix.*lane 3 .*row 3 of matrix 0.*"
                       r"must be 16-byte aligned"):
        _run(sim_mod, "ldsm_x4", 1, 64, [tile, np.int32(512), bad, out], smem=1024,
             schedule=schedule)
    bad = good.copy()
    bad[9] = 512  # lane 9: a row past the end of the 1024-byte dynamic shared memory
    with pytest.raises(MemoryAccessError, match=r"lane 9 .*row 1 of matrix 1.*past the end"):
        _run(sim_mod, "ldsm_x4", 1, 64, [tile, np.int32(512), bad, out], smem=1024,
             schedule=schedule)
    with pytest.raises(MemoryAccessError, match=r"lane 0 .*not in shared memory"):
        _run(sim_mod, "ldsm_global_row", 1, 32, [tile, out], smem=1024, schedule=schedule)
    _run(sim_mod, "ldsm_x4", 1, 64, [tile, np.int32(512), good, out], smem=1024,
         schedule=schedule)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bug_cp_async_read_before_wait(sim_mod, schedule):
    sim, _ = sim_mod
    tile = (np.arange(256) + 500).astype(np.uint16)
    out = sim.empty((32, 4), np.uint32)
    scratch = sim.empty(256, np.uint16)
    with pytest.raises(AsyncCopyError, match=r"ldmatrix.*not delivered yet.*issued it at "
                       r"warp_test\.cu:\d+ in its commit group 0.*no cp\.async\.wait_group"):
        _run(sim_mod, "cp_async_ldsm", 1, 32, [tile, out, scratch, np.int32(1)], smem=512,
             schedule=schedule)
    with pytest.raises(AsyncCopyError, match=r"not committed yet"):
        _run(sim_mod, "cp_async_ldsm", 1, 32, [tile, out, scratch, np.int32(2)], smem=512,
             schedule=schedule)
    # plain loads before the wait read NaN; after it the data
    src = (np.arange(256) + 1).astype(np.float32)
    o2 = sim.empty((64, 2), np.float32)
    _run(sim_mod, "cp_async_read_early", 1, 64, [src, o2.reshape(-1)], schedule=schedule)
    assert np.isnan(o2[:, 0]).all()
    np.testing.assert_array_equal(o2[:, 1], src[::4])


@needs_sim
def test_bug_cp_async_addresses(sim_mod):
    sim, _ = sim_mod
    tile = (np.arange(256) + 500).astype(np.uint16)
    out = sim.empty((32, 4), np.uint32)
    scratch = sim.empty(256, np.uint16)
    with pytest.raises(MemoryAccessError, match=r"cp\.async.*destination .*not 16-byte aligned"):
        _run(sim_mod, "cp_async_ldsm", 1, 32, [tile, out, scratch, np.int32(3)], smem=1024)
    with pytest.raises(MemoryAccessError, match=r"cp\.async.*destination .*not in shared memory"):
        _run(sim_mod, "cp_async_ldsm", 1, 32, [tile, out, scratch, np.int32(4)], smem=1024)
    short = tile[:200]  # the global source ends inside thread 25's row
    with pytest.raises(MemoryAccessError, match=r"out-of-bounds read of argument 0 'tile'"):
        _run(sim_mod, "cp_async_ldsm", 1, 32, [short, out, scratch, np.int32(0)], smem=1024)


@needs_sim
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_vector_loads_and_stores(sim_mod, schedule):
    sim, _ = sim_mod
    x = np.arange(4 * 64 + 8, dtype=np.float32)
    y = sim.empty(4 * 64 + 8, np.float32)
    _run(sim_mod, "vec_copy", 1, 64, [x, y, np.int32(4), np.int32(0)], schedule=schedule)
    np.testing.assert_array_equal(y[:256], x[4:260])
    with pytest.raises(MemoryAccessError, match=r"misaligned 16-byte float4 load at "
                       r"warp_test\.cu:\d+.*address % 16 = 8.*argument 0 'x'"):
        _run(sim_mod, "vec_copy", 1, 64, [x, y, np.int32(2), np.int32(0)], schedule=schedule)
    with pytest.raises(MemoryAccessError, match=r"misaligned 16-byte float4 store.*address % 16 "
                       r"= 4.*argument 1 'y'"):
        _run(sim_mod, "vec_copy", 1, 64, [x, y, np.int32(0), np.int32(1)], schedule=schedule)
    u = np.arange(4 * 32 + 4, dtype=np.uint32)
    uy = sim.empty(4 * 32, np.uint32)
    _run(sim_mod, "vec_copy_u4", 1, 32, [u, uy, np.int32(4)], schedule=schedule)
    np.testing.assert_array_equal(uy, u[4:])
    with pytest.raises(MemoryAccessError, match="misaligned 16-byte uint4 load"):
        _run(sim_mod, "vec_copy_u4", 1, 32, [u, uy, np.int32(1)], schedule=schedule)
    dd = np.arange(2 * 32 + 2, dtype=np.float64)
    dy = sim.empty(2 * 32, np.float64)
    _run(sim_mod, "vec_copy_d2", 1, 32, [dd, dy, np.int32(2)], schedule=schedule)
    np.testing.assert_array_equal(dy, dd[2:])
    with pytest.raises(MemoryAccessError, match="misaligned 16-byte double2 load"):
        _run(sim_mod, "vec_copy_d2", 1, 32, [dd, dy, np.int32(1)], schedule=schedule)
    h = np.arange(2 * 32 + 2, dtype=np.uint16)
    hy = sim.empty(2 * 32, np.uint16)
    _run(sim_mod, "vec_copy_h2", 1, 32, [h, hy, np.int32(2)], schedule=schedule)
    np.testing.assert_array_equal(hy, h[2:])
    with pytest.raises(MemoryAccessError, match="misaligned 4-byte __half2 load"):
        _run(sim_mod, "vec_copy_h2", 1, 32, [h, hy, np.int32(1)], schedule=schedule)


# ---------------------------------------------------------------------------- NVRTC and SASS
ARCHS = ("sm_80", "sm_90")


def _nvrtc():
    compiler = pytest.importorskip("cupy.cuda.compiler",
                                   reason="CuPy is not installed: NVRTC checks need cupy-cuda13x")
    try:
        prog = compiler._NVRTCProgram('extern "C" __global__ void f() {}', "probe.cu",
                                      method="cubin")
        prog.compile(options=("--gpu-architecture=sm_80",))
    except Exception as e:  # no NVRTC library
        pytest.skip(f"NVRTC is not usable here ({type(e).__name__}: {e}); "
                    f"pip install nvidia-cuda-nvrtc")
    return compiler


def _cubin(arch):
    compiler = _nvrtc()
    prog = compiler._NVRTCProgram(SRC, "warp_test.cu", method="cubin")
    log = io.StringIO()
    cubin, _ = prog.compile(options=(f"--gpu-architecture={arch}", "--std=c++14",
                                     "-Xptxas=-v"), log_stream=log)
    return cubin, log.getvalue()


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_the_helpers(arch):
    cubin, log = _cubin(arch)
    assert cubin
    assert "warning" not in log.lower(), log
    assert not re.search(r"[1-9]\d* bytes spill", log), log


def cuobjdump():
    """cuobjdump (and the directory of nvdisasm, which it runs) or None."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe, None
    for entry in sys.path:
        for sub in ("nvidia/cu13/bin", "nvidia/cuda_cuobjdump/bin", "nvidia/cu12/bin"):
            p = Path(entry) / sub / "cuobjdump"
            if p.is_file():
                nvd = [q.parent for q in Path(entry).glob("nvidia/*/bin/nvdisasm")]
                return str(p), (str(nvd[0]) if nvd else None)
    return None, None


def _complete_elf(b: bytes) -> bytes:
    """CuPy's NVRTC wrapper may drop the cubin's last (zero) byte: pad the ELF image to the
    end of its section and program header tables."""
    if b[:4] != b"\x7fELF" or b[4] != 2:
        return b
    le = "little" if b[5] == 1 else "big"
    u = lambda off, n: int.from_bytes(b[off:off + n], le)  # noqa: E731
    end = max(u(0x20, 8) + u(0x36, 2) * u(0x38, 2), u(0x28, 8) + u(0x3A, 2) * u(0x3C, 2))
    return b + b"\0" * max(0, end - len(b))


def sass_counts(cubin: bytes, tmp_path) -> dict:
    exe, nvdisasm_dir = cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    path = tmp_path / "k.cubin"
    path.write_bytes(_complete_elf(cubin))
    env = dict(os.environ)
    if nvdisasm_dir:
        env["PATH"] = nvdisasm_dir + os.pathsep + env.get("PATH", "")
    r = subprocess.run([exe, "-sass", str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = {}
    for fn in re.split(r"\n\s*Function : ", r.stdout)[1:]:
        name = fn.split("\n", 1)[0].strip()
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)",
                         fn)
        out[name] = ops
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_has_hmma_ldsm_ldgsts(arch, tmp_path):
    cubin, _ = _cubin(arch)
    sass = sass_counts(cubin, tmp_path)

    def count(kernel, prefix):
        return sum(op.startswith(prefix) for op in sass[kernel])

    assert count("mma_f16", "HMMA.16816.F32") == 1, sass["mma_f16"]
    assert count("mma_bf16", "HMMA.16816.F32.BF16") == 1, sass["mma_bf16"]
    assert count("mma_tf32", "HMMA.1688.F32.TF32") == 1, sass["mma_tf32"]
    assert count("mma_f64", "DMMA.8") == 1, sass["mma_f64"]  # DMMA.884 / DMMA.8x8x4
    for k, n in (("ldsm_x1", 1), ("ldsm_x4", 4), ("ldsm_x2_trans", 2)):
        ops = [op for op in sass[k] if op.startswith("LDSM")]
        assert len(ops) == 1, (k, sass[k])
        assert (".MT88" in ops[0]) == k.endswith("trans"), ops
        assert ops[0].endswith(f".{n}") or (n == 1 and not re.search(r"\.[24]$", ops[0])), ops
    assert count("cp_async_sizes", "LDGSTS") == 3, sass["cp_async_sizes"]
    assert count("cp_async_sizes", "LDGDEPBAR") >= 1, sass["cp_async_sizes"]
    assert count("cp_async_sizes", "DEPBAR") >= 1, sass["cp_async_sizes"]
