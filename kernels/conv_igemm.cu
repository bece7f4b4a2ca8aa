// Entry points of the implicit-GEMM engine (kernels/igemm.cuh), SIMT policy.
//   gpuconv_igemm_fp_<t>_<cfg>_<i>     forward, and each stride phase of the input grad
//   gpuconv_igemm_wg_<t>_<cfg>_<i>     weight grad, split-K pass 1 (partial sums)
//   gpuconv_igemm_reduce_<t>           fixed-order split-K sum (+ bias, one rounding)
//   gpuconv_igemm_fptc_<t>_<cfg>_<i>   forward and each stride phase of the input grad,
//                                      tensor-op policy (t = f16, bf16; f32: TF32
//                                      m16n8k8 under precision "high"): ldmatrix +
//                                      mma.sync m16n8k16, float32 accumulators, 3-stage
//                                      cp.async weight pipeline; <cfg>: l = 128x128x16
//                                      (TF32 x8), 256 threads; s = 64x64x16 (x8), 128
//   gpuconv_igemm_wgtc_<t>_<cfg>_<i>   weight grad, tensor-op policy (f16, bf16, f32 as TF32),
//                                      split-K pass 1 (float32
//                                      partials; the transposed GEMM C' = x^T gy on the
//                                      same main loop; same <cfg> as fptc)
//   gpuconv_igemm_wreorder_<t>         its weight, rows contiguous along the reduction
//                                      (forward [K][taps][C/G]; input-grad phase
//                                      [G][C/G][phase taps][K/G], transposed and flipped)
// <cfg>: l = 128x128x8 tile, 256 threads; s = 64x64x8 (float64: 64x64x4), 64 threads.
// 8x8 outputs per thread.  Half types run the tensor-op policy for every pass; the SIMT
// policy (loads widened to float32) takes them under GPUCONV_CUDA_ALGO=simt.

#define GC_IG_FP_BODY(T, I, CFG)                                                            \
  {                                                                                          \
    const gc_fp p = GC_FP_MAKE;                                                              \
    gc_igemm_fp<T, I, gc_cfg_for<CFG, gc_acc<T>::type>::type>(src, wt, bias, out, partial, p, \
                                                              has_bias, split);              \
  }
#define GC_IG_FP_PARAMS(T)                                                                   \
  const T *__restrict__ src, const T *__restrict__ wt, const T *__restrict__ bias,           \
      T *__restrict__ out, gc_acc<T>::type *__restrict__ partial, GC_FP_PARAMS, int has_bias, \
      int split
#define GC_IG_WG_BODY(T, I, CFG)                                                            \
  {                                                                                          \
    gc_igemm_wg<T, I, gc_cfg_for<CFG, gc_acc<T>::type>::type>(x, gy, partial, GC_GEO_MAKE,    \
                                                              chunk);                        \
  }
#define GC_IG_WG_PARAMS(T, I)                                                                \
  const T *__restrict__ x, const T *__restrict__ gy, gc_acc<T>::type *__restrict__ partial,   \
      GC_GEO_PARAMS, I chunk

#define GC_IG_ENTRY_I(SUF, T, ISUF, I)                                                       \
  extern "C" __global__ void __launch_bounds__(256, GC_IG_MINB(T, gc_cfg_l, sizeof(I) == 8)) \
      gpuconv_igemm_fp_##SUF##_l_##ISUF(GC_IG_FP_PARAMS(T)) GC_IG_FP_BODY(T, I, gc_cfg_l)     \
  extern "C" __global__ void __launch_bounds__(64, GC_IG_MINB(T, gc_cfg_s, sizeof(I) == 8))   \
      gpuconv_igemm_fp_##SUF##_s_##ISUF(GC_IG_FP_PARAMS(T)) GC_IG_FP_BODY(T, I, gc_cfg_s)     \
  extern "C" __global__ void __launch_bounds__(256, 1)                                       \
      gpuconv_igemm_wg_##SUF##_l_##ISUF(GC_IG_WG_PARAMS(T, I)) GC_IG_WG_BODY(T, I, gc_cfg_l)  \
  extern "C" __global__ void __launch_bounds__(64, 1)                                        \
      gpuconv_igemm_wg_##SUF##_s_##ISUF(GC_IG_WG_PARAMS(T, I)) GC_IG_WG_BODY(T, I, gc_cfg_s)

