// gpuconv common header: prepended (as text) to every kernel source by gpuconv/_kernels.py.
//
// * storage types for half and bfloat16 (no cuda_fp16.h needed: NVRTC and the
//   CPU emulator compile this file unchanged), conversions with inline PTX on
//   the device and a portable C++ fallback everywhere else;
// * accumulate type per storage type (half/bfloat16/float -> float, double -> double);
// * the convolution geometry, always 3 spatial dims (1-D and 2-D problems have
//   leading size-1 dims), and the kernel parameter list that carries it.
//
// Every entry point is extern "C" with a systematic name
// gpuconv_<pass>_<dtype>[_i32|_i64]; templates live behind them.

#ifndef GPUCONV_COMMON_CUH
#define GPUCONV_COMMON_CUH

struct gc_half { unsigned short bits; };
struct gc_bf16 { unsigned short bits; };

__device__ __forceinline__ float gc_bits_to_float(unsigned int u) {
  union { unsigned int u; float f; } v;
  v.u = u;
  return v.f;
}
__device__ __forceinline__ unsigned int gc_float_to_bits(float f) {
  union { unsigned int u; float f; } v;
  v.f = f;
  return v.u;
}

// ---- half <-> float -----------------------------------------------------------------
__device__ __forceinline__ float gc_half_to_float_portable(unsigned short h) {
  unsigned int sign = (unsigned int)(h >> 15) << 31;
  unsigned int exp = (h >> 10) & 0x1fu;
  unsigned int mant = h & 0x3ffu;
  if (exp == 0u) {
    if (mant == 0u) return gc_bits_to_float(sign);
    int e = -1;  // subnormal: normalise
    do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0u);
    return gc_bits_to_float(sign | ((unsigned int)(113 - 1 - e) << 23) | ((mant & 0x3ffu) << 13));
  }
  if (exp == 31u) return gc_bits_to_float(sign | 0x7f800000u | (mant << 13));
  return gc_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// round to nearest, ties to even; overflow to inf; NaN stays NaN
__device__ __forceinline__ unsigned short gc_float_to_half_portable(float f) {
  unsigned int x = gc_float_to_bits(f);
  unsigned int sign = (x >> 16) & 0x8000u;
  unsigned int ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (unsigned short)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520
  if (ax < 0x38800000u) {                                          // < 2^-14: subnormal
    unsigned int e = ax >> 23;
    if (e < 102u) return (unsigned short)sign;
    unsigned int m = (ax & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - e;
    unsigned int r = m >> shift;
    unsigned int rem = m & ((1u << shift) - 1u);
    unsigned int halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
  }
  unsigned int r = (ax - 0x38000000u) >> 13;
  unsigned int rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (unsigned short)(sign | r);
}

__device__ __forceinline__ float gc_half_to_float(gc_half h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
#else
  return gc_half_to_float_portable(h.bits);
#endif
}

__device__ __forceinline__ gc_half gc_float_to_half(float f) {
  gc_half h;
#if defined(__CUDA_ARCH__)
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
  h.bits = gc_float_to_half_portable(f);
#endif
  return h;
}

// ---- bfloat16 <-> float ---------------------------------------------------------------
__device__ __forceinline__ float gc_bf16_to_float(gc_bf16 b) {
  return gc_bits_to_float((unsigned int)b.bits << 16);
}

__device__ __forceinline__ unsigned short gc_float_to_bf16_portable(float f) {
  unsigned int x = gc_float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}

__device__ __forceinline__ gc_bf16 gc_float_to_bf16(float f) {
  gc_bf16 b;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(f));
#else
  b.bits = gc_float_to_bf16_portable(f);
#endif
  return b;
}

// ---- type traits: accumulate type, load/store ----------------------------------------
template <typename T> struct gc_acc { typedef float type; };
template <> struct gc_acc<double> { typedef double type; };

__device__ __forceinline__ float gc_load(const float* p) { return *p; }
__device__ __forceinline__ double gc_load(const double* p) { return *p; }
__device__ __forceinline__ float gc_load(const gc_half* p) { return gc_half_to_float(*p); }
__device__ __forceinline__ float gc_load(const gc_bf16* p) { return gc_bf16_to_float(*p); }

__device__ __forceinline__ void gc_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void gc_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void gc_store(gc_half* p, float v) { *p = gc_float_to_half(v); }
__device__ __forceinline__ void gc_store(gc_bf16* p, float v) { *p = gc_float_to_bf16(v); }

