// gpuconv implicit-GEMM engine (CUTLASS's implicit-GEMM view of a convolution).
//
//   fprop  C[M = N*P*Q,  N = K  ] = A[M, K = C*R*S]   * B[K, N]   (A = x gathered, B = weight)
//   dgrad  C[M = N*H*W,  N = C  ] = A[M, K = K*R*S]   * B[K, N]   (A = grad_out gathered,
//          per stride phase: each phase is a stride-1 GEMM over the taps that reach it)
//   wgrad  C[M = K,      N = C*R*S] = A[M, K = N*P*Q] * B[K, N]   (A = grad_out, B = x gathered,
//          split-K over N*P*Q, fixed-order second pass)
// per group (grid y carries group * N tiles, or group * M tiles for wgrad).
//
// Pieces:
//   * the tap table (shared memory): per reduction tap its source offset (dz, dy, dx),
//     the linear source offset and the weight's tap index -- THE one place where the
//     gather's index mapping lives (padding modes would remap here);
//   * operand iterators: every thread owns fixed GEMM rows/columns, decoded once in the
//     prologue; the reduction index is kept as mixed-radix digits and stepped by BK
//     with one carry, so the main loop has no division; the forward-like reduction is
//     tap-major (k = tap*C + c), so the gather re-reads the tap table and re-checks
//     bounds only when a row's tap changes;
//   * the SIMT warp-MMA policy: 8x8 outputs per thread as 2x2 blocks of 4x4, operands
//     read from shared memory with 128-bit loads (LDS.128), double-buffered shared
//     tiles (global loads of step k+1 are issued into registers before step k is
//     multiplied; one barrier per step);
//   * epilogue: bias added in the accumulate type, one rounding, store; or, under
//     split-K, the raw accumulators to a partial buffer that a fixed-order reduce
//     kernel sums (bias and rounding there).
// Operands whose rows/columns/reduction index fall outside the problem are predicated
// and zero-filled: nothing outside a tensor is ever read.
//
// Configurations (compile time): BM x BN x BK tile, NT threads, 8x8 per thread.

#ifndef GPUCONV_IGEMM_CUH
#define GPUCONV_IGEMM_CUH

template <int BM_, int BN_, int BK_, int NT_, int MINB_>
struct gc_simt_cfg {
  enum {
    BM = BM_, BN = BN_, BK = BK_, NT = NT_,
    MINB = MINB_,  // resident blocks per SM asked of the register allocator (float32)
    TM = BM / 8, TN = BN / 8,  // thread grid
    LDA = BM + 4, LDB = BN + 4  // shared row strides: +4 keeps 16-byte rows and spreads
                                // the k-fast tile stores over all banks
  };
  static_assert(TM * TN == NT, "8x8 outputs per thread");
  static_assert(TN % 8 == 0 && TM % 4 == 0, "a warp is 4 x 8 threads");
  static_assert(NT % BM == 0 && NT % BN == 0 && NT % BK == 0, "loader mappings");
  static_assert((BM * BK) % NT == 0 && (BN * BK) % NT == 0, "loader mappings");
};
// "l": large problems; "s": small problems / few channels (4x more blocks per output)
typedef gc_simt_cfg<128, 128, 8, 256, 2> gc_cfg_l;  // <= 128 registers: 2 blocks, 16 warps
typedef gc_simt_cfg<64, 64, 8, 64, 1> gc_cfg_s;
// float64 "s": half the reduction depth per step (the 8x8 double accumulators leave no
// room for 8 staged rows per operand without spills on sm_80)
template <class CFG, typename A> struct gc_cfg_for { typedef CFG type; };
template <> struct gc_cfg_for<gc_cfg_s, double> { typedef gc_simt_cfg<64, 64, 4, 64, 1> type; };
// __launch_bounds__ minimum blocks: 2 for the float32 large forward-like tile (128
// registers, measured spill-free on sm_80 and sm_90); 1 elsewhere (float64 holds twice
// the accumulator registers; the weight grad and 64-bit-index variants need more)
#define GC_IG_MINB(T, CFG, WIDE) \
  ((sizeof(typename gc_acc<T>::type) == 8 || (WIDE)) ? 1 : CFG::MINB)

