// Forward convolution (cross-correlation), direct form, 1-3 spatial dims as 3-D.
//   y[n,k,od,oh,ow] = bias[k] + sum_{c in group(k), taps} x[n,c,id,ih,iw] * w[k,c',kd,kh,kw]
//   id = od*sd - pd + kd*dd  (likewise h, w); positions outside the input read zero.
// One thread per output element (grid-stride loop, ow fastest so loads coalesce);
// the valid tap range is computed per output, so padding costs no branches in the
// inner loop.  I is the index type: int when every tensor has < 2^31 elements.

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ bias, T* __restrict__ y,
                                            const gc_geo g, int has_bias) {
  typedef typename gc_acc<T>::type A;
  const I total = (I)g.N * g.K * g.OD * g.OH * g.OW;
  const int taps = g.KD * g.KH * g.KW;
  for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (I)gridDim.x * blockDim.x) {
    I t = idx;
    const int ow = (int)(t % g.OW); t /= g.OW;
    const int oh = (int)(t % g.OH); t /= g.OH;
    const int od = (int)(t % g.OD); t /= g.OD;
    const int k = (int)(t % g.K);
    const I n = t / g.K;
    const int grp = k / g.Kg;
    int d0, d1, h0, h1, w0, w1;
    gc_tap_range(od, g.sd, g.pd, g.dd, g.D, g.KD, d0, d1);
    gc_tap_range(oh, g.sh, g.ph, g.dh, g.H, g.KH, h0, h1);
    gc_tap_range(ow, g.sw, g.pw, g.dw, g.W, g.KW, w0, w1);
    const int id0 = od * g.sd - g.pd, ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    A acc = A(0);
    const T* wk = w + (I)k * g.Cg * taps;
    const T* xn = x + (n * g.C + (I)grp * g.Cg) * g.D * g.H * g.W;
    for (int c = 0; c < g.Cg; ++c) {
      const T* xc = xn + (I)c * g.D * g.H * g.W;
      const T* wc = wk + c * taps;
      for (int kd = d0; kd < d1; ++kd) {
        const int id = id0 + kd * g.dd;
        for (int kh = h0; kh < h1; ++kh) {
          const int ih = ih0 + kh * g.dh;
          const T* xrow = xc + ((I)id * g.H + ih) * g.W + iw0;
          const T* wrow = wc + (kd * g.KH + kh) * g.KW;
          for (int kw = w0; kw < w1; ++kw) {
            acc += (A)gc_load(xrow + kw * g.dw) * (A)gc_load(wrow + kw);
          }
        }
      }
    }
    if (has_bias) acc += (A)gc_load(bias + k);
    gc_store(y + idx, acc);
  }
}

#define GC_FWD_ENTRY(SUF, T)                                                                  \
  extern "C" __global__ void gpuconv_fwd_##SUF##_i32(                  \
      const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,           \
      T* __restrict__ y, GC_GEO_PARAMS, int has_bias) {                                       \
    gc_conv_fwd<T, int>(x, w, bias, y, GC_GEO_MAKE, has_bias);                                \
  }                                                                                           \
  extern "C" __global__ void gpuconv_fwd_##SUF##_i64(                  \
      const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,           \
      T* __restrict__ y, GC_GEO_PARAMS, int has_bias) {                                       \
    gc_conv_fwd<T, long long>(x, w, bias, y, GC_GEO_MAKE, has_bias);                          \
  }

GC_FOR_EACH_DTYPE(GC_FWD_ENTRY)
