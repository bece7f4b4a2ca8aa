// Forward convolution (cross-correlation), direct form, 1-3 spatial dims as 3-D.
//   y[n,k,od,oh,ow] = bias[k] + sum_{c in group(k), taps} x[n,c,id,ih,iw] * w[k,c',kd,kh,kw]
//   id = od*sd - pd + kd*dd  (likewise h, w); positions outside the input read zero.
// One thread per output element (grid-stride loop, ow fastest so loads coalesce).
// I is the index type: int when every tensor has < 2^31 elements.

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ bias, T* __restrict__ y,
                                            const gc_geo g, int has_bias) {
  typedef typename gc_acc<T>::type A;
  const I total = (I)g.N * g.K * g.OD * g.OH * g.OW;
  const int taps = g.KD * g.KH * g.KW;
  for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (I)gridDim.x * blockDim.x) {
    const gc_ncdhw<I> p = gc_unravel(idx, g.K, g.OD, g.OH, g.OW);
    const int ow = p.w, oh = p.h, od = p.d, k = p.c;
    const I n = p.n;
    const int grp = k / g.Kg;
    const int id0 = od * g.sd - g.pd, ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    A acc = A(0);
    const T* wk = w + (I)k * g.Cg * taps;
    const T* xn = x + (n * g.C + (I)grp * g.Cg) * g.D * g.H * g.W;
    // Padding reads as zero and its products are still added (0 * w), so NaN/Inf in
    // the weight propagate exactly as in an explicit im2col (and the numpy backend).
    for (int c = 0; c < g.Cg; ++c) {
      const T* xc = xn + (I)c * g.D * g.H * g.W;
      const T* wc = wk + c * taps;
      for (int kd = 0; kd < g.KD; ++kd) {
        const int id = id0 + kd * g.dd;
        const bool okd = id >= 0 && id < g.D;
        for (int kh = 0; kh < g.KH; ++kh) {
          const int ih = ih0 + kh * g.dh;
          const bool okh = okd && ih >= 0 && ih < g.H;
          const T* xrow = xc + ((I)id * g.H + ih) * g.W + iw0;
          const T* wrow = wc + (kd * g.KH + kh) * g.KW;
          for (int kw = 0; kw < g.KW; ++kw) {
            const int iw = iw0 + kw * g.dw;
            const A xv = (okh && iw >= 0 && iw < g.W) ? (A)gc_load(xrow + kw * g.dw) : A(0);
            acc += xv * (A)gc_load(wrow + kw);
          }
        }
      }
    }
    if (has_bias) acc += (A)gc_load(bias + k);
    gc_store(y + idx, acc);
  }
}

#define GC_FWD_PARAMS(T)                                                                      \
  const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,               \
      T* __restrict__ y, GC_GEO_PARAMS, int has_bias
#define GC_FWD_ENTRY_I(SUF, T, ISUF, I)                                                       \
  extern "C" __global__ void gpuconv_fwd_##SUF##_##ISUF(GC_FWD_PARAMS(T)) {                   \
    gc_conv_fwd<T, I>(x, w, bias, y, GC_GEO_MAKE, has_bias);                                  \
  }
#define GC_FWD_ENTRY(SUF, T) GC_FOR_EACH_INDEX(GC_FWD_ENTRY_I, SUF, T)

GC_FOR_EACH_DTYPE(GC_FWD_ENTRY)

// ---------------------------------------------------------------------------------------
// Tiled implicit GEMM (per group): C[m, n] = sum_r A[m, r] * B[r, n] with
//   m = output channel in the group (M = K/G), n = (image, od, oh, ow) (N = N*OD*OH*OW),
//   r = (c, kd, kh, kw) (R = C/G * taps), A = weight rows, B = input gathered on the fly
// (im2col is never materialised).  A 64x64 tile of C per block of 256 threads, 4x4
// per thread (strided by 16 so stores and shared loads coalesce), R in steps of 16
// through shared memory.  Grid: x = n tiles, y = group * m tiles.  The tap offsets
// live in a shared table and each thread steps its rows' (c, tap) digits by 16, so
// the gather does no integer division in the main loop.