// ---- SIMT micro-kernel ----------------------------------------------------------------
__device__ __forceinline__ void gc_lds4(const float* p, float* v) {
  const float4 t = *reinterpret_cast<const float4*>(p);  // LDS.128
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void gc_lds4(const double* p, double* v) {
  const double2 t0 = *reinterpret_cast<const double2*>(p);  // LDS.128
  const double2 t1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = t0.x; v[1] = t0.y; v[2] = t1.x; v[3] = t1.y;
}

// acc[i][j] += sum_kk As[kk][row(i)] * Bs[kk][col(j)]: row(i) = tm*4 + i (i < 4),
// BM/2 + tm*4 + i-4 (i >= 4); likewise columns.
template <class CFG, typename A>
__device__ __forceinline__ void gc_simt_mma(const A* __restrict__ As, const A* __restrict__ Bs,
                                            A (&acc)[8][8], int tm, int tn) {
#pragma unroll
  for (int kk = 0; kk < CFG::BK; ++kk) {
    A a[8], b[8];
    gc_lds4(As + kk * CFG::LDA + tm * 4, a);
    gc_lds4(As + kk * CFG::LDA + CFG::BM / 2 + tm * 4, a + 4);
    gc_lds4(Bs + kk * CFG::LDB + tn * 4, b);
    gc_lds4(Bs + kk * CFG::LDB + CFG::BN / 2 + tn * 4, b + 4);
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
  }
}

template <class CFG>
__device__ __forceinline__ int gc_simt_row(int tm, int i) {
  return (i < 4 ? 0 : CFG::BM / 2) + tm * 4 + (i & 3);
}
template <class CFG>
__device__ __forceinline__ int gc_simt_col(int tn, int j) {
  return (j < 4 ? 0 : CFG::BN / 2) + tn * 4 + (j & 3);
}
// thread (tm, tn) of the 8x8 micro-tile grid: a warp is 4 (m) x 8 (n) threads
template <class CFG>
__device__ __forceinline__ void gc_simt_thread(int tid, int& tm, int& tn) {
  const int warp = tid >> 5, lane = tid & 31, wn = CFG::TN / 8;
  tm = (warp / wn) * 4 + (lane >> 3);
  tn = (warp % wn) * 8 + (lane & 7);
}

// ---- forward-like problem: fprop and every dgrad stride phase ------------------------
// out[img, grp*Ng + n, E(m)] = sum_{c < Cg, t < T} src[img, grp*Cg + c, S(m) + off(t)]
//                                               * wt[grp*wg + n*wn + c*wc + wtap(t)]
// m = (img, md, mh, mw) over N x MD x MH x MW; S(m) = m digits * ms + mb (per dim);
// E(m) = m digits * os + of; tap t = (td, th, tw) over TD x TH x TW, off = ta + tb*t,
// weight tap index (tr + ts*t) per dim, linear over KD x KH x KW.
struct gc_fp {
  int G, Nimg, Csrc, Cg, SD, SH, SW, Ng, Cout;
  int MD, MH, MW, msd, msh, msw, mbd, mbh, mbw;
  int ED, EH, EW, osd, osh, osw, ofd, ofh, ofw;
  int TD, TH, TW, tad, tah, taw, tbd, tbh, tbw, trd, trh, trw, tsd, tsh, tsw;
  int KH, KW, wg, wn, wc, kchunk;
};

#define GC_FP_PARAMS                                                                         \
  int G, int Nimg, int Csrc, int Cg, int SD, int SH, int SW, int Ng, int Cout, int MD, int MH, \
      int MW, int msd, int msh, int msw, int mbd, int mbh, int mbw, int ED, int EH, int EW,  \
      int osd, int osh, int osw, int ofd, int ofh, int ofw, int TD, int TH, int TW, int tad,   \
      int tah, int taw, int tbd, int tbh, int tbw, int trd, int trh, int trw, int tsd,        \
      int tsh, int tsw, int KH, int KW, int wg, int wn, int wc, int kchunk
#define GC_FP_MAKE                                                                           \
  {G,   Nimg, Csrc, Cg,  SD,  SH,  SW,  Ng,  Cout, MD,  MH,  MW,  msd, msh, msw, mbd,       \
   mbh, mbw,  ED,   EH,  EW,  osd, osh, osw, ofd,  ofh, ofw, TD,  TH,  TW,  tad, tah,       \
   taw, tbd,  tbh,  tbw, trd, trh, trw, tsd, tsh,  tsw, KH,  KW,  wg,  wn,  wc,  kchunk}

// Tap table entry: source offset per dim, linear source offset, weight tap index.
#define GC_TAP_INTS 5

// The epilogue's index of GEMM row m (an output position: image, then E(m) = the output
// element it writes, e.g. a stride phase's position in the input grad) at channel 0 of
// group grp: out[img, grp*Ng + n, E(m)] = out[rowbase + n*esp].  One place for both
// forward policies (SIMT and tensor-op).
template <typename I>
__device__ __forceinline__ I gc_fp_out_row(const gc_fp& p, I m, int grp, I esp) {
  I r = m;
  const int mw = (int)(r % p.MW); r /= p.MW;
  const int mh = (int)(r % p.MH); r /= p.MH;
  const int md = (int)(r % p.MD);
  const I img = r / p.MD;
  const I e = (((I)(md * p.osd + p.ofd) * p.EH + (mh * p.osh + p.ofh)) * p.EW +
               (mw * p.osw + p.ofw));
  return (img * p.Cout + (I)grp * p.Ng) * esp + e;
}

__device__ __forceinline__ void gc_fp_taps(int* tab, const gc_fp& p, int T, int tid, int nt) {
  for (int t = tid; t < T; t += nt) {
    const int tw = t % p.TW, th = (t / p.TW) % p.TH, td = t / (p.TW * p.TH);
    const int dz = p.tad + p.tbd * td, dy = p.tah + p.tbh * th, dx = p.taw + p.tbw * tw;
    const int rd = p.trd + p.tsd * td, rh = p.trh + p.tsh * th, rw = p.trw + p.tsw * tw;
    tab[GC_TAP_INTS * t + 0] = dz;
    tab[GC_TAP_INTS * t + 1] = dy;
    tab[GC_TAP_INTS * t + 2] = dx;
    tab[GC_TAP_INTS * t + 3] = (dz * p.SH + dy) * p.SW + dx;
    tab[GC_TAP_INTS * t + 4] = (rd * p.KH + rh) * p.KW + rw;
  }
}

// Reduction order of the forward-like problem: tap-major, k = t*Cg + c.  A thread's
// reduction row keeps its (t, c) digits, stepped by BK with one carry; while the tap
// stays the same (every step when Cg >= BK, until the channels of the tap are used up)
// the gather only adds a fixed channel stride to its offset and keeps its bounds
// predicate; the tap table is read and the bounds checked again only when the tap
// changes.  No division in the main loop.

// One gathered element: the storage value converted to the register type R (the SIMT
// policy computes in the accumulate type), or the raw 16-bit pattern (the tensor-op
// policy keeps halves as they are).
template <typename R, typename S>
__device__ __forceinline__ R gc_gather_read(const S* p) { return (R)gc_load(p); }
template <>
__device__ __forceinline__ unsigned short gc_gather_read<unsigned short, unsigned short>(
    const unsigned short* p) { return *p; }
template <>  // float32 for the TF32 tensor-op policy: rounded once, here (cvt.rna.tf32.f32)
__device__ __forceinline__ unsigned gc_gather_read<unsigned, float>(const float* p) {
  return gc_f32_to_tf32(*p);
}

// A operand of the forward (the gather), for both policies: thread owns GEMM row am
// (m-fast, so consecutive threads read consecutive output positions) and reduction rows
// ak + RS*i of each step, k = t*Cg + c (tap-major), as (t, c) digits stepped by BK with one
// carry (no division); the tap table is read and the bounds checked only when a row's tap
// changes, otherwise the offset moves by a fixed stride.  S: source element, R: register.
template <typename S, typename R, typename I, int E_, int RS_, class CFG>
struct gc_gather_a_iter {
  enum { E = E_, RS = RS_ };
  const S* __restrict__ src;
  I base, sp, cstep;
  int z0, y0, x0, am, ak, Cg, T_, sc, st;
  bool mvalid;
  int c[E], t[E];
  I off[E];
  unsigned ok;  // bit i: row i reads (inside the source, real row, real tap)

  // offset and bounds predicate of row i at its (t, c)
  __device__ __forceinline__ void refresh(int i, const int* tab, const gc_fp& p) {
    ok &= ~(1u << i);
    off[i] = 0;
    if (mvalid && t[i] < T_) {
      const int* e = tab + GC_TAP_INTS * t[i];
      const int z = z0 + e[0], y = y0 + e[1], x = x0 + e[2];
      if ((unsigned)z < (unsigned)p.SD && (unsigned)y < (unsigned)p.SH &&
          (unsigned)x < (unsigned)p.SW)
        ok |= 1u << i;
      off[i] = base + (I)c[i] * sp + e[3];
    }
  }

  __device__ __forceinline__ void init(const S* __restrict__ s, const int* tab, const gc_fp& p,
                                       int grp, I m0, I M, int k_begin, int tid) {
    src = s;
    am = tid % CFG::BM;
    ak = tid / CFG::BM;
    Cg = p.Cg;
    T_ = p.TD * p.TH * p.TW;
    sc = CFG::BK % Cg;
    st = CFG::BK / Cg;
    sp = (I)p.SD * p.SH * p.SW;
    cstep = (I)sc * sp;
    const I m = m0 + am;
    mvalid = m < M;
    z0 = y0 = x0 = 0;
    base = 0;
    if (mvalid) {
      I r = m;
      const int mw = (int)(r % p.MW); r /= p.MW;
      const int mh = (int)(r % p.MH); r /= p.MH;
      const int md = (int)(r % p.MD);
      const I img = r / p.MD;
      z0 = md * p.msd + p.mbd;
      y0 = mh * p.msh + p.mbh;
      x0 = mw * p.msw + p.mbw;
      base = (img * p.Csrc + (I)grp * p.Cg) * sp + ((I)z0 * p.SH + y0) * p.SW + x0;
    }
    ok = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int k = k_begin + ak + RS * i;
      t[i] = k / Cg;
      c[i] = k - t[i] * Cg;
      refresh(i, tab, p);
    }
  }

  __device__ __forceinline__ void load(R (&r)[E], const int* tab, const gc_fp& p, int k0,
                                       int k_end) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      r[i] = ((ok >> i & 1u) && k0 + ak + RS * i < k_end) ? gc_gather_read<R>(src + off[i]) : R(0);
      c[i] += sc;
      int tn = t[i] + st;
      if (c[i] >= Cg) { c[i] -= Cg; ++tn; }
      if (tn != t[i]) {
        t[i] = tn;
        refresh(i, tab, p);
      } else {
        off[i] += cstep;
      }
    }
  }

  __device__ __forceinline__ void store(R* __restrict__ As, const R (&r)[E]) const {
#pragma unroll
    for (int i = 0; i < E; ++i) As[(ak + RS * i) * CFG::LDA + am] = r[i];
  }
};

