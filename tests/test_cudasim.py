"""Unit tests of the CUDA emulator (gpuconv.testing.cudasim) on small toy kernels.

Every feature and every error is exercised under every thread schedule.  All
toy kernels live in one source, compiled once per session (and cached on disk).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
from gpuconv.testing.cudasim import (SCHEDULES, CudaSimCompileError, KernelCrashError,  # noqa: E402
                                     KernelTimeoutError, LaunchArgumentError, LaunchConfigError,
                                     MemoryAccessError, SimRuntime, SyncError, WarpSyncError)

if not cudasim.probe()[0]:
    pytest.skip(f"cudasim unusable: {cudasim.probe()[1]}", allow_module_level=True)

SRC = r"""// ---- toy.cu
#ifdef __CUDA_ARCH__
#error "the emulator must not define __CUDA_ARCH__"
#endif
#ifndef __CUDASIM__
#error "__CUDASIM__ missing"
#endif
extern "C" __global__ void __launch_bounds__(256) ids(unsigned int* out) {
  unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned int* o = out + 12 * (b * blockDim.x * blockDim.y * blockDim.z + t);
  o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
  o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
  o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
  o[9] = gridDim.x; o[10] = gridDim.y; o[11] = warpSize;
}

extern "C" __global__ void axpy(const float* __restrict__ x, float* __restrict__ y, float a,
                                long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = fmaf(a, __ldg(x + i), y[i]);
}

// block sum: dynamic shared tree + static shared warp totals
extern "C" __global__ void block_sum(const float* x, float* out, int n) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  __shared__ float warp_tot[32];
  const int t = threadIdx.x;
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) v += x[i];
  s[t] = v;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  float w = v;
  for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(0xffffffffu, w, off);
  if ((t & 31) == 0) warp_tot[t >> 5] = w;
  __syncthreads();
  if (t == 0) {
    float u = 0.0f;
    for (int k = 0; k < (int)(blockDim.x / 32); ++k) u += warp_tot[k];
    out[2 * blockIdx.x] = s[0];
    out[2 * blockIdx.x + 1] = u;
  }
}

// bug: no barrier between the shared store and the neighbour's load
extern "C" __global__ void rotate_nosync(const float* x, float* y) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = x[t];
  y[t] = s[(t + 1) % blockDim.x];
}
extern "C" __global__ void rotate_sync(const float* x, float* y) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = x[t];
  __syncthreads();
  y[t] = s[(t + 1) % blockDim.x];
}
// reads shared memory nobody wrote in this block
extern "C" __global__ void read_shared_early(float* y) {
  extern __shared__ float dyn[];
  __shared__ double st[4];
  if (blockIdx.x == 0) { dyn[threadIdx.x] = 1.0f; st[threadIdx.x % 4] = 2.0; }
  __syncthreads();
  y[2 * (blockIdx.x * blockDim.x + threadIdx.x)] = dyn[threadIdx.x];
  y[2 * (blockIdx.x * blockDim.x + threadIdx.x) + 1] = (float)st[threadIdx.x % 4];
}

extern "C" __global__ void warp_ops(const int* x, int* out, int width) {
  const int t = threadIdx.x, lane = t & 31;
  const int v = x[t];
  int* o = out + 16 * t;
  o[0] = __shfl_sync(0xffffffffu, v, 3);
  o[1] = __shfl_sync(0xffffffffu, v, lane + 1, width);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2, width);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3, width);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 5, width);
  o[5] = (int)__ballot_sync(0xffffffffu, v & 1);
  o[6] = __any_sync(0xffffffffu, v == 7);
  o[7] = __all_sync(0xffffffffu, v >= 0);
  o[8] = __reduce_add_sync(0xffffffffu, v);
  o[9] = __reduce_max_sync(0xffffffffu, v);
  o[10] = (int)__match_any_sync(0xffffffffu, (unsigned long long)(v % 3));
  __syncwarp();
  double d = __shfl_xor_sync(0xffffffffu, (double)v * 0.5, 1);
  o[11] = (int)(d * 4.0);
  unsigned int half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[12] = __shfl_down_sync(half, v, 1, 16);
  __syncwarp(half);
  o[13] = __syncthreads_count(v & 1);
  o[14] = __syncthreads_and(v >= 0);
  o[15] = __syncthreads_or(v == 5);
}

