// gpuconv CPU depthwise kernels: direct, register-blocked, compiled on first use by the
// system C++ compiler (gpuconv/_cpu/native.py), called through ctypes with the GIL
// released.  One 1-3-D geometry (1-D and 2-D run with leading sizes of 1) and three
// passes, for float and double:
//
//   forward      y[n, g*Ko+ko]  = bias + sum_(ks, taps) w[g*Ko+ko, ks, tap] * x[n, g*Ks+ks, o*s + tap*d - lo]
//   input grad   gx[n, g*Ks+ks] = the transpose of that map applied to gy (every stride)
//   weight grad  gw[g*Ko+ko, ks, tap] = sum_(n, o) gy[n, g*Ko+ko, o] * x[n, g*Ks+ks, o*s + tap*d - lo]
//
// Depthwise is Ks = 1, Ko = the channel multiplier.  Every output element is computed by
// one thread in one fixed order (taps in order; bias last), so results do not depend on
// the thread count or the chunking.  No element of an input is written; outputs are
// written in full (every element of the plane range).
//
// Layout: x (N, G*Ks, D, H, W), y (N, G*Ko, OD, OH, OW), w (G*Ko, Ks, KD, KH, KW), all
// C-contiguous.  The source planes of one plane of work are copied once into scratch
// with their rows zero-padded along W and split into the W stride's phases, so that
// every tap of a row reads one contiguous run (no bounds checks, no strided loads in
// the inner loop); rows outside the source along D and H are skipped, not padded.
// The inner loop keeps NV vectors of accumulators in registers across all taps of an
// output row segment: one unaligned load and one FMA per tap and vector.
//
// Non-finite values behave as in the float64 reference (gpuconv.reference): padding is a
// zero multiplied like any other input in the forward and the weight grad (0 * inf =
// NaN), and the input grad forms only the products of real (tap, output) pairs.
//
// Parameters: one int64 array p (P_* below).
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

typedef long long i64;

enum {
  P_N = 0, P_G, P_KS, P_KO,
  P_XD, P_XH, P_XW,        // x spatial sizes
  P_YD, P_YH, P_YW,        // y spatial sizes
  P_KD, P_KH, P_KW,        // kernel
  P_SD, P_SH, P_SW,        // stride
  P_DD, P_DH, P_DW,        // dilation
  P_LD, P_LH, P_LW,        // padding before (source index = o*s + k*d - lo)
  P_BEGIN, P_END,          // work range: planes n*G + g (forward, input grad) or groups g
  P_COUNT
};

template <class T> struct Vec;
template <> struct Vec<float> { typedef float v __attribute__((vector_size(32))); enum { L = 8 }; };
template <> struct Vec<double> { typedef double v __attribute__((vector_size(32))); enum { L = 4 }; };