// the SIMT forward's gather (registers in the accumulate type A)
template <typename T, typename I, typename A, class CFG>
using gc_fp_a_iter = gc_gather_a_iter<T, A, I, CFG::BM * CFG::BK / CFG::NT, CFG::NT / CFG::BM, CFG>;

// B operand (the weight): thread owns reduction row bk and GEMM columns bn + (NT/BK)*j.
template <typename T, typename I, typename A, class CFG>
struct gc_fp_b_iter {
  enum { E = CFG::BN * CFG::BK / CFG::NT, CS = CFG::NT / CFG::BK };
  const T* __restrict__ wt;
  I base, woff, cstep;
  int bk, bn, nlim, c, t, Cg, T_, sc, st;

  __device__ __forceinline__ void refresh(const int* tab, const gc_fp& p) {
    woff = t < T_ ? (I)c * p.wc + tab[GC_TAP_INTS * t + 4] : 0;
  }

  __device__ __forceinline__ void init(const T* __restrict__ w, const int* tab, const gc_fp& p,
                                       int grp, int n0, int k_begin, int tid) {
    wt = w;
    bk = tid % CFG::BK;
    bn = tid / CFG::BK;
    Cg = p.Cg;
    T_ = p.TD * p.TH * p.TW;
    sc = CFG::BK % Cg;
    st = CFG::BK / Cg;
    cstep = (I)sc * p.wc;
    nlim = p.Ng - n0;  // columns n0 + bn + CS*j < Ng are real
    base = (I)grp * p.wg + (I)(n0 + bn) * p.wn;
    const int k = k_begin + bk;
    t = k / Cg;
    c = k - t * Cg;
    refresh(tab, p);
  }

  __device__ __forceinline__ void load(A (&r)[E], const int* tab, const gc_fp& p, int k0,
                                       int k_end) {
    const bool kv = k0 + bk < k_end;
    const I o = base + woff;
#pragma unroll
    for (int j = 0; j < E; ++j)
      r[j] = (kv && bn + CS * j < nlim) ? (A)gc_load(wt + (o + (I)(CS * j) * p.wn)) : A(0);
    c += sc;
    int tn = t + st;
    if (c >= Cg) { c -= Cg; ++tn; }
    if (tn != t) {
      t = tn;
      refresh(tab, p);
    } else {
      woff += cstep;
    }
  }

  __device__ __forceinline__ void store(A* __restrict__ Bs, const A (&r)[E]) const {
#pragma unroll
    for (int j = 0; j < E; ++j) Bs[bk * CFG::LDB + bn + CS * j] = r[j];
  }
};

// This block's tile of a forward-like problem (both policies): grid x over M tiles, grid y
// over groups * N tiles, grid z over the split-K slices of p.kchunk reduction indices.
template <typename I, class CFG>
struct gc_fp_tile {
  int T, Kred, grp, n0, k_begin, k_end, steps;
  I M, m0;
  __device__ __forceinline__ gc_fp_tile(const gc_fp& p) {
    T = p.TD * p.TH * p.TW;
    Kred = p.Cg * T;
    M = (I)p.Nimg * p.MD * p.MH * p.MW;
    const int ntiles = (p.Ng + CFG::BN - 1) / CFG::BN;
    grp = blockIdx.y / ntiles;
    n0 = (blockIdx.y % ntiles) * CFG::BN;
    m0 = (I)blockIdx.x * CFG::BM;
    k_begin = blockIdx.z * p.kchunk;
    k_end = gc_min(Kred, k_begin + p.kchunk);
    steps = k_end > k_begin ? (k_end - k_begin + CFG::BK - 1) / CFG::BK : 0;
  }
};

// Shared bytes of the engine's tiles (two stages of A and B) before the tap table.
template <class CFG, typename A>
struct gc_igemm_smem {
  enum { TILE_ELEMS = 2 * CFG::BK * (CFG::LDA + CFG::LDB), BYTES = TILE_ELEMS * (int)sizeof(A) };
};

// The main loop shared by every problem: double-buffered shared tiles, global loads of
// the next step in registers while the current one is multiplied, one barrier a step.
// Stage s of A lives at As + s*BK*LDA (s = step & 1).
template <class CFG, typename A, class AIt, class BIt, class LoadA, class LoadB>
__device__ __forceinline__ void gc_igemm_mainloop(A* As, A* Bs, AIt& ita, BIt& itb, LoadA la,
                                                  LoadB lb, int steps, A (&acc)[8][8], int tm,
                                                  int tn) {
  A ra[AIt::E], rb[BIt::E];
  if (steps > 0) {
    la(ra, 0);
    lb(rb, 0);
    ita.store(As, ra);
    itb.store(Bs, rb);
  }
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int cur = s & 1;
    if (s + 1 < steps) {  // next step's global loads in flight during this multiply
      la(ra, s + 1);
      lb(rb, s + 1);
    }
    gc_simt_mma<CFG>(As + cur * CFG::BK * CFG::LDA, Bs + cur * CFG::BK * CFG::LDB, acc, tm, tn);
    if (s + 1 < steps) {  // the other stage: last read before the previous barrier
      ita.store(As + (cur ^ 1) * CFG::BK * CFG::LDA, ra);
      itb.store(Bs + (cur ^ 1) * CFG::BK * CFG::LDB, rb);
    }
    __syncthreads();
  }
}

template <typename T, typename I, class CFG>
__device__ __forceinline__ void gc_igemm_fp(const T* __restrict__ src, const T* __restrict__ wt,
                                            const T* __restrict__ bias, T* __restrict__ out,
                                            typename gc_acc<T>::type* __restrict__ partial,
                                            const gc_fp p, int has_bias, int split) {
  typedef typename gc_acc<T>::type A;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  A* As = reinterpret_cast<A*>(gc_smem);    // [2][BK][LDA]
  A* Bs = As + 2 * CFG::BK * CFG::LDA;      // [2][BK][LDB]
  int* tab = reinterpret_cast<int*>(Bs + 2 * CFG::BK * CFG::LDB);  // [T][GC_TAP_INTS]
  const gc_fp_tile<I, CFG> bt(p);
  const int T_ = bt.T, Kred = bt.Kred, grp = bt.grp, n0 = bt.n0;
  const int k_begin = bt.k_begin, k_end = bt.k_end, steps = bt.steps;
  const I M = bt.M, m0 = bt.m0;
  const int tid = threadIdx.x;

  gc_fp_taps(tab, p, T_, tid, CFG::NT);
  int tm, tn;
  gc_simt_thread<CFG>(tid, tm, tn);
  A acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = A(0);
  __syncthreads();  // tap table ready
  gc_fp_a_iter<T, I, A, CFG> ita;
  gc_fp_b_iter<T, I, A, CFG> itb;
  ita.init(src, tab, p, grp, m0, M, k_begin, tid);
  itb.init(wt, tab, p, grp, n0, k_begin, tid);

  gc_igemm_mainloop<CFG, A>(
      As, Bs, ita, itb,
      [&](A (&r)[gc_fp_a_iter<T, I, A, CFG>::E], int s) {
        ita.load(r, tab, p, k_begin + s * CFG::BK, k_end);
      },
      [&](A (&r)[gc_fp_b_iter<T, I, A, CFG>::E], int s) {
        itb.load(r, tab, p, k_begin + s * CFG::BK, k_end);
      },
      steps, acc, tm, tn);

  // epilogue: out[img, grp*Ng + n, E(m)]
  const I esp = (I)p.ED * p.EH * p.EW;
  const I total = (I)p.Nimg * p.Cout * esp;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const I m = m0 + gc_simt_row<CFG>(tm, i);
    if (m >= M) continue;
    const I rowbase = gc_fp_out_row<I>(p, m, grp, esp);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = n0 + gc_simt_col<CFG>(tn, j);
      if (n >= p.Ng) continue;
      const I idx = rowbase + (I)n * esp;
      if (split) {
        partial[(I)blockIdx.z * total + idx] = acc[i][j];
      } else {
        A v = acc[i][j];
        if (has_bias) v += (A)gc_load(bias + grp * p.Ng + n);
        gc_store(out + idx, v);
      }
    }
  }
}