#define GC_IG_ENTRIES(SUF, T)                                                                \
  GC_FOR_EACH_INDEX(GC_IG_ENTRY_I, SUF, T)                                                   \
  extern "C" __global__ void gpuconv_igemm_reduce_##SUF(                                   \
      const gc_acc<T>::type* __restrict__ partial, const T* __restrict__ bias,               \
      T* __restrict__ out, long long total, int splits, long long inner, int channels,       \
      int has_bias) {                                                                        \
    gc_igemm_reduce<T>(partial, bias, out, total, splits, inner, channels, has_bias);        \
  }

GC_FOR_EACH_DTYPE(GC_IG_ENTRIES)

// tensor-op policy: float16 / bfloat16, and float32 as TF32 (precision "high"): forward,
// input grad and weight grad.  The large tiles ask for 2 resident blocks
// (<= 128 registers: spill-free on sm_90 with 32-bit indices; the 64-bit variants need
// more and keep 1)
#define GC_TC_FP_ENTRY_I(SUF, T, ISUF, I)                                                    \
  extern "C" __global__ void __launch_bounds__(256, sizeof(I) == 8 ? 1 : 2)                 \
      gpuconv_igemm_fptc_##SUF##_l_##ISUF(GC_IG_FP_PARAMS(T)) {                              \
    const gc_fp p = GC_FP_MAKE;                                                              \
    gc_igemm_fp_tc<T, I, gc_tc_cfg_for<T, gc_tc_l>::type>(src, wt, bias, out, partial, p,    \
                                                          has_bias, split);                  \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(128, 1)                                       \
      gpuconv_igemm_fptc_##SUF##_s_##ISUF(GC_IG_FP_PARAMS(T)) {                              \
    const gc_fp p = GC_FP_MAKE;                                                              \
    gc_igemm_fp_tc<T, I, gc_tc_cfg_for<T, gc_tc_s>::type>(src, wt, bias, out, partial, p,    \
                                                          has_bias, split);                  \
  }
#define GC_TC_WG_ENTRY_I(SUF, T, ISUF, I)                                                    \
  extern "C" __global__ void __launch_bounds__(256, sizeof(I) == 8 ? 1 : 2)                 \
      gpuconv_igemm_wgtc_##SUF##_l_##ISUF(const T* __restrict__ x, const T* __restrict__ gy,  \
                                          float* __restrict__ partial, GC_GEO_PARAMS,        \
                                          I chunk) {                                         \
    gc_igemm_wg_tc<T, I, gc_tc_cfg_for<T, gc_tc_l>::type>(x, gy, partial, GC_GEO_MAKE, chunk); \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(128, 1)                                       \
      gpuconv_igemm_wgtc_##SUF##_s_##ISUF(const T* __restrict__ x, const T* __restrict__ gy,  \
                                          float* __restrict__ partial, GC_GEO_PARAMS,        \
                                          I chunk) {                                         \
    gc_igemm_wg_tc<T, I, gc_tc_cfg_for<T, gc_tc_s>::type>(x, gy, partial, GC_GEO_MAKE, chunk); \
  }
#define GC_TC_ENTRIES(SUF, T)                                                                \
  GC_FOR_EACH_INDEX(GC_TC_FP_ENTRY_I, SUF, T)                                                \
  GC_FOR_EACH_INDEX(GC_TC_WG_ENTRY_I, SUF, T)                                                \
  extern "C" __global__ void gpuconv_igemm_wreorder_##SUF(                                   \
      const T* __restrict__ w, T* __restrict__ wr, GC_FP_PARAMS, long long total) {          \
    gc_igemm_wreorder<T>(w, wr, GC_FP_MAKE, total);                                          \
  }
GC_TC_ENTRIES(f16, gc_half)
GC_TC_ENTRIES(bf16, gc_bf16)
GC_TC_ENTRIES(f32, float)
