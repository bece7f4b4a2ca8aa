// Input gradient (data gradient), direct gather form, 1-3 spatial dims as 3-D.
//   gx[n,c,id,ih,iw] = sum_{k in group(c), taps: (i + p - r*d) % s == 0}
//                      gy[n,k,(i+p-r*d)/s ...] * w[k,c',kd,kh,kw]
// One thread per input element.  Only taps that can contribute are visited:
// r*d = i + p (mod s) is solved per dim on the host side's numbers,
// r = r0 (mod step) with step = s / gcd(s, d), r0 = ((q mod s)/gcd * inv) mod step
// (inv = (d/gcd)^-1 mod step), and the range is clipped so the output index
// lies in [0, O).  Deterministic: a fixed summation order, no atomics.

struct gc_phase { int step, inv, gcd; };

// first contributing tap, last tap + 1 and step for input position i in one dim
__device__ __forceinline__ void gc_dgrad_taps(int i, int s, int p, int d, int O, int R,
                                              gc_phase ph, int& r_begin, int& r_end) {
  const int q = i + p;
  const int res = q % s;
  if (res % ph.gcd != 0) { r_begin = 0; r_end = 0; return; }
  const int r0 = ((res / ph.gcd) * ph.inv) % ph.step;
  // o = (q - r*d)/s must satisfy 0 <= o <= O-1:  r <= q/d  and  r >= (q - (O-1)*s)/d
  const int rmin = gc_max(0, gc_ceildiv(q - (O - 1) * s, d));
  const int rmax = gc_min(R - 1, gc_floordiv(q, d));
  int r = r0;
  if (r < rmin) r += gc_ceildiv(rmin - r, ph.step) * ph.step;
  r_begin = r;
  r_end = rmax + 1 > r ? rmax + 1 : r;
}

template <typename T, typename I>
__device__ __forceinline__ void gc_conv_dgrad(const T* __restrict__ gy, const T* __restrict__ w,
                                              T* __restrict__ gx, const gc_geo g, gc_phase pd_,
                                              gc_phase ph_, gc_phase pw_) {
  typedef typename gc_acc<T>::type A;
  const I total = (I)g.N * g.C * g.D * g.H * g.W;
  const int taps = g.KD * g.KH * g.KW;
  for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (I)gridDim.x * blockDim.x) {
    const gc_ncdhw<I> p = gc_unravel(idx, g.C, g.D, g.H, g.W);
    const int iw = p.w, ih = p.h, id = p.d, c = p.c;
    const I n = p.n;
    const int grp = c / g.Cg, cc = c % g.Cg;
    int d0, d1, h0, h1, w0, w1;
    gc_dgrad_taps(id, g.sd, g.pd, g.dd, g.OD, g.KD, pd_, d0, d1);
    gc_dgrad_taps(ih, g.sh, g.ph, g.dh, g.OH, g.KH, ph_, h0, h1);
    gc_dgrad_taps(iw, g.sw, g.pw, g.dw, g.OW, g.KW, pw_, w0, w1);
    A acc = A(0);
    for (int kk = 0; kk < g.Kg; ++kk) {
      const int k = grp * g.Kg + kk;
      const T* gyk = gy + (n * g.K + k) * (I)g.OD * g.OH * g.OW;
      const T* wk = w + ((I)k * g.Cg + cc) * taps;
      for (int kd = d0; kd < d1; kd += pd_.step) {
        const int od = (id + g.pd - kd * g.dd) / g.sd;
        for (int kh = h0; kh < h1; kh += ph_.step) {
          const int oh = (ih + g.ph - kh * g.dh) / g.sh;
          const T* gyrow = gyk + ((I)od * g.OH + oh) * g.OW;
          const T* wrow = wk + (kd * g.KH + kh) * g.KW;
          for (int kw = w0; kw < w1; kw += pw_.step) {
            const int ow = (iw + g.pw - kw * g.dw) / g.sw;
            acc += (A)gc_load(gyrow + ow) * (A)gc_load(wrow + kw);
          }
        }
      }
    }
    gc_store(gx + idx, acc);
  }
}

#define GC_PHASE_PARAMS \
  int stepd, int invd, int gcdd, int steph, int invh, int gcdh, int stepw, int invw, int gcdw
#define GC_DGRAD_ENTRY_I(SUF, T, ISUF, I)                                                     \
  extern "C" __global__ void gpuconv_dgrad_##SUF##_##ISUF(             \
      const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx, GC_GEO_PARAMS,   \
      GC_PHASE_PARAMS) {                                                                      \
    gc_phase a = {stepd, invd, gcdd}, b = {steph, invh, gcdh}, c = {stepw, invw, gcdw};       \
    gc_conv_dgrad<T, I>(gy, w, gx, GC_GEO_MAKE, a, b, c);                                     \
  }
#define GC_DGRAD_ENTRY(SUF, T) GC_FOR_EACH_INDEX(GC_DGRAD_ENTRY_I, SUF, T)

GC_FOR_EACH_DTYPE(GC_DGRAD_ENTRY)