// ---- weight gradient: M = K (per group), N = Cg*taps, K = N*P*Q --------------------------
// A operand: grad_out rows, k-fast (consecutive threads read consecutive positions).
template <typename T, typename I, typename A, class CFG>
struct gc_wg_a_iter {
  enum { E = CFG::BM * CFG::BK / CFG::NT, CS = CFG::NT / CFG::BK };
  const T* __restrict__ gy;
  I base, img, o, osp, s_o;
  I s_img;
  int ak, am, mlim;

  __device__ __forceinline__ void init(const T* __restrict__ g_, const gc_geo& g, int grp, int m0,
                                       I r_begin, int tid) {
    gy = g_;
    ak = tid % CFG::BK;
    am = tid / CFG::BK;
    mlim = g.Kg - m0;
    osp = (I)g.OD * g.OH * g.OW;
    base = ((I)grp * g.Kg + m0 + am) * osp;
    const I r = r_begin + ak;
    img = r / osp;
    o = r - img * osp;
    s_img = CFG::BK / osp;
    s_o = CFG::BK % osp;
  }

  __device__ __forceinline__ void load(A (&r)[E], const gc_geo& g, I r0, I r_end) {
    const bool kv = r0 + ak < r_end;
    const I off = base + img * g.K * osp + o;
#pragma unroll
    for (int i = 0; i < E; ++i)
      r[i] = (kv && am + CS * i < mlim) ? (A)gc_load(gy + (off + (I)(CS * i) * osp)) : A(0);
    o += s_o;
    img += s_img;
    if (o >= osp) { o -= osp; ++img; }
  }

  __device__ __forceinline__ void store(A* __restrict__ As, const A (&r)[E]) const {
#pragma unroll
    for (int i = 0; i < E; ++i) As[ak * CFG::LDA + am + CS * i] = r[i];
  }
};

// B operand: the input gathered; thread owns column bn = (c, kd, kh, kw) (n-fast) and
// positions bk + (NT/BN)*j, kept as (n, od, oh, ow) digits.
template <typename T, typename I, typename A, class CFG>
struct gc_wg_b_iter {
  enum { E = CFG::BN * CFG::BK / CFG::NT, RS = CFG::NT / CFG::BN };
  const T* __restrict__ x;
  I xc, cdhw;
  int bn, bk, dkd, dkh, dkw;
  bool nvalid;
  gc_opos pos[E];
  gc_opos step;

  __device__ __forceinline__ void init(const T* __restrict__ x_, const gc_geo& g, int grp, int n0,
                                       I r_begin, int tid) {
    x = x_;
    bn = tid % CFG::BN;
    bk = tid / CFG::BN;
    const int taps = g.KD * g.KH * g.KW;
    const int ncol = n0 + bn;
    nvalid = ncol < g.Cg * taps;
    int c = 0, kd = 0, kh = 0, kw = 0;
    if (nvalid) {
      c = ncol / taps;
      int t = ncol - c * taps;
      kw = t % g.KW; t /= g.KW;
      kh = t % g.KH;
      kd = t / g.KH;
    }
    const I dhw = (I)g.D * g.H * g.W;
    cdhw = (I)g.C * dhw;
    xc = ((I)grp * g.Cg + c) * dhw;
    dkd = kd * g.dd - g.pd;
    dkh = kh * g.dh - g.ph;
    dkw = kw * g.dw - g.pw;
    step = gc_opos_of(CFG::BK, g);
#pragma unroll
    for (int j = 0; j < E; ++j) pos[j] = gc_opos_of(r_begin + bk + RS * j, g);
  }

  __device__ __forceinline__ void load(A (&r)[E], const gc_geo& g, I r0, I r_end) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      A v = A(0);
      if (nvalid && r0 + bk + RS * j < r_end) {
        const int id = pos[j].d * g.sd + dkd;
        const int ih = pos[j].h * g.sh + dkh;
        const int iw = pos[j].w * g.sw + dkw;
        if ((unsigned)id < (unsigned)g.D && (unsigned)ih < (unsigned)g.H &&
            (unsigned)iw < (unsigned)g.W)
          v = (A)gc_load(x + ((I)pos[j].n * cdhw + xc + ((I)id * g.H + ih) * g.W + iw));
      }
      r[j] = v;
      gc_opos_add(pos[j], step, g);
    }
  }

  __device__ __forceinline__ void store(A* __restrict__ Bs, const A (&r)[E]) const {
#pragma unroll
    for (int j = 0; j < E; ++j) Bs[(bk + RS * j) * CFG::LDB + bn] = r[j];
  }
};

template <typename T, typename I, class CFG>
__device__ __forceinline__ void gc_igemm_wg(const T* __restrict__ x, const T* __restrict__ gy,
                                            typename gc_acc<T>::type* __restrict__ partial,
                                            const gc_geo g, I chunk) {
  typedef typename gc_acc<T>::type A;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  A* As = reinterpret_cast<A*>(gc_smem);
  A* Bs = As + 2 * CFG::BK * CFG::LDA;
  const int taps = g.KD * g.KH * g.KW;
  const int Nn = g.Cg * taps;
  const I red = (I)g.N * g.OD * g.OH * g.OW;
  const int mtiles = (g.Kg + CFG::BM - 1) / CFG::BM;
  const int grp = blockIdx.y / mtiles;
  const int m0 = (blockIdx.y % mtiles) * CFG::BM;
  const int n0 = blockIdx.x * CFG::BN;
  const I r_begin = (I)blockIdx.z * chunk;
  const I r_end = r_begin + chunk < red ? r_begin + chunk : red;
  const int steps = r_end > r_begin ? (int)((r_end - r_begin + CFG::BK - 1) / CFG::BK) : 0;
  const int tid = threadIdx.x;

  gc_wg_a_iter<T, I, A, CFG> ita;
  gc_wg_b_iter<T, I, A, CFG> itb;
  ita.init(gy, g, grp, m0, r_begin, tid);
  itb.init(x, g, grp, n0, r_begin, tid);
  int tm, tn;
  gc_simt_thread<CFG>(tid, tm, tn);
  A acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = A(0);

  gc_igemm_mainloop<CFG, A>(
      As, Bs, ita, itb,
      [&](A (&r)[gc_wg_a_iter<T, I, A, CFG>::E], int s) {
        ita.load(r, g, r_begin + (I)s * CFG::BK, r_end);
      },
      [&](A (&r)[gc_wg_b_iter<T, I, A, CFG>::E], int s) {
        itb.load(r, g, r_begin + (I)s * CFG::BK, r_end);
      },
      steps, acc, tm, tn);

  A* outp = partial + (I)blockIdx.z * g.K * Nn;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = m0 + gc_simt_row<CFG>(tm, i);
    if (m >= g.Kg) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = n0 + gc_simt_col<CFG>(tn, j);
      if (n < Nn) outp[((I)grp * g.Kg + m) * Nn + n] = acc[i][j];
    }
  }
}

