// cudasim.h -- the CUDA shim of gpuconv's CPU emulator (gpuconv.testing.cudasim).
//
// Force-included (g++ -include) in front of an UNCHANGED CUDA source, so the
// source compiles as C++ and its kernels run on CPU fibers, one fiber per CUDA
// thread, scheduled by runtime.cpp.  __CUDA_ARCH__ is NOT defined: sources take
// their portable C++ paths (inline PTX is not emulated).  __CUDASIM__ is.
//
// Shared memory: `__shared__` is `thread_local`, the one storage class that is
// valid both in `__shared__ float tile[64];` (a block-scope variable with static
// storage: one instance shared by all fibers of the block, since fibers run on one
// OS thread) and in `extern __shared__ unsigned char smem[];` (resolved by the
// build step to the module's dynamic shared memory array).  The runtime poisons
// both before every block.
//
// The first part (ABI) is shared with runtime.cpp; the rest is the kernel-side API.
#ifndef GPUCONV_CUDASIM_H
#define GPUCONV_CUDASIM_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

// ------------------------------------------------------------------------------ ABI
#define CUDASIM_ABI_VERSION 4

struct uint3 { unsigned int x, y, z; };

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// public head of a fiber (one CUDA thread); runtime.cpp extends it
struct cudasim_thread {
  uint3 tid;
  unsigned int linear;  // x + y*bx + z*bx*by
};

// kernel parameter description, generated per entry point by the build step
struct cudasim_param {
  char kind;           // 'p' pointer, 'i' signed, 'u' unsigned, 'b' bool, 'f' float, 'o' other
  char pointee_kind;   // for pointers: kind of *p ('v' for void)
  char pointee_const;  // for pointers: *p is const
  char pad_;
  unsigned int size;          // sizeof(parameter)
  unsigned int pointee_size;  // sizeof(*p) (0 for void)
};

typedef void (*cudasim_invoker)(void* fn, void** args);

struct cudasim_entry {
  const char* name;
  void* fn;
  cudasim_invoker invoke;
  int nparams;
  const cudasim_param* params;
};

enum {
  CUDASIM_BAR_SYNC = 0, CUDASIM_BAR_COUNT, CUDASIM_BAR_AND, CUDASIM_BAR_OR
};
enum {
  CUDASIM_W_SYNCWARP = 0, CUDASIM_W_SHFL, CUDASIM_W_SHFL_UP, CUDASIM_W_SHFL_DOWN,
  CUDASIM_W_SHFL_XOR, CUDASIM_W_BALLOT, CUDASIM_W_ANY, CUDASIM_W_ALL,
  CUDASIM_W_RED_ADD, CUDASIM_W_RED_MIN, CUDASIM_W_RED_MAX, CUDASIM_W_RED_AND,
  CUDASIM_W_RED_OR, CUDASIM_W_RED_XOR, CUDASIM_W_MATCH_ANY,
  // warp-wide .aligned matrix instructions (kernels/warp.cuh): every lane of a full warp
  CUDASIM_W_MMA_F16, CUDASIM_W_MMA_BF16, CUDASIM_W_MMA_TF32, CUDASIM_W_MMA_F64,
  CUDASIM_W_LDSM_X1, CUDASIM_W_LDSM_X2, CUDASIM_W_LDSM_X4,
  CUDASIM_W_LDSM_X1_T, CUDASIM_W_LDSM_X2_T, CUDASIM_W_LDSM_X4_T,
  CUDASIM_W_NOPS
};

extern "C" {
extern cudasim_thread* cudasim_cur;
extern uint3 cudasim_block_idx;
extern dim3 cudasim_block_dim;
extern dim3 cudasim_grid_dim;
int cudasim_syncthreads(int op, int pred, int line);
unsigned long long cudasim_warp(int op, unsigned int mask, unsigned long long bits, int size,
                                int aux, int width, int line);
unsigned int cudasim_activemask(void);
void cudasim_trap(const char* what, int line) __attribute__((noreturn));
long long cudasim_clock(void);
// tensor-core and async-copy instructions (the semantics are documented in kernels/warp.cuh)
void cudasim_mma(int op, void* d, const void* a, const void* b, const void* c, int line);
void cudasim_ldmatrix(int op, unsigned int* r, const void* row, int line);
void cudasim_cp_async(void* dst, const void* src, int cp_size, int src_bytes, int line);
void cudasim_cp_async_commit(int line);
void cudasim_cp_async_wait(int n, int line);
// a vector-type load/store at an address not aligned to the type's size
void cudasim_misaligned(const void* p, int align, int write, const char* type, int line)
    __attribute__((noreturn));
}