extern "C" __global__ void atomics(int* ci, float* cf, double* cd, int* mx, unsigned int* cas,
                                   unsigned int* order) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  atomicAdd(ci, 1);
  atomicAdd(cf, 0.5f);
  atomicAdd(cd, 0.25);
  atomicMax(mx, (t * 37) % 101);
  unsigned int old = atomicCAS(cas, 0u, (unsigned int)t + 1u);
  (void)old;
  order[t] = atomicAdd(ci + 1, 1);
  __threadfence();
}

// execution order at one barrier: who arrives first
extern "C" __global__ void arrival_order(unsigned int* order) {
  __shared__ unsigned int counter;
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  order[threadIdx.x] = atomicAdd(&counter, 1u);
}

extern "C" __global__ void halfs(const float* x, unsigned short* h, unsigned short* b, float* back) {
  const int i = threadIdx.x;
  __half hv = __float2half_rn(x[i]);
  __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
  h[i] = __half_as_ushort(hv);
  b[i] = __bfloat16_as_ushort(bv);
  back[2 * i] = __half2float(hv);
  back[2 * i + 1] = __bfloat162float(bv);
}

extern "C" __global__ void mathk(const float* x, float* y) {
  const int i = threadIdx.x;
  const float v = x[i];
  y[8 * i + 0] = fmaf(v, 2.0f, 1.0f);
  y[8 * i + 1] = fminf(v, 0.5f);
  y[8 * i + 2] = sqrtf(fabsf(v));
  y[8 * i + 3] = (float)min(i, 3);
  y[8 * i + 4] = (float)max(i, 3u);
  y[8 * i + 5] = expf(v);
  y[8 * i + 6] = rsqrtf(fabsf(v) + 1.0f);
  y[8 * i + 7] = (float)__popc((unsigned int)i);
}