// ---- tensor-op warp-MMA policy: float16 / bfloat16, and float32 as TF32 -------------------
// (The weight grad's tensor-op GEMM, gc_igemm_wg_tc below, runs the same main loop.)
// Same GEMM view, tap table and tap-major reduction (k = t*Cg + c) as gc_igemm_fp: the
// forward, and each stride phase of the input grad (grad_out gathered, the weight
// transposed/flipped to the phase's taps); the weight is first reordered
// (gc_igemm_wreorder) so that one GEMM column's row is contiguous along k, read as
// wr[(grp*Ng + n)*Kred + k], and can be copied with cp.async.  Per BK = 16 step:
//   * B (weight) tile [BN][LDB] (k fast, LDB = BK + 8 halves: 48-byte rows, the 8 rows an
//     ldmatrix phase reads start in 8 different 4-bank groups: no conflicts), filled by
//     cp.async of 16, 8 or 4 bytes (the widest the alignment of Cg*T allows; zero-fill
//     past the reduction end and for columns past Ng) or, when Cg*T is odd, by plain
//     element loads and shared stores;
//   * A (gathered input) tile [BK][LDA] (m fast, LDA = BM + 8: 16-byte rows of 8
//     positions, row stride 272 / 144 bytes, conflict-free ldmatrix phases): NCHW gives
//     no contiguous, aligned run along the reduction (c, tap) and only stride-1 runs
//     along m, so the gather is element-granular: plain 16-bit loads into registers,
//     issued one step ahead of use, stored to shared after the step's MMAs (no cp.async:
//     a 4-byte copy would need 2 aligned, in-bounds neighbours, which padding and
//     stride break); zero for padding / out-of-range;
//   * NS = 3 shared stages, one barrier per step: B copies run two steps ahead
//     (cp.async.wait_group 1), A one step ahead in registers;
//   * fragments: A by ldmatrix.x4.trans of the k-major tile, B by ldmatrix.x4 of the
//     n-major tile; mma.sync m16n8k16, float32 accumulators (TF32: BK = 8 32-bit values,
//     the same 32-byte B rows, A fragments by LDS.32, m16n8k8; operands rounded by
//     cvt.rna in the gather and in the weight reorder);
//   * epilogue: bias added in float32, one rounding (or raw float32 partials under
//     split-K, summed by gc_igemm_reduce).
// ESZ: operand element bytes in shared memory -- 2 (float16/bfloat16: m16n8k16) or 4
// (float32 as TF32: m16n8k8).  One k-step of the MMA per stage: BK = 16 halves or 8 TF32
// values, 32 bytes of a row either way; E is the element's storage type.
template <int ESZ> struct gc_tc_elem { typedef unsigned short type; };
template <> struct gc_tc_elem<4> { typedef unsigned type; };
template <int BM_, int BN_, int WM_, int WN_, int ESZ_ = 2>
struct gc_tc_cfg {
  typedef typename gc_tc_elem<ESZ_>::type E;
  enum {
    ESZ = ESZ_, BM = BM_, BN = BN_, BK = 32 / ESZ_, LOG_BK = ESZ_ == 2 ? 4 : 3, NS = 3,
    MAX_LV = ESZ_ == 2 ? 3 : 2,    // log2 of the elements of a 16-byte copy
    WM = WM_, WN = WN_, NT = 32 * WM * WN,
    WTM = BM / WM, WTN = BN / WN,  // warp tile
    MI = WTM / 16, NJ = WTN / 8,   // mma tiles per warp
    LDA = BM + 8, LDB = BK + 16 / ESZ_,  // shared row strides (elements; B rows 48 bytes)
    A_ST = BK * LDA, B_ST = BN * LDB,  // stage sizes (elements)
    AE = BM * BK / NT, ARS = NT / BM   // A loader: elements a thread, k rows apart
  };
  static_assert(MI >= 1 && NJ % 2 == 0, "warp tile: m16 x (2 n8) multiples");
  static_assert(NT % BM == 0 && AE * ARS == BK, "A loader mapping");
  static_assert((LDA * ESZ) % 16 == 0 && (LDB * ESZ) % 16 == 0, "16-byte ldmatrix rows");
};
typedef gc_tc_cfg<128, 128, 2, 4> gc_tc_l;  // 256 threads, warp tile 64 x 32
typedef gc_tc_cfg<64, 64, 2, 2> gc_tc_s;    // 128 threads, warp tile 32 x 32
// TF32 (float32 under precision "high"): the same tiles, 8-deep k-steps of 32-bit values
typedef gc_tc_cfg<128, 128, 2, 4, 4> gc_tc32_l;
typedef gc_tc_cfg<64, 64, 2, 2, 4> gc_tc32_s;
template <typename T, class CFG> struct gc_tc_cfg_for { typedef CFG type; };
template <> struct gc_tc_cfg_for<float, gc_tc_l> { typedef gc_tc32_l type; };
template <> struct gc_tc_cfg_for<float, gc_tc_s> { typedef gc_tc32_s type; };

template <typename T> struct gc_tc_mma;
template <> struct gc_tc_mma<gc_half> {
  static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2]) {
    gc_mma_m16n8k16_f16(d, a, b, d);
  }
};
template <> struct gc_tc_mma<gc_bf16> {
  static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2]) {
    gc_mma_m16n8k16_bf16(d, a, b, d);
  }
};
template <> struct gc_tc_mma<float> {  // operands already TF32 (rounded by gc_f32_to_tf32)
  static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2]) {
    gc_mma_m16n8k8_tf32(d, a, b, d);
  }
};

// Storage type of a tensor-op operand in global memory (S) and what reaches shared memory
// (the gather's register type, CFG::E): half types move their 16-bit patterns unconverted;
// float32 is rounded to TF32 (cvt.rna) on the way (gc_gather_read<unsigned, float>), and
// its reordered weight holds TF32 values already (gc_tc_prep).
template <typename T> struct gc_tc_src { typedef unsigned short type; };
template <> struct gc_tc_src<float> { typedef float type; };
template <typename T>
__device__ __forceinline__ T gc_tc_prep(T v) { return v; }
template <>
__device__ __forceinline__ float gc_tc_prep<float>(float v) {
  return __uint_as_float(gc_f32_to_tf32(v));
}

// A operand of the tensor-op forward: the same gather as the SIMT forward, moving the
// 16-bit patterns unconverted (or rounding float32 to TF32).
template <typename T, typename I, class CFG>
using gc_tc_a_iter = gc_gather_a_iter<typename gc_tc_src<T>::type, typename CFG::E, I, CFG::AE,
                                      CFG::ARS, CFG>;