template <class T> static inline typename Vec<T>::v loadu(const T* p) {
  typename Vec<T>::v r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

static inline i64 rup(i64 a, i64 b) { return (a + b - 1) / b * b; }
static inline i64 fdiv(i64 a, i64 b) { i64 q = a / b; return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q; }

// Vectors per register block (1-8): the fewest lanes computed for a row of n outputs,
// ties to the larger block.
template <class T> static int pick_nv(i64 n) {
  const int L = Vec<T>::L;
  int best = 8;
  i64 best_lanes = rup(n, 8 * L);
  for (int nv = 7; nv >= 1; --nv) {
    const i64 lanes = rup(n, (i64)nv * L);
    if (lanes < best_lanes) { best = nv; best_lanes = lanes; }
  }
  return best;
}

// acc[j] = sum_t wt[t] * base[off[t] + o + j] for j in [0, NV*L);
// out[j*ostride] = acc[j] + bias for j < count.
template <class T, int NV>
static inline void block(const T* base, const i64* off, const T* wt, i64 nt, i64 o, T bias,
                         T* out, i64 count, i64 ostride) {
  typedef typename Vec<T>::v V;
  const int L = Vec<T>::L;
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  const T* b = base + o;
  for (i64 t = 0; t < nt; ++t) {
    const T* q = b + off[t];
    const T wv = wt[t];
    for (int v = 0; v < NV; ++v) acc[v] += wv * loadu(q + v * L);
  }
  if (count == NV * L && ostride == 1) {
    for (int v = 0; v < NV; ++v) {
      V r = acc[v] + bias;
      std::memcpy(out + v * L, &r, sizeof r);
    }
  } else {
    T tmp[NV * L];
    std::memcpy(tmp, acc, sizeof tmp);
    for (i64 j = 0; j < count; ++j) out[j * ostride] = tmp[j] + bias;
  }
}

template <class T, int NV>
static void row(const T* base, const i64* off, const T* wt, i64 nt, T bias, T* out, i64 n,
                i64 ostride) {
  const i64 B = (i64)NV * Vec<T>::L;
  for (i64 o = 0; o < n; o += B) {
    const i64 c = n - o < B ? n - o : B;
    block<T, NV>(base, off, wt, nt, o, bias, out + o * ostride, c, ostride);
  }
}

// one output row of n elements (at out, out + ostride, ...): the taps (base + off[t], wt[t])
template <class T>
static void row_any(int nv, const T* base, const i64* off, const T* wt, i64 nt, T bias, T* out,
                    i64 n, i64 ostride) {
  switch (nv) {
    case 1: row<T, 1>(base, off, wt, nt, bias, out, n, ostride); break;
    case 2: row<T, 2>(base, off, wt, nt, bias, out, n, ostride); break;
    case 3: row<T, 3>(base, off, wt, nt, bias, out, n, ostride); break;
    case 4: row<T, 4>(base, off, wt, nt, bias, out, n, ostride); break;
    case 5: row<T, 5>(base, off, wt, nt, bias, out, n, ostride); break;
    case 6: row<T, 6>(base, off, wt, nt, bias, out, n, ostride); break;
    case 7: row<T, 7>(base, off, wt, nt, bias, out, n, ostride); break;
    default: row<T, 8>(base, off, wt, nt, bias, out, n, ostride); break;
  }
}

// ------------------------------------------------------------------ forward geometry
struct Geom {
  i64 N, G, Ks, Ko, D, H, W, OD, OH, OW, KD, KH, KW, sD, sH, sW, dD, dH, dW, lD, lH, lW;
  explicit Geom(const i64* p) {
    N = p[P_N]; G = p[P_G]; Ks = p[P_KS]; Ko = p[P_KO];
    D = p[P_XD]; H = p[P_XH]; W = p[P_XW]; OD = p[P_YD]; OH = p[P_YH]; OW = p[P_YW];
    KD = p[P_KD]; KH = p[P_KH]; KW = p[P_KW]; sD = p[P_SD]; sH = p[P_SH]; sW = p[P_SW];
    dD = p[P_DD]; dH = p[P_DH]; dW = p[P_DW]; lD = p[P_LD]; lH = p[P_LH]; lW = p[P_LW];
  }
  i64 taps() const { return KD * KH * KW; }
};

// The source planes as read by the forward and the weight grad: rows zero-padded along W
// and split into the W stride's phases, buf[id, ih, ph, j] = x[id, ih, j*sW + ph - lW].
struct Padded : Geom {
  i64 Wp;      // length of one phase row
  i64 plane;   // elements per source plane
  Padded(const i64* p, i64 reach) : Geom(p) {  // reach: columns read from a row start
    Wp = reach + ((KW - 1) * dW) / sW + 1;
    plane = D * H * sW * Wp;
  }
  i64 at(i64 id, i64 ih, i64 ph) const { return ((id * H + ih) * sW + ph) * Wp; }
  i64 tap(i64 kw) const { const i64 q = kw * dW; return (q % sW) * Wp + q / sW; }
  // the output row whose taps start at source row (id0, ih0) has all its taps inside
  bool interior(i64 id0, i64 ih0) const {
    return id0 >= 0 && id0 + (KD - 1) * dD < D && ih0 >= 0 && ih0 + (KH - 1) * dH < H;
  }
  // every tap of that row in the weight's order (ks, kd, kh, kw): fn(t, kw, in, off), with
  // in = its source row exists and off = where it starts in the padded planes
  template <class F> void row_taps(i64 id0, i64 ih0, F fn) const {
    i64 t = 0;
    for (i64 ks = 0; ks < Ks; ++ks)
      for (i64 kd = 0; kd < KD; ++kd) {
        const i64 id = id0 + kd * dD;
        for (i64 kh = 0; kh < KH; ++kh) {
          const i64 ih = ih0 + kh * dH;
          const bool in = id >= 0 && id < D && ih >= 0 && ih < H;
          for (i64 kw = 0; kw < KW; ++kw, ++t)
            fn(t, kw, in, in ? ks * plane + at(id, ih, 0) + tap(kw) : i64(0));
        }
      }
  }

  template <class T> void fill(const T* src, T* buf) const {
    typedef typename Vec<T>::v V;
    const i64 L = Vec<T>::L;
    for (i64 r = 0; r < D * H; ++r) {
      const T* s = src + r * W;
      if (sW == 2) {  // both phases at once: even and odd lanes of pairs of vectors
        T* b0 = buf + (r * 2) * Wp;
        T* b1 = b0 + Wp;
        // 2j - lW >= 0 and 2j + 1 - lW < W for j in [j0, j1): whole vectors there, each
        // element checked at the two ends
        const i64 j0 = (lW + 1) / 2;
        i64 j1 = (W + lW) / 2;
        if (j1 > Wp) j1 = Wp;
        i64 j = 0;
        for (; j < j0 && j < Wp; ++j) {
          const i64 i0 = 2 * j - lW, i1 = i0 + 1;
          b0[j] = (i0 >= 0 && i0 < W) ? s[i0] : T(0);
          b1[j] = (i1 >= 0 && i1 < W) ? s[i1] : T(0);
        }
        const T* sp = s - lW;
        for (; j + L <= j1; j += L) {
          V a = loadu(sp + 2 * j), c = loadu(sp + 2 * j + L);
          V ev, od;
          for (i64 l = 0; l < L / 2; ++l) {
            ev[l] = a[2 * l]; ev[l + L / 2] = c[2 * l];
            od[l] = a[2 * l + 1]; od[l + L / 2] = c[2 * l + 1];
          }
          std::memcpy(b0 + j, &ev, sizeof ev);
          std::memcpy(b1 + j, &od, sizeof od);
        }
        for (; j < Wp; ++j) {
          const i64 i0 = 2 * j - lW, i1 = i0 + 1;
          b0[j] = (i0 >= 0 && i0 < W) ? s[i0] : T(0);
          b1[j] = (i1 >= 0 && i1 < W) ? s[i1] : T(0);
        }
        continue;
      }
      for (i64 ph = 0; ph < sW; ++ph) {
        T* b = buf + (r * sW + ph) * Wp;
        // j*sW + ph - lW in [0, W)  <=>  j in [j0, j1)
        i64 j0 = lW - ph > 0 ? (lW - ph + sW - 1) / sW : 0;
        i64 j1 = W + lW - ph > 0 ? (W + lW - ph + sW - 1) / sW : 0;
        if (j1 > Wp) j1 = Wp;
        if (j0 > j1) j0 = j1;
        for (i64 j = 0; j < j0; ++j) b[j] = 0;
        const T* sp = s + ph - lW;
        if (sW == 1) {
          i64 j = j0;
          for (; j + L <= j1; j += L) {
            const V v = loadu(sp + j);
            std::memcpy(b + j, &v, sizeof v);
          }
          for (; j < j1; ++j) b[j] = sp[j];
        } else {
          for (i64 j = j0; j < j1; ++j) b[j] = sp[j * sW];
        }
        for (i64 j = j1; j < Wp; ++j) b[j] = 0;
      }
    }
  }
};

template <class T> static i64 fwd_reach(const i64* p) {
  return rup(p[P_YW], (i64)pick_nv<T>(p[P_YW]) * Vec<T>::L);
}

// forward scratch: the padded source planes, then one zero row (what a tap reading a
// padding row of D or H multiplies)
template <class T>
static i64 fwd_scratch(const i64* p) {
  Padded f(p, fwd_reach<T>(p));
  return f.Ks * f.plane + f.Wp;
}

template <class T>
static int forward(const i64* p, const T* x, const T* w, const T* bias, T* y, T* scratch,
                   i64 scratch_elems) {
  const int nv = pick_nv<T>(p[P_YW]);
  Padded f(p, fwd_reach<T>(p));
  if (scratch_elems < f.Ks * f.plane + f.Wp) return -1;
  const i64 zero = f.Ks * f.plane;
  std::fill(scratch + zero, scratch + zero + f.Wp, T(0));
  const i64 taps = f.taps(), nT = f.Ks * taps;
  // every tap's offset from source row (id0, ih0) = (od*sD - lD, oh*sH - lH), in the
  // weight's order (ks, kd, kh, kw): used as it is for rows with every tap inside
  std::vector<i64> rel((size_t)nT + 1), off((size_t)nT + 1);
  {
    i64 t = 0;
    for (i64 ks = 0; ks < f.Ks; ++ks)
      for (i64 kd = 0; kd < f.KD; ++kd)
        for (i64 kh = 0; kh < f.KH; ++kh)
          for (i64 kw = 0; kw < f.KW; ++kw)
            rel[t++] = ks * f.plane + f.at(kd * f.dD, kh * f.dH, 0) + f.tap(kw);
  }
  const i64 Cx = f.G * f.Ks, Cy = f.G * f.Ko;
  const i64 xplane = f.D * f.H * f.W, yplane = f.OD * f.OH * f.OW;
  for (i64 pl = p[P_BEGIN]; pl < p[P_END]; ++pl) {
    const i64 n = pl / f.G, g = pl % f.G;
    for (i64 ks = 0; ks < f.Ks; ++ks)
      f.fill(x + (n * Cx + g * f.Ks + ks) * xplane, scratch + ks * f.plane);
    for (i64 ko = 0; ko < f.Ko; ++ko) {
      const i64 oc = g * f.Ko + ko;
      const T* wk = w + oc * nT;
      const T b = bias ? bias[oc] : T(0);
      T* yp = y + (n * Cy + oc) * yplane;
      for (i64 od = 0; od < f.OD; ++od) {
        const i64 id0 = od * f.sD - f.lD;
        for (i64 oh = 0; oh < f.OH; ++oh) {
          const i64 ih0 = oh * f.sH - f.lH;
          T* out = yp + (od * f.OH + oh) * f.OW;
          if (f.interior(id0, ih0)) {
            row_any<T>(nv, scratch + f.at(id0, ih0, 0), rel.data(), wk, nT, b, out, f.OW, 1);
            continue;
          }
          // a border row: taps on padding rows read the zero row
          f.row_taps(id0, ih0, [&](i64 t, i64 kw, bool in, i64 o) {
            off[(size_t)t] = in ? o : zero + (kw * f.dW) / f.sW;
          });
          row_any<T>(nv, scratch, off.data(), wk, nT, b, out, f.OW, 1);
        }
      }
    }
  }
  return 0;
}

// ------------------------------------------------------------------ input grad
// gx[i] (per dim) = sum over (k, o) with o*s + k*d - lo = i of w[k] * gy[o].  With
// rho = (i + lo) mod s and o0 = (i + lo) div s, tap k reaches i when k*d = rho (mod s),
// reading o = o0 - (k*d - rho)/s.  Along W the input positions split into s phases
// i = s*j + r, and phase r reads gy[j + a] with a = (r + lo) div s - (k*d - rho)/s, one
// contiguous run per tap.  gy rows are copied zero-padded by PL in front (PL >= -a for
// every a) into scratch rows of Wg.  Rows whose taps all land inside gy use one tap list
// per phase combination, built once per call; border rows build their own.
struct Reach {  // per dim: the taps of each phase rho, (k, -(k*d - rho)/s)
  std::vector<std::vector<std::pair<i64, i64>>> ph;
  i64 s;
  Reach(i64 K, i64 s_, i64 d) : ph((size_t)s_), s(s_) {
    for (i64 k = 0; k < K; ++k) {
      const i64 q = k * d, rho = q % s_;
      ph[(size_t)rho].push_back({k, -(q - rho) / s_});
    }
  }
};

struct Bwd : Geom {
  i64 amin, amax, PL, Wg, plane, Jmax;
  Bwd(const i64* p, i64 B) : Geom(p) {
    amin = fdiv(0 + lW - (KW - 1) * dW, sW);
    amax = fdiv((sW - 1) + lW, sW);
    PL = amin < 0 ? -amin : 0;
    Jmax = (W + sW - 1) / sW;
    Wg = PL + (amax > 0 ? amax : 0) + Jmax + B + 1;  // a block may start at any column
    if (Wg < PL + OW) Wg = PL + OW;
    plane = OD * OH * Wg;
  }
};

// One phase row of the input grad: out[j*s] for j < J from taps (base + off[t], wt[t])
// reading gy column j + av[t].  With finite weights, a tap reading a padding column adds
// an exact zero: the register blocks cover the whole row.  Otherwise they cover the
// columns where every tap reads a real column, and at the two ends each element sums
// only the taps that read real columns (so an inf weight never meets a padding zero).
template <class T>
static void bwd_row(int nv, const T* base, const i64* off, const i64* av, const T* wt, i64 nt,
                    T* out, i64 J, i64 s, i64 OW, bool finite) {
  if (finite) {
    row_any<T>(nv, base, off, wt, nt, T(0), out, J, s);
    return;
  }
  i64 jl = 0, jr = J;
  for (i64 t = 0; t < nt; ++t) {
    jl = std::max(jl, -av[t]);
    jr = std::min(jr, OW - av[t]);
  }
  jl = std::min(jl, J);
  jr = std::max(jr, jl);
  auto one = [&](i64 j) {
    T acc = 0;
    for (i64 t = 0; t < nt; ++t) {
      const i64 o = j + av[t];
      if (o >= 0 && o < OW) acc += wt[t] * base[off[t] + j];
    }
    out[j * s] = acc;
  };
  for (i64 j = 0; j < jl; ++j) one(j);
  if (jr > jl) row_any<T>(nv, base + jl, off, wt, nt, T(0), out + jl * s, jr - jl, s);
  for (i64 j = jr; j < J; ++j) one(j);
}

template <class T> static int bwd_nv(const i64* p) {
  return pick_nv<T>((p[P_XW] + p[P_SW] - 1) / p[P_SW]);
}

template <class T>
static i64 bwd_scratch(const i64* p) {
  Bwd b(p, (i64)bwd_nv<T>(p) * Vec<T>::L);
  return b.Ko * b.plane;
}

template <class T>
static int input_grad(const i64* p, const T* gy, const T* w, T* gx, T* scratch,
                      i64 scratch_elems) {
  const int nv = bwd_nv<T>(p);
  Bwd b(p, (i64)nv * Vec<T>::L);
  if (scratch_elems < b.Ko * b.plane) return -1;
  const i64 taps = b.taps();
  const Reach rd(b.KD, b.sD, b.dD), rh(b.KH, b.sH, b.dH), rw(b.KW, b.sW, b.dW);
  // per phase combination (rho_d, rho_h, r): the taps as (ko, kd, kh, kw) and their
  // offsets from gy row (o0_d, o0_h), column a = 0 of the padded row
  const i64 nph = b.sD * b.sH * b.sW;
  std::vector<std::vector<i64>> cidx((size_t)nph), coff((size_t)nph), ca((size_t)nph);
  std::vector<i64> dmin((size_t)b.sD, 0), hmin((size_t)b.sH, 0);
  for (i64 x = 0; x < b.sD; ++x)
    for (auto& kd : rd.ph[(size_t)x]) dmin[(size_t)x] = std::min(dmin[(size_t)x], kd.second);
  for (i64 x = 0; x < b.sH; ++x)
    for (auto& kh : rh.ph[(size_t)x]) hmin[(size_t)x] = std::min(hmin[(size_t)x], kh.second);
  for (i64 pd_ = 0; pd_ < b.sD; ++pd_)
    for (i64 ph_ = 0; ph_ < b.sH; ++ph_)
      for (i64 r = 0; r < b.sW; ++r) {
        const i64 c = (pd_ * b.sH + ph_) * b.sW + r;
        const i64 rhow = (r + b.lW) % b.sW, a0 = (r + b.lW) / b.sW;
        for (i64 ko = 0; ko < b.Ko; ++ko)
          for (auto& kd : rd.ph[(size_t)pd_])
            for (auto& kh : rh.ph[(size_t)ph_])
              for (auto& kw : rw.ph[(size_t)rhow]) {
                cidx[(size_t)c].push_back(ko * taps + (kd.first * b.KH + kh.first) * b.KW + kw.first);
                coff[(size_t)c].push_back(ko * b.plane + (kd.second * b.OH + kh.second) * b.Wg +
                                          b.PL + a0 + kw.second);
                ca[(size_t)c].push_back(a0 + kw.second);
              }
      }
  std::vector<i64> off((size_t)(b.Ko * taps) + 1), av((size_t)(b.Ko * taps) + 1);
  std::vector<T> wt((size_t)(b.Ko * taps) + 1);
  std::vector<std::vector<T>> cw((size_t)nph);
  const i64 Cx = b.G * b.Ks, Cy = b.G * b.Ko;
  const i64 xplane = b.D * b.H * b.W, yplane = b.OD * b.OH * b.OW;
  for (i64 pl = p[P_BEGIN]; pl < p[P_END]; ++pl) {
    const i64 n = pl / b.G, g = pl % b.G;
    for (i64 ko = 0; ko < b.Ko; ++ko) {
      const T* src = gy + (n * Cy + g * b.Ko + ko) * yplane;
      T* buf = scratch + ko * b.plane;
      for (i64 r = 0; r < b.OD * b.OH; ++r) {
        T* row_ = buf + r * b.Wg;
        for (i64 j = 0; j < b.PL; ++j) row_[j] = 0;
        std::memcpy(row_ + b.PL, src + r * b.OW, (size_t)b.OW * sizeof(T));
        for (i64 j = b.PL + b.OW; j < b.Wg; ++j) row_[j] = 0;
      }
    }
    for (i64 ks = 0; ks < b.Ks; ++ks) {
      // weight w[g*Ko + ko, ks, tap] at index ko*taps + tap of wg
      const T* wg = w + (g * b.Ko * b.Ks + ks) * taps;
      auto wat = [&](i64 idx) { return wg[(idx / taps) * b.Ks * taps + idx % taps]; };
      bool finite = true;
      for (i64 ko = 0; ko < b.Ko; ++ko)
        for (i64 t = 0; t < taps; ++t) {
          const T v = wg[ko * b.Ks * taps + t];
          finite = finite && v - v == T(0);
        }
      for (i64 c = 0; c < nph; ++c) {
        cw[(size_t)c].resize(cidx[(size_t)c].size());
        for (size_t u = 0; u < cidx[(size_t)c].size(); ++u) cw[(size_t)c][u] = wat(cidx[(size_t)c][u]);
      }
      T* xp = gx + (n * Cx + g * b.Ks + ks) * xplane;
      for (i64 id = 0; id < b.D; ++id) {
        const i64 pd_ = (id + b.lD) % b.sD, od0 = (id + b.lD) / b.sD;
        const bool din = od0 < b.OD && od0 + dmin[(size_t)pd_] >= 0;
        for (i64 ih = 0; ih < b.H; ++ih) {
          const i64 ph_ = (ih + b.lH) % b.sH, oh0 = (ih + b.lH) / b.sH;
          const bool inside = din && oh0 < b.OH && oh0 + hmin[(size_t)ph_] >= 0;
          T* xr = xp + (id * b.H + ih) * b.W;
          for (i64 r = 0; r < b.sW && r < b.W; ++r) {
            const i64 J = (b.W - r + b.sW - 1) / b.sW;
            const i64 c = (pd_ * b.sH + ph_) * b.sW + r;
            if (inside) {
              bwd_row<T>(nv, scratch + (od0 * b.OH + oh0) * b.Wg, coff[(size_t)c].data(),
                         ca[(size_t)c].data(), cw[(size_t)c].data(), (i64)coff[(size_t)c].size(),
                         xr + r, J, b.sW, b.OW, finite);
              continue;
            }
            const i64 rhow = (r + b.lW) % b.sW, a0 = (r + b.lW) / b.sW;
            i64 nt = 0;  // a border row: the taps landing inside gy
            for (i64 ko = 0; ko < b.Ko; ++ko)
              for (auto& kd : rd.ph[(size_t)pd_]) {
                const i64 od = od0 + kd.second;
                if (od < 0 || od >= b.OD) continue;
                for (auto& kh : rh.ph[(size_t)ph_]) {
                  const i64 oh = oh0 + kh.second;
                  if (oh < 0 || oh >= b.OH) continue;
                  for (auto& kw : rw.ph[(size_t)rhow]) {
                    off[nt] = ko * b.plane + (od * b.OH + oh) * b.Wg + b.PL + a0 + kw.second;
                    av[nt] = a0 + kw.second;
                    wt[nt] = wat(ko * taps + (kd.first * b.KH + kh.first) * b.KW + kw.first);
                    ++nt;
                  }
                }
              }
            bwd_row<T>(nv, scratch, off.data(), av.data(), wt.data(), nt, xr + r, J, b.sW, b.OW,
                       finite);
          }
        }
      }
    }
  }
  return 0;
}

// ------------------------------------------------------------------ weight grad
// Per image and output channel, the rows of gy are read in column chunks of up to 8
// vectors held in registers; for each tap whose source row exists, the chunk's dot
// product with the shifted source row is added to that tap's vector accumulator (one
// load and one FMA per vector and tap, the taps independent).  The last vector of a row
// is masked on both operands, so columns past the output never enter a sum.  A tap on a
// padding row adds z = sum_j gy_row[j] * 0 (0, or NaN where the row holds inf/NaN:
// padding is a multiplied zero, as in the reference).  Per image, each tap's lanes are
// reduced in a fixed order and summed over the images in double.
template <class T> static i64 wg_reach(const i64* p) { return rup(p[P_YW], Vec<T>::L); }

template <class T>
static i64 wgrad_scratch(const i64* p) {
  Padded f(p, wg_reach<T>(p));
  return f.Ks * f.plane;
}

template <class T> struct Mask;
template <> struct Mask<float> { typedef int32_t m __attribute__((vector_size(32))); };
template <> struct Mask<double> { typedef int64_t m __attribute__((vector_size(32))); };

// acc[idx[t]] += sum over the chunk's columns of g[j] * (base + off[t])[j]; the chunk is
// NV vectors, the last with `last` valid lanes
template <class T, int NV>
static void wg_block(const T* g, const T* base, const i64* off, const i64* idx, i64 nt,
                     typename Vec<T>::v* acc, int last) {
  typedef typename Vec<T>::v V;
  typedef typename Mask<T>::m M;
  const int L = Vec<T>::L;
  V gv[NV];
  for (int v = 0; v < NV - 1; ++v) gv[v] = loadu(g + v * L);
  T tmp[L];
  for (int l = 0; l < L; ++l) tmp[l] = l < last ? g[(NV - 1) * L + l] : T(0);
  gv[NV - 1] = loadu(tmp);
  M lane;
  for (int l = 0; l < L; ++l) lane[l] = l;
  const M keep = lane < (typename std::remove_reference<decltype(lane[0])>::type)last;
  for (i64 t = 0; t < nt; ++t) {
    const T* q = base + off[t];
    V a = acc[idx[t]];
    for (int v = 0; v < NV - 1; ++v) a += gv[v] * loadu(q + v * L);
    const V xl = loadu(q + (NV - 1) * L);
    a += gv[NV - 1] * (keep ? xl : V{});
    acc[idx[t]] = a;
  }
}

template <class T>
static void wg_any(int nv, const T* g, const T* base, const i64* off, const i64* idx, i64 nt,
                   typename Vec<T>::v* acc, int last) {
  switch (nv) {
    case 1: wg_block<T, 1>(g, base, off, idx, nt, acc, last); break;
    case 2: wg_block<T, 2>(g, base, off, idx, nt, acc, last); break;
    case 3: wg_block<T, 3>(g, base, off, idx, nt, acc, last); break;
    case 4: wg_block<T, 4>(g, base, off, idx, nt, acc, last); break;
    case 5: wg_block<T, 5>(g, base, off, idx, nt, acc, last); break;
    case 6: wg_block<T, 6>(g, base, off, idx, nt, acc, last); break;
    case 7: wg_block<T, 7>(g, base, off, idx, nt, acc, last); break;
    default: wg_block<T, 8>(g, base, off, idx, nt, acc, last); break;
  }
}

// groups [begin, end): gw[g*Ko + ko, ks, tap] summed over every image in order
template <class T>
static int weight_grad(const i64* p, const T* x, const T* gy, T* gw, T* scratch,
                       i64 scratch_elems) {
  typedef typename Vec<T>::v V;
  const int L = Vec<T>::L;
  Padded f(p, wg_reach<T>(p));
  if (scratch_elems < f.Ks * f.plane) return -1;
  const i64 taps = f.taps(), nT = f.Ks * taps;
  const i64 Cx = f.G * f.Ks, Cy = f.G * f.Ko;
  const i64 xplane = f.D * f.H * f.W, yplane = f.OD * f.OH * f.OW;
  std::vector<double> acc((size_t)(f.Ko * nT));
  std::vector<V> vacc((size_t)nT + 1);
  std::vector<T> ztail((size_t)nT + 1);
  std::vector<i64> rel((size_t)nT + 1), all((size_t)nT + 1), off((size_t)nT + 1),
      idx((size_t)nT + 1);
  {
    i64 t = 0;
    for (i64 ks = 0; ks < f.Ks; ++ks)
      for (i64 kd = 0; kd < f.KD; ++kd)
        for (i64 kh = 0; kh < f.KH; ++kh)
          for (i64 kw = 0; kw < f.KW; ++kw) {
            all[(size_t)t] = t;
            rel[(size_t)t++] = ks * f.plane + f.at(kd * f.dD, kh * f.dH, 0) + f.tap(kw);
          }
  }
  for (i64 g = p[P_BEGIN]; g < p[P_END]; ++g) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (i64 n = 0; n < f.N; ++n) {
      for (i64 ks = 0; ks < f.Ks; ++ks)
        f.fill(x + (n * Cx + g * f.Ks + ks) * xplane, scratch + ks * f.plane);
      for (i64 ko = 0; ko < f.Ko; ++ko) {
        const T* yp = gy + (n * Cy + g * f.Ko + ko) * yplane;
        std::fill(vacc.begin(), vacc.end(), V{});
        std::fill(ztail.begin(), ztail.end(), T(0));
        for (i64 od = 0; od < f.OD; ++od) {
          const i64 id0 = od * f.sD - f.lD;
          for (i64 oh = 0; oh < f.OH; ++oh) {
            const i64 ih0 = oh * f.sH - f.lH;
            const T* gr = yp + (od * f.OH + oh) * f.OW;
            const T* base;
            const i64 *o, *ix;
            i64 nt;
            if (f.interior(id0, ih0)) {
              base = scratch + f.at(id0, ih0, 0);
              o = rel.data(); ix = all.data(); nt = nT;
            } else {  // a border row: taps on padding rows take z instead
              T zr = 0;
              for (i64 j = 0; j < f.OW; ++j) zr += gr[j] * T(0);
              nt = 0;
              f.row_taps(id0, ih0, [&](i64 t, i64, bool in, i64 o) {
                if (!in) {
                  ztail[(size_t)t] += zr;
                  return;
                }
                off[(size_t)nt] = o;
                idx[(size_t)nt++] = t;
              });
              base = scratch; o = off.data(); ix = idx.data();
            }
            for (i64 c0 = 0; c0 < f.OW; c0 += 8 * L) {
              const i64 cols = std::min<i64>(f.OW - c0, 8 * L);
              const int nv = (int)((cols + L - 1) / L);
              wg_any<T>(nv, gr + c0, base + c0, o, ix, nt, vacc.data(), (int)(cols - (nv - 1) * L));
            }
          }
        }
        for (i64 t = 0; t < nT; ++t) {
          T lanes[L];
          std::memcpy(lanes, &vacc[(size_t)t], sizeof lanes);
          double sum = 0;
          for (int l = 0; l < L; ++l) sum += (double)lanes[l];
          acc[(size_t)(ko * nT + t)] += sum + (double)ztail[(size_t)t];
        }
      }
    }
    T* out = gw + g * f.Ko * nT;
    for (size_t i = 0; i < acc.size(); ++i) out[i] = (T)acc[i];
  }
  return 0;
}