// ---- buggy kernels
extern "C" __global__ void early_return(float* y, int n) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  if (t >= n) return;
  s[t] = 1.0f;
  __syncthreads();
  y[t] = s[(t + 1) % n];
}
extern "C" __global__ void divergent_barrier(float* y) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shfl_outside_mask(int* y) {
  y[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 0);
}
extern "C" __global__ void shfl_lane_exited(int* y) {
  if (threadIdx.x == 7) return;
  y[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}
extern "C" __global__ void shfl_divergent(int* y) {
  int v = threadIdx.x;
  if (threadIdx.x & 1) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_down_sync(0xffffffffu, v, 1);
  y[threadIdx.x] = v;
}
extern "C" __global__ void shfl_src_not_in_mask(int* y) {
  if (threadIdx.x < 8) y[threadIdx.x] = __shfl_sync(0x000000ffu, (int)threadIdx.x, 9);
}
extern "C" __global__ void warp_vs_barrier(int* y) {
  int v = threadIdx.x;
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_sync(0xffffffffu, v, 0);
  y[threadIdx.x] = v;
}
extern "C" __global__ void oob(const float* x, float* y, int n, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i + shift] = x[i];
}
extern "C" __global__ void oob_read(const float* x, float* y, int n, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + shift];
}
extern "C" __global__ void write_const(const float* x) {
  const_cast<float*>(x)[threadIdx.x] = 0.0f;
}
extern "C" __global__ void smem_oob(float* y, int idx) {
  extern __shared__ float s[];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) s[idx] = 2.0f;
  y[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void smem_oob_read(float* y, int idx) {
  extern __shared__ float s[];
  y[threadIdx.x] = s[idx];
}
extern "C" __global__ void spin(int* flag) {
  while (*(volatile int*)flag == 0) { }
}
extern "C" __global__ void trap(int* y) {
  if (threadIdx.x == 5) __trap();
  y[threadIdx.x] = 1;
}
extern "C" __global__ void divide(int* y, int d) { y[threadIdx.x] = 100 / (d + (int)threadIdx.x); }
__device__ int deep(volatile int* p, int n) { volatile char buf[4096]; buf[0] = (char)n; return n <= 0 ? buf[0] : deep(p, n - 1) + buf[0]; }
extern "C" __global__ void recurse(int* y, int n) { y[threadIdx.x] = deep(y, n); }
extern "C" __global__ void null_ptr(int* y) { int* p = (int*)(size_t)threadIdx.x; y[0] = *p; }
extern "C" __global__ void many_types(const double* a, unsigned int u, long long l, double d,
                                      unsigned char c, bool b, double* out) {
  out[0] = a[0] + u + l + d + c + (b ? 1 : 0);
}
extern "C" __global__ void barriers(float* y, int nbar) {
  float v = threadIdx.x;
  for (int k = 0; k < nbar; ++k) __syncthreads();
  y[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
"""

NAMES = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)', SRC)


@pytest.fixture(scope="module")
def sim():
    return SimRuntime(time_limit=20)


@pytest.fixture(scope="module")
def mod(sim):
    return sim.build(SRC, NAMES, ("--std=c++14", "-arch=sm_80"))


@pytest.fixture(params=SCHEDULES)
def sched(request, sim):
    with sim.schedule(request.param):
        yield request.param


def k(sim, mod, name):
    return sim.get_function(mod, name)


# ---------------------------------------------------------------------------- basics
def test_probe_is_cheap_and_usable():
    ok, reason, details = cudasim.probe()
    assert ok and reason is None
    assert "compiler" in details


def test_build_is_cached(sim, mod):
    import time
    t = time.perf_counter()
    again = sim.build(SRC, NAMES, ("--std=c++14",))
    assert again is mod
    assert time.perf_counter() - t < 0.5


def test_ids_3d(sim, mod, sched):
    grid, block = (2, 3, 2), (4, 2, 3)
    nb, nt = 12, 24
    out = sim.empty((nb * nt, 12), np.uint32)
    sim.launch(k(sim, mod, "ids"), grid, block, (out,), 0)
    assert type(out) is np.ndarray
    rows = out.reshape(2, 3, 2 - 0, 3, 2, 4, 12)  # bz, by, bx?  (b = bx + gx*(by + gy*bz))
    for bz in range(2):
        for by in range(3):
            for bx in range(2):
                b = bx + 2 * (by + 3 * bz)
                for tz in range(3):
                    for ty in range(2):
                        for tx in range(4):
                            t = tx + 4 * (ty + 2 * tz)
                            assert list(out[b * nt + t]) == [tx, ty, tz, bx, by, bz, 4, 2, 3, 2, 3, 32]
    del rows


def test_axpy_grid_stride(sim, mod, sched):
    x = np.arange(1000, dtype=np.float32)
    xd = sim.ascontiguous(x)
    y = sim.ascontiguous(np.ones(1000, np.float32))
    sim.launch(k(sim, mod, "axpy"), (3,), (128,), (xd, y, np.float32(2), np.int64(1000)), 0)
    np.testing.assert_array_equal(y, 2 * x + 1)
    np.testing.assert_array_equal(x, np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize("threads", [32, 64, 256])
def test_block_sum_shared_and_shuffles(sim, mod, sched, threads):
    rng = np.random.default_rng(threads)
    x = rng.integers(-8, 8, 1000).astype(np.float32)
    out = sim.empty(2 * 3, np.float32)
    sim.launch(k(sim, mod, "block_sum"), (3,), (threads,), (sim.ascontiguous(x), out, np.int32(1000)),
               threads * 4)
    per = [x[b * threads::3 * threads] for b in range(3)]
    want = [sum(x[i] for i in range(b * threads, 1000) if (i // threads) % 3 == b) for b in range(3)]
    del per
    np.testing.assert_array_equal(out[0::2], want)
    np.testing.assert_array_equal(out[1::2], want)


def test_missing_barrier_is_visible_under_every_schedule(sim, mod, sched):
    x = sim.ascontiguous(np.arange(64, dtype=np.float32))
    y = sim.empty(64, np.float32)
    sim.launch(k(sim, mod, "rotate_nosync"), (1,), (64,), (x, y), 0)
    assert np.isnan(y).any(), "a racy read must see poisoned shared memory"
    sim.launch(k(sim, mod, "rotate_sync"), (1,), (64,), (x, y), 0)
    np.testing.assert_array_equal(y, np.roll(np.arange(64, dtype=np.float32), -1))


def test_shared_memory_poisoned_per_block(sim, mod, sched):
    y = sim.empty((3, 32, 2), np.float32)
    sim.launch(k(sim, mod, "read_shared_early"), (3,), (32,), (y,), 32 * 4)
    order = {"reverse": 2, "random": None}.get(sched, 0)
    ok = np.all(y == np.array([1.0, 2.0], np.float32), axis=(1, 2))
    assert ok.sum() == 1 and (order is None or ok[0])  # only block 0 wrote its shared memory
    assert np.isnan(y[1:]).all()


def test_warp_ops(sim, mod, sched):
    n = 64
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, n).astype(np.int32)
    for width in (32, 8):
        out = sim.empty((n, 16), np.int32)
        sim.launch(k(sim, mod, "warp_ops"), (1,), (n,), (sim.ascontiguous(x), out, np.int32(width)), 0)
        for t in range(n):
            lane, w0 = t % 32, t - t % 32
            wv = x[w0:w0 + 32]
            seg = lane & ~(width - 1)
            assert out[t, 0] == wv[3]
            assert out[t, 1] == wv[seg + ((lane + 1) % width)]
            assert out[t, 2] == (wv[lane - 2] if lane - 2 >= seg else wv[lane])
            assert out[t, 3] == (wv[lane + 3] if lane + 3 < seg + width else wv[lane])
            src = lane ^ 5
            assert out[t, 4] == (wv[src] if src < seg + width else wv[lane])
            assert out[t, 5] == np.int32(np.uint32(sum(1 << i for i in range(32) if wv[i] & 1)))
            assert out[t, 6] == int((wv == 7).any())
            assert out[t, 7] == 1
            assert out[t, 8] == wv.sum()
            assert out[t, 9] == wv.max()
            assert out[t, 10] == np.int32(np.uint32(sum(1 << i for i in range(32)
                                                        if wv[i] % 3 == wv[lane] % 3)))
            assert out[t, 11] == 2 * wv[lane ^ 1]
            hs = lane & ~15
            assert out[t, 12] == (wv[lane + 1] if lane + 1 < hs + 16 else wv[lane])
            assert out[t, 13] == int((x & 1).sum())
            assert out[t, 14] == 1
            assert out[t, 15] == int((x == 5).any())


def test_atomics(sim, mod, sched):
    ci = sim.ascontiguous(np.zeros(2, np.int32))
    cf = sim.ascontiguous(np.zeros(1, np.float32))
    cd = sim.ascontiguous(np.zeros(1, np.float64))
    mx = sim.ascontiguous(np.full(1, -1, np.int32))
    cas = sim.ascontiguous(np.zeros(1, np.uint32))
    order = sim.empty(96, np.uint32)
    sim.launch(k(sim, mod, "atomics"), (3,), (32,), (ci, cf, cd, mx, cas, order), 0)
    assert list(ci) == [96, 96] and cf[0] == 48.0 and cd[0] == 24.0
    assert mx[0] == max((t * 37) % 101 for t in range(96))
    assert 1 <= cas[0] <= 96
    assert sorted(order) == list(range(96))


def test_schedule_orders(sim, mod):
    fn = k(sim, mod, "arrival_order")
    order = sim.empty(64, np.uint32)
    got = {}
    for s in SCHEDULES:
        with sim.schedule(s, seed=5):
            sim.launch(fn, (1,), (64,), (order,), 0)
        got[s] = order.copy()
    assert list(got["forward"]) == list(range(64))
    assert list(got["reverse"]) == list(range(63, -1, -1))
    assert sorted(got["random"]) == list(range(64)) and list(got["random"]) != list(range(64))
    assert sorted(got["warp"]) == list(range(64))
    # random is reproducible for a seed
    with sim.schedule("random", seed=5):
        sim.launch(fn, (1,), (64,), (order,), 0, seed=5 - 0)
    assert sim.last_schedule[0] == "random"


def test_schedule_attribute_and_cycle():
    s = SimRuntime(schedule="reverse")
    assert s.schedule == "reverse"
    with s.schedule("warp"):
        assert s.schedule == "warp"
    assert s.schedule == "reverse"
    s.schedule = "cycle"
    assert s.schedule == "cycle"
    with pytest.raises(ValueError, match="unknown schedule"):
        SimRuntime(schedule="sideways")


def test_cycle_uses_every_schedule(sim, mod):
    fn = k(sim, mod, "arrival_order")
    order = sim.empty(32, np.uint32)
    seen = []
    with sim.schedule("cycle"):
        for _ in range(4):
            sim.launch(fn, (1,), (32,), (order,), 0)
            seen.append(sim.last_schedule[0])
    assert sorted(seen) == sorted(SCHEDULES)


def test_half_bfloat16(sim, mod, sched):
    ml = pytest.importorskip("ml_dtypes")
    x = np.array([0.0, -0.0, 1.0, 1 / 3, 65504.0, 65520.0, 1e-8, 6e-8, -2.5e-5, 3.14159, 1e30,
                  np.inf, -np.inf, 1.0009765625 + 2**-12, 2049.0, 0.1] * 2, np.float32)
    n = x.size
    h, b = sim.empty(n, np.uint16), sim.empty(n, np.uint16)
    back = sim.empty((n, 2), np.float32)
    sim.launch(k(sim, mod, "halfs"), (1,), (n,), (sim.ascontiguous(x), h, b, back), 0)
    np.seterr(over="ignore")
    np.testing.assert_array_equal(h, x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(b, x.astype(ml.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(back[:, 0], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back[:, 1], x.astype(ml.bfloat16).astype(np.float32))


def test_math(sim, mod, sched):
    x = np.linspace(-2, 2, 8).astype(np.float32)
    y = sim.empty((8, 8), np.float32)
    sim.launch(k(sim, mod, "mathk"), (1,), (8,), (sim.ascontiguous(x), y), 0)
    i = np.arange(8)
    np.testing.assert_allclose(y[:, 0], x * 2 + 1, rtol=1e-6)
    np.testing.assert_array_equal(y[:, 1], np.minimum(x, 0.5))
    np.testing.assert_allclose(y[:, 2], np.sqrt(np.abs(x)), rtol=1e-6)
    np.testing.assert_array_equal(y[:, 3], np.minimum(i, 3))
    np.testing.assert_array_equal(y[:, 4], np.maximum(i, 3))
    np.testing.assert_allclose(y[:, 5], np.exp(x), rtol=1e-6)
    np.testing.assert_allclose(y[:, 6], 1 / np.sqrt(np.abs(x) + 1), rtol=1e-6)
    np.testing.assert_array_equal(y[:, 7], [bin(v).count("1") for v in i])


def test_many_parameter_types(sim, mod):
    a = sim.ascontiguous(np.array([1.5]))
    out = sim.empty(1, np.float64)
    sim.launch(k(sim, mod, "many_types"), (1,), (1,),
               (a, np.uint32(2), np.int64(3), np.float64(0.25), np.uint8(4), np.bool_(True), out), 0)
    assert out[0] == 1.5 + 2 + 3 + 0.25 + 4 + 1


# ---------------------------------------------------------------------------- memory
def test_empty_is_poisoned_and_plain(sim):
    a = sim.empty((3, 4), np.float32)
    assert type(a) is np.ndarray and a.flags.writeable and a.shape == (3, 4)
    assert np.isnan(a).all()
    assert (sim.empty(5, np.int32) == -1).all()
    z = sim.empty((0, 3), np.float64)
    assert z.shape == (0, 3)


def test_ascontiguous_copies(sim):
    h = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    d = sim.ascontiguous(h)
    assert d.flags.c_contiguous and (d == h).all()
    d[...] = 0
    assert h[0, 1] == 2.0
    assert sim.is_device_array(d) and not sim.is_device_array(h)


def test_device_arrays_survive_their_creator(sim, mod):
    y = sim.empty(64, np.float32)[8:]
    del_me = sim.ascontiguous(np.arange(64, dtype=np.float32))
    view = del_me[8:]
    del del_me
    sim.launch(k(sim, mod, "axpy"), (1,), (64,), (view, y, np.float32(1), np.int64(56)), 0)
    assert np.isnan(y).all()  # NaN + x stays NaN: y was poisoned
    assert view[0] == 8.0


# ---------------------------------------------------------------------------- errors
def err(excinfo):
    return str(excinfo.value)


def test_early_return_before_barrier(sim, mod, sched):
    y = sim.empty(64, np.float32)
    with pytest.raises(SyncError) as e:
        sim.launch(k(sim, mod, "early_return"), (1,), (64,), (y, np.int32(40)), 64 * 4)
    m = err(e)
    assert "__syncthreads() at toy.cu:" in m and "40 of 64" in m and "exited" in m, m
    # the same kernel is fine when every thread reaches the barrier
    sim.launch(k(sim, mod, "early_return"), (1,), (64,), (y, np.int32(64)), 64 * 4)
    assert (y == 1).all()


def test_divergent_barrier(sim, mod, sched):
    with pytest.raises(SyncError, match="not the same one|different barriers") as e:
        sim.launch(k(sim, mod, "divergent_barrier"), (1,), (64,), (sim.empty(64, np.float32),), 0)
    assert "toy.cu:" in err(e)


def test_warp_lane_not_in_mask(sim, mod, sched):
    with pytest.raises(WarpSyncError, match=r"__shfl_sync at toy.cu:\d+: the calling lane (1[6-9]|2\d|3[01]) .* "
                                            r"not in mask 0x0000ffff"):
        sim.launch(k(sim, mod, "shfl_outside_mask"), (1,), (32,), (sim.empty(32, np.int32),), 0)


def test_warp_mask_lane_exited(sim, mod, sched):
    with pytest.raises(WarpSyncError, match="lane 7 .*(exited|never arrive)"):
        sim.launch(k(sim, mod, "shfl_lane_exited"), (1,), (32,), (sim.empty(32, np.int32),), 0)


def test_warp_lanes_at_different_ops(sim, mod, sched):
    with pytest.raises(WarpSyncError, match="deadlock at __shfl_(xor|down)_sync"):
        sim.launch(k(sim, mod, "shfl_divergent"), (1,), (32,), (sim.empty(32, np.int32),), 0)


def test_warp_source_lane_not_in_mask(sim, mod, sched):
    with pytest.raises(WarpSyncError, match="reads lane 9, which is not in mask"):
        sim.launch(k(sim, mod, "shfl_src_not_in_mask"), (1,), (32,), (sim.empty(32, np.int32),), 0)


def test_warp_mask_names_missing_lanes(sim, mod, sched):
    with pytest.raises(WarpSyncError, match="lanes that do not exist"):
        sim.launch(k(sim, mod, "warp_ops"), (1,), (48,),
                   (sim.ascontiguous(np.zeros(48, np.int32)), sim.empty((48, 16), np.int32),
                    np.int32(32)), 0)


def test_warp_op_against_barrier_deadlock(sim, mod, sched):
    with pytest.raises(SyncError, match="lane 0 waits at __syncthreads"):
        sim.launch(k(sim, mod, "warp_vs_barrier"), (1,), (32,), (sim.empty(32, np.int32),), 0)


@pytest.mark.parametrize("shift", [1, 3, 1000])
def test_oob_write_after_end(sim, mod, sched, shift):
    x = sim.ascontiguous(np.ones(100, np.float32))
    y = sim.empty(100, np.float32)
    with pytest.raises(MemoryAccessError) as e:
        sim.launch(k(sim, mod, "oob"), (2,), (64,), (x, y, np.int32(100), np.int32(shift)), 0)
    m = err(e)
    assert "out-of-bounds write of argument 1 'y' (float32[100])" in m, m
    assert re.search(r"block \(\d,0,0\) thread \(\d+,0,0\)", m)


def test_oob_read_after_end_and_before_start(sim, mod, sched):
    x = sim.ascontiguous(np.ones(100, np.float32))
    y = sim.empty(100, np.float32)
    with pytest.raises(MemoryAccessError, match=r"out-of-bounds read of argument 0 'x'.* byte offset 400 "
                                                r"\(element 100\)"):
        sim.launch(k(sim, mod, "oob_read"), (2,), (64,), (x, y, np.int32(100), np.int32(1)), 0)
    with pytest.raises(MemoryAccessError, match="before the start"):
        sim.launch(k(sim, mod, "oob_read"), (2,), (64,), (x, y, np.int32(100), np.int32(-1100)), 0)


def test_small_write_before_start_hits_canary(sim, mod, sched):
    x = sim.ascontiguous(np.ones(100, np.float32))
    y = sim.empty(100, np.float32)
    with pytest.raises(MemoryAccessError, match=r"before the start of argument 1 'y'.*\[-4, -3, -2, -1\]"):
        sim.launch(k(sim, mod, "oob"), (2,), (64,), (x, y, np.int32(100), np.int32(-1)), 0)
    # the canary is repaired: a correct launch afterwards passes
    sim.launch(k(sim, mod, "oob"), (2,), (64,), (x, y, np.int32(100), np.int32(0)), 0)


def test_write_to_const_input(sim, mod, sched):
    x = sim.ascontiguous(np.ones(32, np.float32))
    with pytest.raises(MemoryAccessError, match="declares it const"):
        sim.launch(k(sim, mod, "write_const"), (1,), (32,), (x,), 0)
    x[0] = 5.0  # writable again for the host


def test_shared_memory_out_of_bounds(sim, mod, sched):
    y = sim.empty(32, np.float32)
    with pytest.raises(MemoryAccessError, match="dynamic shared memory at byte offset 4096"):
        sim.launch(k(sim, mod, "smem_oob"), (1,), (32,), (y, np.int32(1024)), 32 * 4)
    with pytest.raises(MemoryAccessError, match="dynamic shared memory at byte offset -4"):
        sim.launch(k(sim, mod, "smem_oob"), (1,), (32,), (y, np.int32(-1)), 32 * 4)
    with pytest.raises(MemoryAccessError, match="write to dynamic shared memory at byte offset 128"):
        sim.launch(k(sim, mod, "smem_oob"), (1,), (32,), (y, np.int32(32)), 32 * 4)
    with pytest.raises(MemoryAccessError, match="read of dynamic shared memory"):
        sim.launch(k(sim, mod, "smem_oob_read"), (1,), (32,), (y, np.int32(0)), 0)
    sim.launch(k(sim, mod, "smem_oob"), (1,), (32,), (y, np.int32(31)), 32 * 4)


def test_null_pointer(sim, mod):
    with pytest.raises(MemoryAccessError, match="null pointer"):
        sim.launch(k(sim, mod, "null_ptr"), (1,), (4,), (sim.empty(1, np.int32),), 0)


def test_time_limit(mod):
    s = SimRuntime(time_limit=0.3)
    flag = s.ascontiguous(np.zeros(1, np.int32))
    with pytest.raises(KernelTimeoutError, match="time limit"):
        s.launch(s.get_function(mod, "spin"), (1,), (4,), (flag,), 0)


def test_trap_division_stack(sim, mod, sched):
    y = sim.empty(32, np.int32)
    with pytest.raises(KernelCrashError, match=r"__trap\(\) called at toy.cu:\d+") as e:
        sim.launch(k(sim, mod, "trap"), (1,), (32,), (y,), 0)
    assert "thread (5,0,0)" in err(e)
    with pytest.raises(KernelCrashError, match="division by zero"):
        sim.launch(k(sim, mod, "divide"), (1,), (8,), (y, np.int32(-3)), 0)
    with pytest.raises(KernelCrashError, match="stack overflow"):
        sim.launch(k(sim, mod, "recurse"), (1,), (2,), (y, np.int32(10000)), 0)
    sim.launch(k(sim, mod, "recurse"), (1,), (2,), (y, np.int32(3)), 0)


def test_argument_checks(sim, mod):
    fn = k(sim, mod, "oob")
    x = sim.ascontiguous(np.ones(4, np.float32))
    y = sim.empty(4, np.float32)
    i = np.int32(4)
    cases = [
        ((x, y, np.int64(4), i), r"argument 2 'n' is int \(4 bytes, signed integer\), got np.int64"),
        ((x, y, np.float32(4), i), "argument 2 'n' is int .* got np.float32"),
        ((x, y, 4, i), "untyped Python int"),
        ((x, y, x, i), "argument 2 'n' is int, got ndarray"),
        ((x, np.float32(1), i, i), r"argument 1 'y' is float\*"),
        ((x, y, i), r"takes 4 arguments \(const float\* x, float\* y, int n, int shift\), got 3"),
        ((x, np.ones(4, np.float32), i, i), "host memory"),
        ((x, sim.empty(4, np.float64), i, i), r"float\* .* got a float64 array"),
        ((x, y, np.uint32(4), i), "got np.uint32"),
    ]
    for args, pat in cases:
        with pytest.raises(LaunchArgumentError, match=pat):
            sim.launch(fn, (1,), (4,), args, 0)
    with pytest.raises(TypeError):  # LaunchArgumentError is a TypeError
        sim.launch(fn, (1,), (4,), (x, y, 4, 0), 0)


def test_config_checks(sim, mod):
    fn = k(sim, mod, "barriers")
    y = sim.empty(2048, np.float32)
    for grid, block, smem in [((0,), (32,), 0), ((1,), (2048,), 0), ((1,), (32, 32, 2), 0),
                              ((1,), (32,), -1), ((1,), (32,), 10**7), ((1, 70000), (1,), 0)]:
        with pytest.raises(LaunchConfigError):
            sim.launch(fn, grid, block, (y, np.int32(1)), smem)


def test_get_function_and_compile_errors(sim, mod):
    with pytest.raises(KeyError, match="not an entry point"):
        sim.get_function(mod, "nope")
    with pytest.raises(CudaSimCompileError, match="not found"):
        sim.build("extern \"C\" __global__ void a(int* p) { p[0] = 1; }\n", ["b"], ())
    with pytest.raises(CudaSimCompileError, match="error"):
        sim.build("extern \"C\" __global__ void a(int* p) { p[0] = undefined_thing; }\n", ["a"], ())


def test_recovers_after_errors(sim, mod, sched):
    y = sim.empty(32, np.int32)
    with pytest.raises(KernelCrashError):
        sim.launch(k(sim, mod, "trap"), (1,), (32,), (y,), 0)
    sim.launch(k(sim, mod, "trap"), (1,), (4,), (y,), 0)
    assert (y[:4] == 1).all()


def test_max_threads_and_many_barriers(sim, mod, sched):
    y = sim.empty(2 * 1024, np.float32)
    sim.launch(k(sim, mod, "barriers"), (2,), (1024,), (y, np.int32(3)), 0)
    np.testing.assert_array_equal(y, np.tile(np.arange(1024, dtype=np.float32), 2))