// The weight reordered for the tensor-op policy, for any forward-like problem p (the
// forward, or one stride phase of the input grad): wr[((grp*Ng + n)*T + t)*Cg + c] =
// w[grp*wg + n*wn + c*wc + wtap(t)], wtap(t) the weight tap of reduction tap t (the same
// mapping as the tap table), so that each GEMM column's row becomes contiguous along the
// tap-major reduction index k = t*Cg + c.  Forward: [K][taps][C/G] (a transpose of the
// last two dims); input grad: per phase [G][C/G][phase taps][K/G], the transposed weight
// restricted to the phase's taps, flipped where the tap order runs backwards (tb < 0).
// One pass over the (small) weight per call and phase; float32 is rounded to TF32 here.
template <typename T>
__device__ __forceinline__ void gc_igemm_wreorder(const T* __restrict__ w, T* __restrict__ wr,
                                                  const gc_fp p, long long total) {
  const int T_ = p.TD * p.TH * p.TW;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(e % p.Cg);
    const long long r = e / p.Cg;
    const int t = (int)(r % T_);
    const long long o = r / T_;  // grp*Ng + n
    const int n = (int)(o % p.Ng), grp = (int)(o / p.Ng);
    const int tw = t % p.TW, th = (t / p.TW) % p.TH, td = t / (p.TW * p.TH);
    const int wtap = ((p.trd + p.tsd * td) * p.KH + (p.trh + p.tsh * th)) * p.KW +
                     (p.trw + p.tsw * tw);
    wr[e] = gc_tc_prep(w[(long long)grp * p.wg + (long long)n * p.wn + (long long)c * p.wc + wtap]);
  }
}

// Widest copy (log2 elements, <= CFG::MAX_LV: 16 bytes) that keeps every copy of rows
// `a` elements apart aligned (a: the row stride, or'ed with anything else that must be).
template <class CFG>
__device__ __forceinline__ int gc_tc_copy_lv(unsigned long long a) {
  int lv = CFG::MAX_LV;
  while (lv > 0 && (a & ((1ull << lv) - 1))) --lv;
  return lv;
}

// One copy of `left` (<= 1 << lv; <= 0: none, zero-fill) elements into shared memory:
// cp.async of ESZ << lv = 16, 8 or 4 bytes, or a plain 16-bit load (halves, lv = 0).
template <class CFG>
__device__ __forceinline__ void gc_tc_copy(typename CFG::E* d, const typename CFG::E* s,
                                           int left, int lv) {
  const int bytes = left > 0 ? CFG::ESZ * left : 0;
  const int width = CFG::ESZ << lv;
  if (width == 16) gc_cp_async_16(d, s, bytes);
  else if (width == 8) gc_cp_async_8(d, s, bytes);
  else if (width == 4) gc_cp_async_4(d, s, bytes);
  else *d = left > 0 ? *s : (typename CFG::E)0;
}

// B operand (the weight rows, contiguous along k): one stage's copies.  lv = log2 of the
// elements per copy (gc_tc_copy_lv of the row length Cg*T).
template <typename I, class CFG>
__device__ __forceinline__ void gc_tc_load_b(typename CFG::E* __restrict__ Bs,
                                             const typename CFG::E* __restrict__ wt, I wbase,
                                             I wn, int nlim, int k0, int k_end, int lv,
                                             int tid) {
  const int per_row_shift = CFG::LOG_BK - lv;  // copies per row = BK >> lv
  const int copies = CFG::BN << per_row_shift;
  for (int e = tid; e < copies; e += CFG::NT) {
    const int n = e >> per_row_shift;
    const int kk = (e & ((1 << per_row_shift) - 1)) << lv;
    const int k = k0 + kk;
    const bool nv = n < nlim;
    const int left = nv ? gc_min(k_end - k, 1 << lv) : 0;  // elements to read
    gc_tc_copy<CFG>(Bs + n * CFG::LDB + kk, wt + (left > 0 ? wbase + (I)n * wn + k : (I)0),
                    left, lv);
  }
}