#ifndef CUDASIM_RUNTIME  // ------------------------------------------ kernel-side API
#define __CUDASIM__ 1

#include <math.h>
#include <float.h>
#include <limits.h>
#include <stdio.h>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define __managed__
#define __constant__
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __cudart_builtin__
#define __device_builtin__

#define threadIdx (static_cast<const uint3&>(cudasim_cur->tid))
#define blockIdx (static_cast<const uint3&>(cudasim_block_idx))
#define blockDim (static_cast<const dim3&>(cudasim_block_dim))
#define gridDim (static_cast<const dim3&>(cudasim_grid_dim))
static constexpr int warpSize = 32;

// ---- vector types (CUDA alignments)
// Copies of the multi-element vector types check the alignment of the source (a load)
// and of the destination (a store): a misaligned uint4/float4/double2/__half2/... access
// is a MemoryAccessError, as the GPU's "misaligned address" fault.  (They are therefore
// not trivially copyable in the emulator: no unions of them; reinterpret_cast is fine.)
#define CUDASIM_CHECKED_COPY(N, A)                                                        \
  N(const N& o, int cudasim_line = __builtin_LINE()) {                                    \
    if ((uintptr_t)&o & (uintptr_t)((A) - 1)) cudasim_misaligned(&o, (A), 0, #N, cudasim_line); \
    memcpy((void*)this, (const void*)&o, sizeof(N));                                      \
  }                                                                                       \
  N& operator=(const N& o) {                                                              \
    if ((uintptr_t)this & (uintptr_t)((A) - 1)) cudasim_misaligned(this, (A), 1, #N, 0);  \
    if ((uintptr_t)&o & (uintptr_t)((A) - 1)) cudasim_misaligned(&o, (A), 0, #N, 0);      \
    memcpy((void*)this, (const void*)&o, sizeof(N));                                      \
    return *this;                                                                         \
  }
#define CUDASIM_VEC2(T, N, A)                                                             \
  struct __attribute__((aligned(A))) N {                                                  \
    T x, y;                                                                               \
    N() = default;                                                                        \
    constexpr N(T a, T b) : x(a), y(b) {}                                                 \
    CUDASIM_CHECKED_COPY(N, A)                                                            \
  };
#define CUDASIM_VEC4(T, N, A)                                                             \
  struct __attribute__((aligned(A))) N {                                                  \
    T x, y, z, w;                                                                         \
    N() = default;                                                                        \
    constexpr N(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}                           \
    CUDASIM_CHECKED_COPY(N, A)                                                            \
  };
#define CUDASIM_VEC(T, N, A) \
  struct __attribute__((aligned(A))) N##1 { T x; }; \
  CUDASIM_VEC2(T, N##2, 2 * A) \
  struct N##3 { T x, y, z; }; \
  CUDASIM_VEC4(T, N##4, (4 * A > 16 ? 16 : 4 * A)) \
  inline N##1 make_##N##1(T a) { return N##1{a}; } \
  inline N##2 make_##N##2(T a, T b) { return N##2(a, b); } \
  inline N##3 make_##N##3(T a, T b, T c) { return N##3{a, b, c}; } \
  inline N##4 make_##N##4(T a, T b, T c, T d) { return N##4(a, b, c, d); }
CUDASIM_VEC(signed char, char, 1)
CUDASIM_VEC(unsigned char, uchar, 1)
CUDASIM_VEC(short, short, 2)
CUDASIM_VEC(unsigned short, ushort, 2)
CUDASIM_VEC(int, int, 4)
CUDASIM_VEC(float, float, 4)
#undef CUDASIM_VEC
struct int3_unused_;
inline uint3 make_uint3(unsigned a, unsigned b, unsigned c) { return uint3{a, b, c}; }
CUDASIM_VEC2(unsigned int, uint2, 8)
CUDASIM_VEC4(unsigned int, uint4, 16)
inline uint2 make_uint2(unsigned a, unsigned b) { return uint2(a, b); }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4(a, b, c, d); }
CUDASIM_VEC2(double, double2, 16)
CUDASIM_VEC2(long long, longlong2, 16)
CUDASIM_VEC2(unsigned long long, ulonglong2, 16)
inline double2 make_double2(double a, double b) { return double2(a, b); }

// ---- barriers and warp operations (every one is a scheduling point)
inline void __syncthreads(int line = __builtin_LINE()) {
  cudasim_syncthreads(CUDASIM_BAR_SYNC, 0, line);
}
inline int __syncthreads_count(int p, int line = __builtin_LINE()) {
  return cudasim_syncthreads(CUDASIM_BAR_COUNT, p != 0, line);
}
inline int __syncthreads_and(int p, int line = __builtin_LINE()) {
  return cudasim_syncthreads(CUDASIM_BAR_AND, p != 0, line);
}
inline int __syncthreads_or(int p, int line = __builtin_LINE()) {
  return cudasim_syncthreads(CUDASIM_BAR_OR, p != 0, line);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu, int line = __builtin_LINE()) {
  cudasim_warp(CUDASIM_W_SYNCWARP, mask, 0, 0, 0, 32, line);
}

template <class T>
inline T cudasim_warp_value(int op, unsigned int mask, T v, int aux, int width, int line) {
  static_assert(sizeof(T) <= 8 && std::is_standard_layout<T>::value,
                "cudasim: warp shuffles take values of at most 8 bytes");
  unsigned long long b = 0;
  memcpy(&b, &v, sizeof(T));
  b = cudasim_warp(op, mask, b, (int)sizeof(T), aux, width, line);
  T r;
  memcpy(&r, &b, sizeof(T));
  return r;
}
template <class T>
inline T __shfl_sync(unsigned int mask, T var, int src, int width = 32, int line = __builtin_LINE()) {
  return cudasim_warp_value(CUDASIM_W_SHFL, mask, var, src, width, line);
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                        int line = __builtin_LINE()) {
  return cudasim_warp_value(CUDASIM_W_SHFL_UP, mask, var, (int)delta, width, line);
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                          int line = __builtin_LINE()) {
  return cudasim_warp_value(CUDASIM_W_SHFL_DOWN, mask, var, (int)delta, width, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32,
                         int line = __builtin_LINE()) {
  return cudasim_warp_value(CUDASIM_W_SHFL_XOR, mask, var, lane_mask, width, line);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred, int line = __builtin_LINE()) {
  return (unsigned int)cudasim_warp(CUDASIM_W_BALLOT, mask, pred != 0, 4, 0, 32, line);
}
inline int __any_sync(unsigned int mask, int pred, int line = __builtin_LINE()) {
  return (int)cudasim_warp(CUDASIM_W_ANY, mask, pred != 0, 4, 0, 32, line);
}
inline int __all_sync(unsigned int mask, int pred, int line = __builtin_LINE()) {
  return (int)cudasim_warp(CUDASIM_W_ALL, mask, pred != 0, 4, 0, 32, line);
}
inline unsigned int __match_any_sync(unsigned int mask, unsigned long long v,
                                     int line = __builtin_LINE()) {
  return (unsigned int)cudasim_warp(CUDASIM_W_MATCH_ANY, mask, v, 8, 0, 32, line);
}
#define CUDASIM_REDUCE(NAME, OP, T, SIGNED)                                              \
  inline T NAME(unsigned int mask, T v, int line = __builtin_LINE()) {                   \
    return (T)cudasim_warp(OP, mask, (unsigned int)v, 4, SIGNED, 32, line);             \
  }
CUDASIM_REDUCE(__reduce_add_sync, CUDASIM_W_RED_ADD, unsigned int, 0)
CUDASIM_REDUCE(__reduce_add_sync, CUDASIM_W_RED_ADD, int, 1)
CUDASIM_REDUCE(__reduce_min_sync, CUDASIM_W_RED_MIN, unsigned int, 0)
CUDASIM_REDUCE(__reduce_min_sync, CUDASIM_W_RED_MIN, int, 1)
CUDASIM_REDUCE(__reduce_max_sync, CUDASIM_W_RED_MAX, unsigned int, 0)
CUDASIM_REDUCE(__reduce_max_sync, CUDASIM_W_RED_MAX, int, 1)
CUDASIM_REDUCE(__reduce_and_sync, CUDASIM_W_RED_AND, unsigned int, 0)
CUDASIM_REDUCE(__reduce_or_sync, CUDASIM_W_RED_OR, unsigned int, 0)
CUDASIM_REDUCE(__reduce_xor_sync, CUDASIM_W_RED_XOR, unsigned int, 0)
#undef CUDASIM_REDUCE
inline unsigned int __activemask() { return cudasim_activemask(); }

// ---- memory fences, loads, misc (fibers of a launch share one OS thread)
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
inline void __trap(int line = __builtin_LINE()) { cudasim_trap("__trap()", line); }
inline void __brkpt(int line = __builtin_LINE()) { cudasim_trap("__brkpt()", line); }
inline long long clock64() { return cudasim_clock(); }
inline long long clock() { return cudasim_clock(); }
inline void __nanosleep(unsigned int) {}

// ---- atomics (single OS thread: plain read-modify-write is atomic)
#define CUDASIM_ATOMIC_RMW(NAME, T, EXPR) \
  inline T NAME(T* p, T v) { T o = *p; *p = (EXPR); return o; }
#define CUDASIM_ATOMIC_INT(T)                          \
  CUDASIM_ATOMIC_RMW(atomicAdd, T, o + v)              \
  CUDASIM_ATOMIC_RMW(atomicSub, T, o - v)              \
  CUDASIM_ATOMIC_RMW(atomicExch, T, v)                 \
  CUDASIM_ATOMIC_RMW(atomicMin, T, v < o ? v : o)      \
  CUDASIM_ATOMIC_RMW(atomicMax, T, v > o ? v : o)      \
  CUDASIM_ATOMIC_RMW(atomicAnd, T, o & v)              \
  CUDASIM_ATOMIC_RMW(atomicOr, T, o | v)               \
  CUDASIM_ATOMIC_RMW(atomicXor, T, o ^ v)              \
  inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
CUDASIM_ATOMIC_INT(int)
CUDASIM_ATOMIC_INT(unsigned int)
CUDASIM_ATOMIC_INT(unsigned long long)
CUDASIM_ATOMIC_INT(long long)
CUDASIM_ATOMIC_RMW(atomicAdd, float, o + v)
CUDASIM_ATOMIC_RMW(atomicAdd, double, o + v)
CUDASIM_ATOMIC_RMW(atomicExch, float, v)
CUDASIM_ATOMIC_RMW(atomicMax, float, fmaxf(o, v))
CUDASIM_ATOMIC_RMW(atomicMin, float, fminf(o, v))
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  unsigned short o = *p; if (o == cmp) *p = v; return o;
}
inline unsigned int atomicInc(unsigned int* p, unsigned int v) {
  unsigned int o = *p; *p = (o >= v) ? 0u : o + 1u; return o;
}
inline unsigned int atomicDec(unsigned int* p, unsigned int v) {
  unsigned int o = *p; *p = (o == 0u || o > v) ? v : o - 1u; return o;
}
#define CUDASIM_SCOPED(NAME) \
  template <class... A> inline auto NAME##_block(A... a) -> decltype(NAME(a...)) { return NAME(a...); } \
  template <class... A> inline auto NAME##_system(A... a) -> decltype(NAME(a...)) { return NAME(a...); }
CUDASIM_SCOPED(atomicAdd) CUDASIM_SCOPED(atomicSub) CUDASIM_SCOPED(atomicExch)
CUDASIM_SCOPED(atomicMin) CUDASIM_SCOPED(atomicMax) CUDASIM_SCOPED(atomicCAS)
#undef CUDASIM_SCOPED
#undef CUDASIM_ATOMIC_INT
#undef CUDASIM_ATOMIC_RMW

// ---- integer and float intrinsics
#define CUDASIM_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDASIM_MINMAX(int)
CUDASIM_MINMAX(unsigned int)
CUDASIM_MINMAX(long)
CUDASIM_MINMAX(unsigned long)
CUDASIM_MINMAX(long long)
CUDASIM_MINMAX(unsigned long long)
#undef CUDASIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
inline long long min(int a, long long b) { return min((long long)a, b); }
inline long long min(long long a, int b) { return min(a, (long long)b); }
inline long long max(int a, long long b) { return max((long long)a, b); }
inline long long max(long long a, int b) { return max(a, (long long)b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned int umin(unsigned int a, unsigned int b) { return min(a, b); }
inline unsigned int umax(unsigned int a, unsigned int b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

template <class To, class From> inline To cudasim_bitcast(From f) {
  static_assert(sizeof(To) == sizeof(From), "size");
  To t; memcpy(&t, &f, sizeof(To)); return t;
}
inline int __float_as_int(float f) { return cudasim_bitcast<int>(f); }
inline unsigned int __float_as_uint(float f) { return cudasim_bitcast<unsigned int>(f); }
inline float __int_as_float(int i) { return cudasim_bitcast<float>(i); }
inline float __uint_as_float(unsigned int i) { return cudasim_bitcast<float>(i); }
inline long long __double_as_longlong(double d) { return cudasim_bitcast<long long>(d); }
inline double __longlong_as_double(long long i) { return cudasim_bitcast<double>(i); }

inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned int __float2uint_rn(float x) { return (unsigned int)nearbyintf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline float __double2float_rn(double x) { return (float)x; }

// ---- __half and __nv_bfloat16 (storage structs; arithmetic through float)
inline float cudasim_half_bits_to_float(unsigned short h) {
  unsigned int sign = (unsigned int)(h >> 15) << 31, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
  if (e == 0) {
    if (m == 0) { u = sign; }
    else { float f = ldexpf((float)m, -24); return sign ? -f : f; }
  } else if (e == 31) { u = sign | 0x7f800000u | (m << 13); }
  else { u = sign | ((e + 112u) << 23) | (m << 13); }
  return cudasim_bitcast<float>(u);
}
inline unsigned short cudasim_float_to_half_bits(float f) {  // round to nearest even
  unsigned int x = cudasim_bitcast<unsigned int>(f);
  unsigned int sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);
  if (ax < 0x38800000u) {  // subnormal half: multiples of 2^-24, rint is ties-to-even
    float a = cudasim_bitcast<float>(ax);
    return (unsigned short)(sign | (unsigned int)nearbyintf(a * 16777216.0f));
  }
  unsigned int r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (unsigned short)(sign | r);
}
inline float cudasim_bf16_bits_to_float(unsigned short b) {
  return cudasim_bitcast<float>((unsigned int)b << 16);
}
inline unsigned short cudasim_float_to_bf16_bits(float f) {
  unsigned int x = cudasim_bitcast<unsigned int>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}

#define CUDASIM_HALF_TYPE(T, TOF, FROMF)                                                 \
  struct T {                                                                             \
    unsigned short __x;                                                                  \
    T() = default;                                                                       \
    T(float f) : __x(FROMF(f)) {}                                                        \
    T(double f) : __x(FROMF((float)f)) {}                                                \
    T(int i) : __x(FROMF((float)i)) {}                                                   \
    operator float() const { return TOF(__x); }                                          \
    T& operator+=(T o) { *this = T((float)*this + (float)o); return *this; }            \
    T& operator-=(T o) { *this = T((float)*this - (float)o); return *this; }            \
    T& operator*=(T o) { *this = T((float)*this * (float)o); return *this; }            \
    T& operator/=(T o) { *this = T((float)*this / (float)o); return *this; }            \
  };                                                                                     \
  inline T operator+(T a, T b) { return T((float)a + (float)b); }                        \
  inline T operator-(T a, T b) { return T((float)a - (float)b); }                        \
  inline T operator*(T a, T b) { return T((float)a * (float)b); }                        \
  inline T operator/(T a, T b) { return T((float)a / (float)b); }                        \
  inline T operator-(T a) { T r = a; r.__x ^= 0x8000u; return r; }
CUDASIM_HALF_TYPE(__half, cudasim_half_bits_to_float, cudasim_float_to_half_bits)
CUDASIM_HALF_TYPE(__nv_bfloat16, cudasim_bf16_bits_to_float, cudasim_float_to_bf16_bits)
#undef CUDASIM_HALF_TYPE
// packed pairs (one 32-bit register): loads/stores alignment-checked like the vector types
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
  CUDASIM_CHECKED_COPY(__half2, 4)
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
  CUDASIM_CHECKED_COPY(__nv_bfloat162, 4)
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
inline float __half2float(__half h) { return cudasim_half_bits_to_float(h.__x); }
inline __half __float2half(float f) { __half h; h.__x = cudasim_float_to_half_bits(f); return h; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __float2half((float)d); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half __short_as_half(short u) { __half h; h.__x = (unsigned short)u; return h; }
inline float __bfloat162float(__nv_bfloat16 b) { return cudasim_bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  __nv_bfloat16 b; b.__x = cudasim_float_to_bf16_bits(f); return b;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hneg(__half a) { return -a; }
inline __half __hfma(__half a, __half b, __half c) {
  return __float2half((float)fma((double)(float)a, (double)(float)b, (double)(float)c));
}
inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
inline bool __hisinf(__half a) { return (a.__x & 0x7fffu) == 0x7c00u; }

#endif  // CUDASIM_RUNTIME
#endif  // GPUCONV_CUDASIM_H