// ------------------------------------------------------------------ C entry points
extern "C" {
int gc_dw_abi_version() { return 1; }
int gc_dw_param_count() { return P_COUNT; }

// scratch elements one call needs: pass 0 forward, 1 input grad, 2 weight grad
i64 gc_dw_scratch_f32(int pass, const i64* p) {
  return pass == 0 ? fwd_scratch<float>(p) : pass == 1 ? bwd_scratch<float>(p) : wgrad_scratch<float>(p);
}
i64 gc_dw_scratch_f64(int pass, const i64* p) {
  return pass == 0 ? fwd_scratch<double>(p) : pass == 1 ? bwd_scratch<double>(p) : wgrad_scratch<double>(p);
}
int gc_dw_forward_f32(const i64* p, const float* x, const float* w, const float* b, float* y,
                      float* s, i64 ns) { return forward<float>(p, x, w, b, y, s, ns); }
int gc_dw_forward_f64(const i64* p, const double* x, const double* w, const double* b, double* y,
                      double* s, i64 ns) { return forward<double>(p, x, w, b, y, s, ns); }
int gc_dw_input_grad_f32(const i64* p, const float* gy, const float* w, float* gx, float* s,
                         i64 ns) { return input_grad<float>(p, gy, w, gx, s, ns); }
int gc_dw_input_grad_f64(const i64* p, const double* gy, const double* w, double* gx, double* s,
                         i64 ns) { return input_grad<double>(p, gy, w, gx, s, ns); }
int gc_dw_weight_grad_f32(const i64* p, const float* x, const float* gy, float* gw, float* s,
                          i64 ns) { return weight_grad<float>(p, x, gy, gw, s, ns); }
int gc_dw_weight_grad_f64(const i64* p, const double* x, const double* gy, double* gw, double* s,
                          i64 ns) { return weight_grad<double>(p, x, gy, gw, s, ns); }
}