// The tensor-op main loop of every tensor-op problem (forward-like and weight grad), into
// the accumulators it zeroes: NS shared stages, one barrier per step.  Operand A is
// gathered into registers one step ahead (la(s): global -> registers for step s;
// sa(stage): registers -> shared, after the step's MMAs), operand B copied by cp.async
// NS-1 steps ahead (lb(stage, s); ROUND_B: its float32 fragments rounded to TF32 after
// ldmatrix, for a B that cannot be pre-rounded).  A tile [BK][LDA] (m fast) read by
// ldmatrix.x4.trans (TF32: 32-bit elements, four conflict-free LDS.32 per fragment,
// LDA = 8 mod 32 banks), B tile [BN][LDB] (k fast) by ldmatrix.x4.
template <typename T, class CFG, bool ROUND_B = false, class LoadA, class StoreA, class LoadB>
__device__ __forceinline__ void gc_tc_mainloop(typename CFG::E* As, typename CFG::E* Bs,
                                               float (&acc)[CFG::MI][CFG::NJ][4], int steps,
                                               LoadA la, StoreA sa, LoadB lb, int lane, int wm,
                                               int wn) {
#pragma unroll
  for (int i = 0; i < CFG::MI; ++i)
#pragma unroll
    for (int j = 0; j < CFG::NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
  // prologue: stages 0 .. NS-2 (A stored directly, B copies committed one group a stage)
#pragma unroll
  for (int s = 0; s < CFG::NS - 1; ++s) {
    if (s < steps) {
      la(s);
      sa(As + s * CFG::A_ST);
      lb(Bs + s * CFG::B_ST, s);
    }
    gc_cp_async_commit();
  }
  // lane's ldmatrix row addresses (halves, within a stage)
  const int li = lane >> 3, lr = lane & 7;
  const int a_off = (lr + (li >> 1) * 8) * CFG::LDA + wm * CFG::WTM + (li & 1) * 8;
  const int a_off32 = (lane & 3) * CFG::LDA + wm * CFG::WTM + (lane >> 2);  // TF32: A[g][t]
  const int b_off = (wn * CFG::WTN + (li >> 1) * 8 + lr) * CFG::LDB + (li & 1) * (CFG::BK / 2);

  for (int s = 0; s < steps; ++s) {
    const int cur = s % CFG::NS;
    const int nxt = (s + CFG::NS - 1) % CFG::NS;  // the stage read at step s-1
    gc_cp_async_wait<CFG::NS - 2>();  // this thread's copies of step s have landed
    __syncthreads();                  // ... everyone's; and step s-1's reads are done
    const bool more = s + CFG::NS - 1 < steps;
    if (more) {
      lb(Bs + nxt * CFG::B_ST, s + CFG::NS - 1);
      la(s + CFG::NS - 1);  // in flight during the MMAs below
    }
    gc_cp_async_commit();
    const typename CFG::E* as = As + cur * CFG::A_ST;
    const typename CFG::E* bs = Bs + cur * CFG::B_ST;
    unsigned af[CFG::MI][4], bf[CFG::NJ][2];
#pragma unroll
    for (int i = 0; i < CFG::MI; ++i) {
      if (CFG::ESZ == 2) {
        gc_ldmatrix_x4_trans(af[i], as + a_off + i * 16);
      } else {  // a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
        const typename CFG::E* q = as + a_off32 + i * 16;
        af[i][0] = q[0];
        af[i][1] = q[8];
        af[i][2] = q[4 * CFG::LDA];
        af[i][3] = q[4 * CFG::LDA + 8];
      }
    }
#pragma unroll
    for (int j = 0; j < CFG::NJ; j += 2) {
      unsigned r[4];
      gc_ldmatrix_x4(r, bs + b_off + j * 8 * CFG::LDB);
      bf[j][0] = r[0];
      bf[j][1] = r[1];
      bf[j + 1][0] = r[2];
      bf[j + 1][1] = r[3];
    }
    if (ROUND_B)  // B copied as float32 (TF32 weight grad): cvt.rna each fragment register
#pragma unroll
      for (int j = 0; j < CFG::NJ; ++j) {
        bf[j][0] = gc_f32_to_tf32(__uint_as_float(bf[j][0]));
        bf[j][1] = gc_f32_to_tf32(__uint_as_float(bf[j][1]));
      }
#pragma unroll
    for (int i = 0; i < CFG::MI; ++i)
#pragma unroll
      for (int j = 0; j < CFG::NJ; ++j) gc_tc_mma<T>::run(acc[i][j], af[i], bf[j]);
    if (more) sa(As + nxt * CFG::A_ST);
  }
  gc_cp_async_wait<0>();  // no copy outlives the block (only empty groups remain)
}

template <typename T, typename I, class CFG>
__device__ __forceinline__ void gc_igemm_fp_tc(const T* __restrict__ src_, const T* __restrict__ wt_,
                                               const T* __restrict__ bias, T* __restrict__ out,
                                               float* __restrict__ partial, const gc_fp p,
                                               int has_bias, int split) {
  typedef typename CFG::E E;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  E* As = reinterpret_cast<E*>(gc_smem);                         // [NS][BK][LDA]
  E* Bs = As + CFG::NS * CFG::A_ST;                              // [NS][BN][LDB]
  int* tab = reinterpret_cast<int*>(Bs + CFG::NS * CFG::B_ST);   // [T][GC_TAP_INTS]
  const typename gc_tc_src<T>::type* src = reinterpret_cast<const typename gc_tc_src<T>::type*>(src_);
  const E* wt = reinterpret_cast<const E*>(wt_);
  const gc_fp_tile<I, CFG> bt(p);
  const int T_ = bt.T, Kred = bt.Kred, grp = bt.grp, n0 = bt.n0;
  const int k_begin = bt.k_begin, k_end = bt.k_end, steps = bt.steps;
  const I M = bt.M, m0 = bt.m0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / CFG::WN, wn = warp % CFG::WN;
  // widest copy the weight's alignment allows (k_begin is a multiple of BK)
  const int lv = gc_tc_copy_lv<CFG>((unsigned long long)Kred);
  // the reordered weight (gc_igemm_wreorder): column n's row at (grp*Ng + n) * Kred
  const I wbase = ((I)grp * p.Ng + n0) * Kred;
  const I wnI = Kred;
  const int nlim = p.Ng - n0;

  gc_fp_taps(tab, p, T_, tid, CFG::NT);
  float acc[CFG::MI][CFG::NJ][4];  // zeroed by gc_tc_mainloop
  __syncthreads();  // tap table ready
  gc_tc_a_iter<T, I, CFG> ita;
  ita.init(src, tab, p, grp, m0, M, k_begin, tid);
  E ra[gc_tc_a_iter<T, I, CFG>::E];
  gc_tc_mainloop<T, CFG>(
      As, Bs, acc, steps,
      [&](int s) { ita.load(ra, tab, p, k_begin + s * CFG::BK, k_end); },
      [&](E* st) { ita.store(st, ra); },
      [&](E* st, int s) {
        gc_tc_load_b<I, CFG>(st, wt, wbase, wnI, nlim, k_begin + s * CFG::BK, k_end, lv, tid);
      },
      lane, wm, wn);

  // epilogue: C fragment c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8)
  const I esp = (I)p.ED * p.EH * p.EW;
  const I total = (I)p.Nimg * p.Cout * esp;
#pragma unroll
  for (int i = 0; i < CFG::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const I m = m0 + wm * CFG::WTM + i * 16 + (lane >> 2) + 8 * h;
      if (m >= M) continue;
      const I rowbase = gc_fp_out_row<I>(p, m, grp, esp);
#pragma unroll
      for (int j = 0; j < CFG::NJ; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n0 + wn * CFG::WTN + j * 8 + 2 * (lane & 3) + q;
          if (n >= p.Ng) continue;
          const I idx = rowbase + (I)n * esp;
          float v = acc[i][j][2 * h + q];
          if (split) {
            partial[(I)blockIdx.z * total + idx] = v;
          } else {
            if (has_bias) v += gc_load(bias + grp * p.Ng + n);
            gc_store(out + idx, v);
          }
        }
    }
}

// ---- tensor-op weight grad: float16 / bfloat16 -------------------------------------------
// The weight grad's GEMM with its operands' roles swapped so that it is the same main loop
// as the forward (gc_tc_mainloop): C'[M' = Cg*taps, N' = Kg] = A'[M', K = N*P*Q] * B'[K, N']
// per group, the transpose of wgrad's C[K/G, Cg*taps] -- the epilogue writes it back
// transposed, as float32 partial sums of the split-K slice (blockIdx.z), which the
// fixed-order gc_igemm_reduce adds and rounds once.
//   * A' (the input, gathered): thread owns reduction row ak = k - k0 (k fast: consecutive
//     threads read consecutive output positions, hence consecutive inputs at stride 1) as
//     (n, od, oh, ow) digits stepped by BK with carries (gc_opos_add, no division), and the
//     GEMM rows am + (NT/BK)*i, whose (c, tap) come from a column table in shared memory
//     (input offset, tap offsets per dim; rows past Cg*taps get an offset that fails every
//     bounds check); element loads one step ahead, zero for padding;
//   * B' (grad_out rows, contiguous along N*P*Q within an image): cp.async of 16, 8 or 4
//     bytes (the widest P*Q's and the address's alignment allow: a copy never crosses an
//     image) or plain loads (P*Q odd); the thread's copy column kk is fixed, its (image,
//     position) digits
//     stepped by BK with one carry.
#define GC_WGC_INTS 4  // column-table entry: channel c, tap offsets dz, dy, dx

template <typename S, typename I, class CFG>
struct gc_wgtc_a_iter {
  typedef typename CFG::E E_;
  enum { E = CFG::BM * CFG::BK / CFG::NT, CS = CFG::NT / CFG::BK };
  const S* __restrict__ x;
  I base, cdhw, dhw;
  int ak, am;
  gc_opos pos, step;

  __device__ __forceinline__ void init(const S* __restrict__ x_, const gc_geo& g,
                                       int grp, I r_begin, int tid) {
    x = x_;
    ak = tid % CFG::BK;
    am = tid / CFG::BK;
    dhw = (I)g.D * g.H * g.W;
    cdhw = (I)g.C * dhw;
    base = (I)grp * g.Cg * dhw;
    pos = gc_opos_of(r_begin + ak, g);
    step = gc_opos_of(CFG::BK, g);
  }

  __device__ __forceinline__ void load(E_ (&r)[E], const int* col, const gc_geo& g,
                                       I r0, I r_end) {
    const bool kv = r0 + ak < r_end;
    const int z0 = pos.d * g.sd, y0 = pos.h * g.sh, x0 = pos.w * g.sw;
    const I b = base + (I)pos.n * cdhw + ((I)z0 * g.H + y0) * g.W + x0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int* e = col + GC_WGC_INTS * (am + CS * i);
      const int z = z0 + e[1], y = y0 + e[2], xx = x0 + e[3];
      const bool in = kv && (unsigned)z < (unsigned)g.D && (unsigned)y < (unsigned)g.H &&
                      (unsigned)xx < (unsigned)g.W;
      r[i] = in ? gc_gather_read<E_>(x + (b + (I)e[0] * dhw + ((I)e[1] * g.H + e[2]) * g.W + e[3]))
                : E_(0);
    }
    gc_opos_add(pos, step, g);
  }

  __device__ __forceinline__ void store(E_* __restrict__ As, const E_ (&r)[E]) const {
#pragma unroll
    for (int i = 0; i < E; ++i) As[ak * CFG::LDA + am + CS * i] = r[i];
  }
};

