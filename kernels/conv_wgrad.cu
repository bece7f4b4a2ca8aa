// Weight gradient, deterministic split reduction, 1-3 spatial dims as 3-D.
//   gw[k,c',kd,kh,kw] = sum_{n,od,oh,ow} x[n,c,id,ih,iw] * gy[n,k,od,oh,ow]
// Pass 1 (gpuconv_wgrad_<t>_<i>): block (e, s) reduces weight element e over the
// s-th slice of the N*OD*OH*OW positions: every thread sums a fixed strided
// subset in order, then a fixed shuffle tree and an in-order sum of the warp
// totals.  The result goes to partial[s][e] in the accumulate type.
// Pass 2 (gpuconv_wgrad_reduce_<t>): gw[e] = sum over s of partial[s][e], in order.
// No atomics anywhere: repeated calls are bit-identical.


template <typename A>
__device__ __forceinline__ A gc_warp_sum(A v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_wgrad(const T* __restrict__ x, const T* __restrict__ gy,
                                              typename gc_acc<T>::type* __restrict__ partial,
                                              const gc_geo g, I chunk) {
  typedef typename gc_acc<T>::type A;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  A* warp_sums = reinterpret_cast<A*>(gc_smem);
  const int taps = g.KD * g.KH * g.KW;
  const I welems = (I)g.K * g.Cg * taps;
  const I red = (I)g.N * g.OD * g.OH * g.OW;
  const I j_begin = (I)blockIdx.y * chunk;
  const I j_end = j_begin + chunk < red ? j_begin + chunk : red;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  for (I e = blockIdx.x; e < welems; e += gridDim.x) {
    I t = e;
    const int kw = (int)(t % g.KW); t /= g.KW;
    const int kh = (int)(t % g.KH); t /= g.KH;
    const int kd = (int)(t % g.KD); t /= g.KD;
    const int cc = (int)(t % g.Cg);
    const int k = (int)(t / g.Cg);
    const int c = (k / g.Kg) * g.Cg + cc;
    A acc = A(0);
    const gc_opos step = gc_opos_of(blockDim.x, g);
    gc_opos p = gc_opos_of(j_begin + threadIdx.x, g);
    for (I j = j_begin + threadIdx.x; j < j_end; j += blockDim.x, gc_opos_add(p, step, g)) {
      const int od = p.d, oh = p.h, ow = p.w;
      const I n = p.n;
      const int id = od * g.sd - g.pd + kd * g.dd;
      const int ih = oh * g.sh - g.ph + kh * g.dh;
      const int iw = ow * g.sw - g.pw + kw * g.dw;
      // padding reads as zero and the product is still added (NaN/Inf in grad_out
      // propagate as with an explicit im2col)
      const bool inside = id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
      const A xv = inside ? (A)gc_load(x + (((n * g.C + c) * g.D + id) * g.H + ih) * (I)g.W + iw)
                          : A(0);
      const A gv = (A)gc_load(gy + (((n * g.K + k) * g.OD + od) * g.OH + oh) * (I)g.OW + ow);
      acc += xv * gv;
    }
    acc = gc_warp_sum(acc);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      A s = A(0);
      for (int i = 0; i < nwarps; ++i) s += warp_sums[i];
      partial[(I)blockIdx.y * welems + e] = s;
    }
    __syncthreads();  // warp_sums is reused by the next weight element
  }
}

template <typename T>
__device__ __forceinline__ void gc_wgrad_reduce(const typename gc_acc<T>::type* __restrict__ partial,
                                                T* __restrict__ gw, long long welems, int splits) {
  typedef typename gc_acc<T>::type A;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < welems;
       e += (long long)gridDim.x * blockDim.x) {
    A s = A(0);
    for (int i = 0; i < splits; ++i) s += partial[(long long)i * welems + e];
    gc_store(gw + e, s);
  }
}