__device__ __forceinline__ int gc_min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int gc_max(int a, int b) { return a > b ? a : b; }
// floor division for any sign of a, b > 0
__device__ __forceinline__ int gc_floordiv(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int gc_ceildiv(int a, int b) { return -gc_floordiv(-a, b); }

// ---- geometry ---------------------------------------------------------------------------
// x (N, C, D, H, W), w (K, C/G, KD, KH, KW), y (N, K, OD, OH, OW)
struct gc_geo {
  int N, C, K, G, Cg, Kg;
  int D, H, W;
  int KD, KH, KW;
  int OD, OH, OW;
  int sd, sh, sw;
  int dd, dh, dw;
  int pd, ph, pw;
};

#define GC_GEO_PARAMS                                                                       \
  int N, int C, int K, int G, int D, int H, int W, int KD, int KH, int KW, int OD, int OH,  \
      int OW, int sd, int sh, int sw, int dd, int dh, int dw, int pd, int ph, int pw
#define GC_GEO_MAKE                                                                         \
  gc_make_geo(N, C, K, G, D, H, W, KD, KH, KW, OD, OH, OW, sd, sh, sw, dd, dh, dw, pd, ph, pw)

__device__ __forceinline__ gc_geo gc_make_geo(int N, int C, int K, int G, int D, int H, int W,
                                              int KD, int KH, int KW, int OD, int OH, int OW,
                                              int sd, int sh, int sw, int dd, int dh, int dw,
                                              int pd, int ph, int pw) {
  gc_geo g;
  g.N = N; g.C = C; g.K = K; g.G = G; g.Cg = C / G; g.Kg = K / G;
  g.D = D; g.H = H; g.W = W;
  g.KD = KD; g.KH = KH; g.KW = KW;
  g.OD = OD; g.OH = OH; g.OW = OW;
  g.sd = sd; g.sh = sh; g.sw = sw;
  g.dd = dd; g.dh = dh; g.dw = dw;
  g.pd = pd; g.ph = ph; g.pw = pw;
  return g;
}

// ---- shared-memory tiles of the implicit-GEMM kernels --------------------------------
// A tile [GC_TILE_K][GC_TILE_MS] and B tile [GC_TILE_K][GC_TILE_N] in shared memory;
// thread (tm, tn) of 16x16 owns C rows tm + 16i and columns tn + 16j (i, j < 4), so
// shared loads broadcast / stay conflict-free and global stores coalesce.
// GC_TILE_M, GC_TILE_N, GC_TILE_K: generated by gpuconv._cuda.sources.config_header()
#ifndef GC_TILE_K
#error "GC_TILE_M/N/K are generated by gpuconv (gpuconv._cuda.sources.full_source)"
#endif
#define GC_TILE_MS (GC_TILE_M + 1)  // A-tile row stride: padded so column stores spread banks

template <typename A>
__device__ __forceinline__ void gc_tile_mma(const A* As, const A* Bs, A (&acc)[4][4], int tm,
                                            int tn) {
#pragma unroll
  for (int kk = 0; kk < GC_TILE_K; ++kk) {
    A a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[kk * GC_TILE_MS + tm + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[kk * GC_TILE_N + tn + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
  }
}

// Linear index -> (n, c, d, h, w) digits of an (N, C, D, H, W) tensor (w fastest).
template <typename I>
struct gc_ncdhw { I n; int c, d, h, w; };

template <typename I>
__device__ __forceinline__ gc_ncdhw<I> gc_unravel(I t, int C, int D, int H, int W) {
  gc_ncdhw<I> p;
  p.w = (int)(t % W); t /= W;
  p.h = (int)(t % H); t /= H;
  p.d = (int)(t % D); t /= D;
  p.c = (int)(t % C);
  p.n = t / C;
  return p;
}

// Output position (n, od, oh, ow) as mixed-radix digits, so the tiled kernels can
// step through N*OD*OH*OW by a fixed amount without a division per element.
struct gc_opos { int n, d, h, w; };

__device__ __forceinline__ gc_opos gc_opos_of(long long r, const gc_geo& g) {
  gc_opos p;
  p.w = (int)(r % g.OW); r /= g.OW;
  p.h = (int)(r % g.OH); r /= g.OH;
  p.d = (int)(r % g.OD);
  p.n = (int)(r / g.OD);
  return p;
}

// p += s (s < OD*OH*OW per digit, as made by gc_opos_of): one carry per digit
__device__ __forceinline__ void gc_opos_add(gc_opos& p, const gc_opos& s, const gc_geo& g) {
  int carry;
  p.w += s.w; carry = p.w >= g.OW; if (carry) p.w -= g.OW;
  p.h += s.h + carry; carry = p.h >= g.OH; if (carry) p.h -= g.OH;
  p.d += s.d + carry; carry = p.d >= g.OD; if (carry) p.d -= g.OD;
  p.n += s.n + carry;
}

// GC_FOR_EACH_DTYPE(MACRO): MACRO(suffix, storage type) for every dtype, and
// GC_FOR_EACH_INDEX(MACRO, SUF, T): MACRO(SUF, T, index suffix, index type) for the 32- and
// 64-bit index variants; both generated by gpuconv._cuda.sources.config_header() from
// gpuconv._geometry.DTYPES and gpuconv._cuda.sources.INDEX_TYPES

#endif  // GPUCONV_COMMON_CUH