// B': grad_out rows of output channels n0 + n, one stage's copies (lv as gc_tc_load_b).
template <typename I, class CFG>
struct gc_wgtc_b_iter {
  const typename CFG::E* __restrict__ gy;
  I rowbase, img, o, osp, kstride;
  I s_img, s_o;
  int kk, n_first, nlim, lv, shift;

  __device__ __forceinline__ void init(const typename CFG::E* __restrict__ gy_, const gc_geo& g,
                                       int grp, int n0, I r_begin, int tid) {
    gy = gy_;
    osp = (I)g.OD * g.OH * g.OW;
    // widest copy that P*Q and the tensor's address allow (a caller's view may start
    // anywhere)
    lv = gc_tc_copy_lv<CFG>((unsigned long long)osp | (reinterpret_cast<unsigned long long>(gy_) / CFG::ESZ));
    shift = CFG::LOG_BK - lv;  // copies per row = BK >> lv
    kk = (tid & ((1 << shift) - 1)) << lv;
    n_first = tid >> shift;
    nlim = g.Kg - n0;
    kstride = (I)g.K * osp;  // one image further
    rowbase = ((I)grp * g.Kg + n0) * osp;
    const I r = r_begin + kk;
    img = r / osp;
    o = r - img * osp;
    s_img = CFG::BK / osp;
    s_o = CFG::BK % osp;
  }

  __device__ __forceinline__ void load(typename CFG::E* __restrict__ Bs, I r0, I r_end) {
    const I k = r0 + kk;
    const I left_ = r_end - k;
    const int left = left_ <= 0 ? 0 : left_ < (1 << lv) ? (int)left_ : (1 << lv);
    const I off = rowbase + img * kstride + o;
    for (int n = n_first; n < CFG::BN; n += CFG::NT >> shift) {
      const int cnt = n < nlim ? left : 0;
      gc_tc_copy<CFG>(Bs + n * CFG::LDB + kk, gy + (cnt > 0 ? off + (I)n * osp : (I)0), cnt, lv);
    }
    o += s_o;
    img += s_img;
    if (o >= osp) { o -= osp; ++img; }
  }
};

template <typename T, typename I, class CFG>
__device__ __forceinline__ void gc_igemm_wg_tc(const T* __restrict__ x_, const T* __restrict__ gy_,
                                               float* __restrict__ partial, const gc_geo g,
                                               I chunk) {
  typedef typename CFG::E E;
  typedef typename gc_tc_src<T>::type S;
  extern __shared__ __align__(16) unsigned char gc_smem[];
  E* As = reinterpret_cast<E*>(gc_smem);                        // [NS][BK][LDA]
  E* Bs = As + CFG::NS * CFG::A_ST;                             // [NS][BN][LDB]
  int* col = reinterpret_cast<int*>(Bs + CFG::NS * CFG::B_ST);  // [BM][GC_WGC_INTS]
  const S* x = reinterpret_cast<const S*>(x_);
  const E* gy = reinterpret_cast<const E*>(gy_);
  const int taps = g.KD * g.KH * g.KW;
  const int Mr = g.Cg * taps;  // GEMM rows (c, tap) = the weight's inner index
  const I red = (I)g.N * g.OD * g.OH * g.OW;
  const int ntiles = (g.Kg + CFG::BN - 1) / CFG::BN;
  const int grp = blockIdx.y / ntiles;
  const int n0 = (blockIdx.y % ntiles) * CFG::BN;
  const int m0 = blockIdx.x * CFG::BM;
  const I r_begin = (I)blockIdx.z * chunk;
  const I r_end = r_begin + chunk < red ? r_begin + chunk : red;
  const int steps = r_end > r_begin ? (int)((r_end - r_begin + CFG::BK - 1) / CFG::BK) : 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / CFG::WN, wn = warp % CFG::WN;

  for (int m = tid; m < CFG::BM; m += CFG::NT) {  // column table of this block's rows
    int* e = col + GC_WGC_INTS * m;
    const int r = m0 + m;
    if (r < Mr) {
      const int c = r / taps;
      int t = r - c * taps;
      const int kw = t % g.KW; t /= g.KW;
      const int kh = t % g.KH, kd = t / g.KH;
      e[0] = c;
      e[1] = kd * g.dd - g.pd;
      e[2] = kh * g.dh - g.ph;
      e[3] = kw * g.dw - g.pw;
    } else {
      e[0] = 0;
      e[1] = -(1 << 30);  // fails every bounds check: the row reads nothing
      e[2] = e[3] = 0;
    }
  }
  float acc[CFG::MI][CFG::NJ][4];  // zeroed by gc_tc_mainloop
  __syncthreads();  // column table ready
  gc_wgtc_a_iter<S, I, CFG> ita;
  gc_wgtc_b_iter<I, CFG> itb;
  ita.init(x, g, grp, r_begin, tid);
  itb.init(gy, g, grp, n0, r_begin, tid);
  E ra[gc_wgtc_a_iter<S, I, CFG>::E];
  // TF32: grad_out arrives by cp.async as float32 and is rounded in its fragments
  gc_tc_mainloop<T, CFG, CFG::ESZ == 4>(
      As, Bs, acc, steps,
      [&](int s) { ita.load(ra, col, g, r_begin + (I)s * CFG::BK, r_end); },
      [&](E* st) { ita.store(st, ra); },
      [&](E* st, int s) { itb.load(st, r_begin + (I)s * CFG::BK, r_end); },
      lane, wm, wn);

  // epilogue: C'[m][n] = grad_w[grp*Kg + n][m] of slice blockIdx.z
  float* outp = partial + (I)blockIdx.z * g.K * Mr;
#pragma unroll
  for (int i = 0; i < CFG::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * CFG::WTM + i * 16 + (lane >> 2) + 8 * h;
      if (m >= Mr) continue;
#pragma unroll
      for (int j = 0; j < CFG::NJ; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n0 + wn * CFG::WTN + j * 8 + 2 * (lane & 3) + q;
          if (n < g.Kg) outp[((I)grp * g.Kg + n) * Mr + m] = acc[i][j][2 * h + q];
        }
    }
}

template <class CFG>
struct gc_tc_smem {
  enum { BYTES = CFG::NS * (CFG::A_ST + CFG::B_ST) * 2 };
};

// ---- fixed-order split-K reduction (and the epilogue of a split GEMM) -----------------
// out[e] = round(sum_{s < splits} partial[s*total + e] + bias[(e / inner) % channels])
template <typename T>
__device__ __forceinline__ void gc_igemm_reduce(const typename gc_acc<T>::type* __restrict__ partial,
                                                const T* __restrict__ bias, T* __restrict__ out,
                                                long long total, int splits, long long inner,
                                                int channels, int has_bias) {
  typedef typename gc_acc<T>::type A;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    A s = A(0);
    for (int i = 0; i < splits; ++i) s += partial[(long long)i * total + e];
    if (has_bias) s += (A)gc_load(bias + (int)((e / inner) % channels));
    gc_store(out + e, s);
  }
}

#endif  // GPUCONV_IGEMM_CUH