#define GC_WGRAD_ENTRY_I(SUF, T, ISUF, I)                                                     \
  extern "C" __global__ void gpuconv_wgrad_##SUF##_##ISUF( \
      const T* __restrict__ x, const T* __restrict__ gy,                                      \
      gc_acc<T>::type* __restrict__ partial, GC_GEO_PARAMS, I chunk) {                        \
    gc_conv_wgrad<T, I>(x, gy, partial, GC_GEO_MAKE, chunk);                                  \
  }
#define GC_WGRAD_ENTRY(SUF, T)                                                                \
  GC_FOR_EACH_INDEX(GC_WGRAD_ENTRY_I, SUF, T)                                                 \
  extern "C" __global__ void gpuconv_wgrad_reduce_##SUF(               \
      const gc_acc<T>::type* __restrict__ partial, T* __restrict__ gw, long long welems,      \
      int splits) {                                                                           \
    gc_wgrad_reduce<T>(partial, gw, welems, splits);                                          \
  }

GC_FOR_EACH_DTYPE(GC_WGRAD_ENTRY)

// ---------------------------------------------------------------------------------------
// Tiled implicit GEMM form of pass 1 (per group): partial[s][k][n] =
//   sum_{r in slice s} A[m, r] * B[r, n], m = output channel in the group,
//   n = (c, kd, kh, kw) (Cg*taps), r = (image, od, oh, ow) (N*OD*OH*OW),
//   A = grad_out, B = input gathered on the fly.  64x64 tile per block of 256
//   threads, 4x4 per thread, r in steps of 16 through shared memory; the slice
//   of r is blockIdx.z * chunk .. + chunk.  Same fixed order on every run.

