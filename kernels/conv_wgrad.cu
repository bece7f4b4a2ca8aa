// Weight gradient, deterministic split reduction, 1-3 spatial dims as 3-D.
//   gw[k,c',kd,kh,kw] = sum_{n,od,oh,ow} x[n,c,id,ih,iw] * gy[n,k,od,oh,ow]
// Pass 1 (gpuconv_wgrad_<t>_<i>): block (e, s) reduces weight element e over the
// s-th slice of the N*OD*OH*OW positions: every thread sums a fixed strided
// subset in order, then a fixed shuffle tree and an in-order sum of the warp
// totals.  The result goes to partial[s][e] in the accumulate type.
// Pass 2 (gpuconv_wgrad_reduce_<t>): gw[e] = sum over s of partial[s][e], in order.
// No atomics anywhere: repeated calls are bit-identical.

#define GC_WGRAD_THREADS 256

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
    for (I j = j_begin + threadIdx.x; j < j_end; j += blockDim.x) {
      I u = j;
      const int ow = (int)(u % g.OW); u /= g.OW;
      const int oh = (int)(u % g.OH); u /= g.OH;
      const int od = (int)(u % g.OD);
      const I n = u / g.OD;
      const int id = od * g.sd - g.pd + kd * g.dd;
      const int ih = oh * g.sh - g.ph + kh * g.dh;
      const int iw = ow * g.sw - g.pw + kw * g.dw;
      if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
        const A xv = (A)gc_load(x + (((n * g.C + c) * g.D + id) * g.H + ih) * (I)g.W + iw);
        const A gv = (A)gc_load(gy + (((n * g.K + k) * g.OD + od) * g.OH + oh) * (I)g.OW + ow);
        acc += xv * gv;
      }
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
  GC_WGRAD_ENTRY_I(SUF, T, i32, int)                                                          \
  GC_WGRAD_ENTRY_I(SUF, T, i64, long long)                                                    \
  extern "C" __global__ void gpuconv_wgrad_reduce_##SUF(               \
      const gc_acc<T>::type* __restrict__ partial, T* __restrict__ gw, long long welems,      \
      int splits) {                                                                           \
    gc_wgrad_reduce<T>(partial, gw, welems, splits);                                          \
  }

GC_FOR_EACH_DTYPE(GC_WGRAD_ENTRY)