// Global loads of one K-step of the tiled forward into registers: 4 weights (A) and 4
// gathered inputs (B, zero in the padding); steps this thread's B-row digits.
template <typename T, typename I, typename A>
__device__ __forceinline__ void gc_fwd_tile_loads(
    const T* __restrict__ x, const T* __restrict__ wrow, const int* tab, A (&ra)[4], A (&rb)[4],
    int (&bc)[4], int (&bt)[4], int r0, int R, int taps, int step_c, int step_t, int ak0,
    int kb0, bool mvalid, bool nvalid, int id0, int ih0, int iw0, I xoff, I dhw,
    const gc_geo& g) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = r0 + ak0 + j;
    ra[j] = (mvalid && r < R) ? (A)gc_load(wrow + r) : A(0);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    A v = A(0);
    if (nvalid && r0 + kb0 + 4 * i < R) {
      const int* e = tab + 4 * bt[i];
      const int id = id0 + e[0], ih = ih0 + e[1], iw = iw0 + e[2];
      if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
        v = (A)gc_load(x + (xoff + (I)bc[i] * dhw + e[3]));
    }
    rb[i] = v;
    bt[i] += step_t;
    bc[i] += step_c;
    if (bt[i] >= taps) { bt[i] -= taps; ++bc[i]; }
  }
}

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_fwd_tiled(const T* __restrict__ x,
                                                  const T* __restrict__ w,
                                                  const T* __restrict__ bias,
                                                  T* __restrict__ y, const gc_geo g,
                                                  int has_bias) {
  typedef typename gc_acc<T>::type A;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  A* As = reinterpret_cast<A*>(gc_smem);  // [GC_TILE_K][GC_TILE_MS]
  A* Bs = As + GC_TILE_K * GC_TILE_MS;              // [GC_TILE_K][GC_TILE_N]
  int* tab = reinterpret_cast<int*>(Bs + GC_TILE_K * GC_TILE_N);  // [taps][4]: kd*dd, kh*dh, kw*dw, offset
  const int taps = g.KD * g.KH * g.KW;
  const int R = g.Cg * taps;
  const I osp = (I)g.OD * g.OH * g.OW;
  const I npq = (I)g.N * osp;
  const I dhw = (I)g.D * g.H * g.W;
  const int mtiles = (g.Kg + GC_TILE_M - 1) / GC_TILE_M;
  const int grp = blockIdx.y / mtiles;
  const int m0 = (blockIdx.y % mtiles) * GC_TILE_M;
  const I n0 = (I)blockIdx.x * GC_TILE_N;
  const int tid = threadIdx.x;
  const int tm = tid >> 4, tn = tid & 15;

  for (int t = tid; t < taps; t += blockDim.x) {
    const int kw = t % g.KW, kh = (t / g.KW) % g.KH, kd = t / (g.KW * g.KH);
    tab[4 * t + 0] = kd * g.dd;
    tab[4 * t + 1] = kh * g.dh;
    tab[4 * t + 2] = kw * g.dw;
    tab[4 * t + 3] = (kd * g.dd * g.H + kh * g.dh) * g.W + kw * g.dw;
  }

  // this thread's B column: decode once
  const int nb = tid % GC_TILE_N, kb0 = tid / GC_TILE_N;
  const I ncol = n0 + nb;
  const bool nvalid = ncol < npq;
  int id0 = 0, ih0 = 0, iw0 = 0;
  I xoff = 0;  // element offset of the window's corner (may lie in the padding)
  if (nvalid) {
    const gc_opos p = gc_opos_of(ncol, g);
    id0 = p.d * g.sd - g.pd; ih0 = p.h * g.sh - g.ph; iw0 = p.w * g.sw - g.pw;
    xoff = ((I)p.n * g.C + (I)grp * g.Cg) * dhw + ((I)id0 * g.H + ih0) * g.W + iw0;
  }
  // this thread's B rows r = r0 + kb0 + 4i as (channel, tap) digits, stepped by GC_TILE_K
  int bc[4], bt[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) { bc[i] = (kb0 + 4 * i) / taps; bt[i] = (kb0 + 4 * i) % taps; }
  const int step_c = GC_TILE_K / taps, step_t = GC_TILE_K % taps;
  // this thread's A row and 4 consecutive r
  const int am = tid >> 2, ak0 = (tid & 3) * 4;
  const int mrow = m0 + am;
  const bool mvalid = mrow < g.Kg;
  const T* wrow = w + ((I)grp * g.Kg + (mvalid ? mrow : 0)) * R;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  __syncthreads();  // tap table ready

  // Register prefetch: the global loads of tile r0 + GC_TILE_K are issued before the
  // multiply of tile r0, so their latency hides behind it.
  A ra[4], rb[4];
  gc_fwd_tile_loads(x, wrow, tab, ra, rb, bc, bt, 0, R, taps, step_c, step_t, ak0, kb0, mvalid,
                    nvalid, id0, ih0, iw0, xoff, dhw, g);
  for (int r0 = 0; r0 < R; r0 += GC_TILE_K) {
#pragma unroll
    for (int j = 0; j < 4; ++j) As[(ak0 + j) * GC_TILE_MS + am] = ra[j];
#pragma unroll
    for (int i = 0; i < 4; ++i) Bs[(kb0 + 4 * i) * GC_TILE_N + nb] = rb[i];
    __syncthreads();
    if (r0 + GC_TILE_K < R)
      gc_fwd_tile_loads(x, wrow, tab, ra, rb, bc, bt, r0 + GC_TILE_K, R, taps, step_c, step_t,
                        ak0, kb0, mvalid, nvalid, id0, ih0, iw0, xoff, dhw, g);
    gc_tile_mma(As, Bs, acc, tm, tn);
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const I n = n0 + tn + 16 * j;
    if (n >= npq) continue;
    const I img = n / osp;
    const I o = n - img * osp;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + tm + 16 * i;
      if (m >= g.Kg) continue;
      const int k = grp * g.Kg + m;
      A v = acc[i][j];
      if (has_bias) v += (A)gc_load(bias + k);
      gc_store(y + (img * g.K + k) * osp + o, v);
    }
  }
}

#define GC_FWD_TILED_ENTRY_I(SUF, T, ISUF, I)                                                 \
  extern "C" __global__ void gpuconv_fwdtile_##SUF##_##ISUF(GC_FWD_PARAMS(T)) {               \
    gc_conv_fwd_tiled<T, I>(x, w, bias, y, GC_GEO_MAKE, has_bias);                            \
  }
#define GC_FWD_TILED_ENTRY(SUF, T) GC_FOR_EACH_INDEX(GC_FWD_TILED_ENTRY_I, SUF, T)

GC_FOR_EACH_DTYPE(GC_FWD_TILED_ENTRY)