// Global loads of one K-step of the tiled weight gradient into registers: 4 grad_out
// values (A) and 4 gathered inputs (B); steps this thread's position digits.
template <typename T, typename I, typename A>
__device__ __forceinline__ void gc_wgrad_tile_loads(
    const T* __restrict__ x, const T* __restrict__ gy, A (&ra)[4], A (&rb)[4], gc_opos& pa,
    gc_opos (&pb)[4], const gc_opos& step, I r0, I r_end, int ar, int am0, int kb0, int m0,
    int grp, bool nvalid, int dkd, int dkh, int dkw, I xc, I dhw, I osp, const gc_geo& g) {
  const bool rvalid = r0 + ar < r_end;
  const I o = ((I)pa.d * g.OH + pa.h) * g.OW + pa.w;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + am0 + 16 * i;
    A v = A(0);
    if (rvalid && m < g.Kg) v = (A)gc_load(gy + ((I)pa.n * g.K + (I)grp * g.Kg + m) * osp + o);
    ra[i] = v;
  }
  gc_opos_add(pa, step, g);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    A v = A(0);
    if (nvalid && r0 + kb0 + 4 * i < r_end) {
      const int id = pb[i].d * g.sd + dkd;
      const int ih = pb[i].h * g.sh + dkh;
      const int iw = pb[i].w * g.sw + dkw;
      if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
        v = (A)gc_load(x + ((I)pb[i].n * g.C * dhw + xc + ((I)id * g.H + ih) * g.W + iw));
    }
    rb[i] = v;
    gc_opos_add(pb[i], step, g);
  }
}

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_wgrad_tiled(const T* __restrict__ x,
                                                    const T* __restrict__ gy,
                                                    typename gc_acc<T>::type* __restrict__ partial,
                                                    const gc_geo g, I chunk) {
  typedef typename gc_acc<T>::type A;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  A* As = reinterpret_cast<A*>(gc_smem);  // [GC_TILE_K][GC_TILE_MS]
  A* Bs = As + GC_TILE_K * GC_TILE_MS;          // [GC_TILE_K][GC_TILE_N]
  const int taps = g.KD * g.KH * g.KW;
  const int Rn = g.Cg * taps;
  const I osp = (I)g.OD * g.OH * g.OW;
  const I red = (I)g.N * osp;
  const I dhw = (I)g.D * g.H * g.W;
  const int mtiles = (g.Kg + GC_TILE_M - 1) / GC_TILE_M;
  const int grp = blockIdx.y / mtiles;
  const int m0 = (blockIdx.y % mtiles) * GC_TILE_M;
  const int n0 = blockIdx.x * GC_TILE_N;
  const I r_begin = (I)blockIdx.z * chunk;
  const I r_end = r_begin + chunk < red ? r_begin + chunk : red;
  const int tid = threadIdx.x;
  const int tm = tid >> 4, tn = tid & 15;

  // B column of this thread: (c, kd, kh, kw), decoded once
  const int nb = tid % GC_TILE_N, kb0 = tid / GC_TILE_N;
  const int ncol = n0 + nb;
  const bool nvalid = ncol < Rn;
  int c = 0, kd = 0, kh = 0, kw = 0;
  if (nvalid) {
    c = ncol / taps;
    int t = ncol - c * taps;
    kw = t % g.KW; t /= g.KW;
    kh = t % g.KH;
    kd = t / g.KH;
  }
  const I xc = ((I)grp * g.Cg + c) * dhw;  // element offset of this column's channel
  const int dkd = kd * g.dd - g.pd, dkh = kh * g.dh - g.ph, dkw = kw * g.dw - g.pw;
  // A loads of this thread: r offset ar, rows am0 + 16*i
  const int ar = tid & 15, am0 = tid >> 4;
  // positions this thread reads, as (n, od, oh, ow) digits stepped by GC_TILE_K
  const gc_opos step = gc_opos_of(GC_TILE_K, g);
  gc_opos pa = gc_opos_of(r_begin + ar, g);
  gc_opos pb[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pb[i] = gc_opos_of(r_begin + kb0 + 4 * i, g);

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  // Register prefetch, as in the tiled forward: the loads of the next K-step are in
  // flight while this one is multiplied.
  A ra[4], rbv[4];
  gc_wgrad_tile_loads(x, gy, ra, rbv, pa, pb, step, r_begin, r_end, ar, am0, kb0, m0, grp, nvalid,
                      dkd, dkh, dkw, xc, dhw, osp, g);
  for (I rb = r_begin; rb < r_end; rb += GC_TILE_K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) As[ar * GC_TILE_MS + am0 + 16 * i] = ra[i];
#pragma unroll
    for (int i = 0; i < 4; ++i) Bs[(kb0 + 4 * i) * GC_TILE_N + nb] = rbv[i];
    __syncthreads();
    if (rb + GC_TILE_K < r_end)
      gc_wgrad_tile_loads(x, gy, ra, rbv, pa, pb, step, rb + GC_TILE_K, r_end, ar, am0, kb0, m0,
                          grp, nvalid, dkd, dkh, dkw, xc, dhw, osp, g);
    gc_tile_mma(As, Bs, acc, tm, tn);
    __syncthreads();
  }
  A* out = partial + (I)blockIdx.z * g.K * Rn;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + tm + 16 * i;
    if (m >= g.Kg) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tn + 16 * j;
      if (n < Rn) out[((I)grp * g.Kg + m) * Rn + n] = acc[i][j];
    }
  }
}

#define GC_WGRAD_TILED_ENTRY(SUF, T)                                                          \
  extern "C" __global__ void gpuconv_wgradtile_##SUF##_i32(                                   \
      const T* __restrict__ x, const T* __restrict__ gy,                                      \
      gc_acc<T>::type* __restrict__ partial, GC_GEO_PARAMS, int chunk) {                      \
    gc_conv_wgrad_tiled<T, int>(x, gy, partial, GC_GEO_MAKE, chunk);                          \
  }                                                                                           \
  extern "C" __global__ void gpuconv_wgradtile_##SUF##_i64(                                   \
      const T* __restrict__ x, const T* __restrict__ gy,                                      \
      gc_acc<T>::type* __restrict__ partial, GC_GEO_PARAMS, long long chunk) {                \
    gc_conv_wgrad_tiled<T, long long>(x, gy, partial, GC_GEO_MAKE, chunk);                    \
  }

GC_FOR_EACH_DTYPE(GC_WGRAD_TILED_ENTRY)
