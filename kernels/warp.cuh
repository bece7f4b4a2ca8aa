// gpuconv warp-matrix and async-copy helpers: prepended (as text, after common.cuh) to every
// kernel source by gpuconv's source table.
//
// Each helper is ONE PTX instruction under __CUDA_ARCH__ (NVRTC / nvcc device code, sm_80+)
// and a call into the CPU emulator under __CUDASIM__ (gpuconv.testing.cudasim), which
// implements exactly the semantics written down below.  The emulator versions take one
// extra defaulted argument (the caller's source line, for error messages); call them with
// the signatures shown and both worlds compile the same kernel text.
//
//   void gc_mma_m16n8k16_f16 (float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
//   void gc_mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
//   void gc_mma_m16n8k8_tf32 (float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
//   void gc_mma_m8n8k4_f64   (double d[2], const double a[1], const double b[1], const double c[2]);
//   void gc_ldmatrix_x1(unsigned r[1], const void* smem);  gc_ldmatrix_x1_trans(...)
//   void gc_ldmatrix_x2(unsigned r[2], const void* smem);  gc_ldmatrix_x2_trans(...)
//   void gc_ldmatrix_x4(unsigned r[4], const void* smem);  gc_ldmatrix_x4_trans(...)
//   void gc_cp_async_4 (void* smem, const void* gmem, int src_bytes);   // zero-fills past src_bytes
//   void gc_cp_async_8 (void* smem, const void* gmem, int src_bytes);
//   void gc_cp_async_16(void* smem, const void* gmem, int src_bytes);
//   void gc_cp_async_commit();  template <int N> void gc_cp_async_wait();  // wait_group N
//   unsigned gc_f32_to_tf32(float);   // cvt.rna.tf32.f32
//
// ============================================================================ SPECIFICATION
// (PTX ISA, "Warp-level matrix instructions": mma.sync.aligned ... .row.col, ldmatrix,
// cp.async, cp.async.commit_group / wait_group, cvt.rna.tf32.f32.)
//
// mma.sync.aligned: D = A * B + C, computed by a whole warp (all 32 lanes, converged, the
// same instruction: ".aligned").  A is M x K row-major ("row"), B is K x N column-major
// ("col"); both are only ways of naming the fragments below.  In every table
//     lane = %laneid (threadIdx linear % 32),  g = lane >> 2 (groupID),  t = lane % 4
//     (threadID_in_group).
// 16-bit elements are packed two per 32-bit register, the element with the LOWER index
// (the lower column of A / C, the lower row of B) in the LOW 16 bits.
//
// m16n8k16, .f16 / .bf16 inputs, .f32 accumulate  (gc_mma_m16n8k16_f16 / _bf16)
//     A 16x16: a[0] = A[g  ][2t], A[g  ][2t+1]        a[1] = A[g+8][2t], A[g+8][2t+1]
//              a[2] = A[g  ][2t+8], A[g  ][2t+9]      a[3] = A[g+8][2t+8], A[g+8][2t+9]
//     B 16x8:  b[0] = B[2t  ][g], B[2t+1][g]          b[1] = B[2t+8][g], B[2t+9][g]
//     C, D 16x8 (float):  c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
//
// m16n8k8, .tf32 inputs (one per 32-bit register), .f32 accumulate  (gc_mma_m16n8k8_tf32)
//     A 16x8:  a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//     B 8x8:   b[0] = B[t][g]  b[1] = B[t+4][g]
//     C, D 16x8: as for m16n8k16.
//     Operands must be TF32 values: float32 bit patterns whose low 13 mantissa bits are zero
//     (gc_f32_to_tf32 makes them).  The hardware ignores those bits; the emulator reports a
//     value that has them set (MmaOperandError) instead of truncating silently.
//
// m8n8k4, .f64  (gc_mma_m8n8k4_f64)
//     A 8x4: a[0] = A[g][t]     B 4x8: b[0] = B[t][g]     C, D 8x8: c[0] = C[g][2t], c[1] = C[g][2t+1]
//
// Arithmetic in the emulator: f16/bf16/tf32 products are exact (they fit a float32
// significand), summed in float32 in k order starting from C (the hardware's order and
// internal rounding may differ within float32 accumulation error: compare with tolerances,
// or with data whose sums are exact); f64 is D = fma(a3,b3, fma(a2,b2, fma(a1,b1, fma(a0,b0,c)))).
//
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: loads 1, 2 or 4 matrices of
// 8x8 16-bit elements from shared memory.  Lanes 8i..8i+7 give the addresses of rows 0..7 of
// matrix i (x1: lanes 0-7, x2: 0-15, x4: all 32; the other lanes' addresses are unused).
// Each row is 16 contiguous bytes, 16-byte aligned, in shared memory.  Afterwards lane t holds
// in r[i]:
//     without .trans:  M_i[t/4][2(t%4)] (low half), M_i[t/4][2(t%4)+1] (high half)
//     with .trans:     M_i[2(t%4)][t/4] (low half), M_i[2(t%4)+1][t/4] (high half)
// where M_i[row][col] is element col of the row whose address lane 8i+row gave.  So an x4 of
// the four 8x8 quadrants (rows 0-7/cols 0-7, rows 8-15/cols 0-7, rows 0-7/cols 8-15,
// rows 8-15/cols 8-15) of a row-major 16x16 tile is exactly the A fragment a[0..3] above, and
// .trans of a row-major K x N tile gives the B fragment.
//
// cp.async.{ca,cg}.shared.global [smem], [gmem], cp_size, src_bytes: copies src_bytes (0..cp_size)
// bytes from global memory and zero-fills the rest of the cp_size (4, 8, 16) bytes at smem;
// both addresses aligned to cp_size (16-byte copies use .cg: L2 only).  The copy is
// ASYNCHRONOUS: nothing is guaranteed visible until the issuing thread's
// cp.async.wait_group covers it.  cp.async.commit_group closes the thread's open copies into
// a commit group (per thread); cp.async.wait_group N waits until at most the N most recently
// committed groups of this thread are pending.  Other threads see the data after the wait
// AND a barrier (__syncthreads).
// With src_bytes = 0 nothing is read (the emulator does not check that source address).
// The emulator reads the source at issue (a bad source faults like any load), fills the
// destination with NaN bytes (0xFF) until the wait that covers its group, and reports an
// ldmatrix that reads bytes still in flight (AsyncCopyError); plain loads of such bytes read NaN.
//
// cvt.rna.tf32.f32: float32 -> TF32 (10 mantissa bits kept), round to nearest, ties away from
// zero, returned as a float32 bit pattern with the low 13 bits zero.
// ==========================================================================================

#ifndef GPUCONV_WARP_CUH
#define GPUCONV_WARP_CUH

#if defined(__CUDA_ARCH__)
#define GC_WARP_LINE_ARG
#define GC_WARP_LINE_ONLY
#else
#define GC_WARP_LINE_ARG , int gc_line = __builtin_LINE()
#define GC_WARP_LINE_ONLY int gc_line = __builtin_LINE()
#endif

// float32 -> TF32 bit pattern (cvt.rna.tf32.f32); the portable form is the specification
__device__ __forceinline__ unsigned gc_f32_to_tf32_portable(float x) {
  union { float f; unsigned u; } v;
  v.f = x;
  unsigned u = v.u;
  if ((u & 0x7f800000u) == 0x7f800000u)  // inf stays inf; NaN stays a (quiet) NaN
    return (u & 0x7fffffu) ? ((u & 0xffffe000u) | 0x00400000u) : u;
  return (u + 0x1000u) & 0xffffe000u;  // ties away from zero (sign-magnitude); may become inf
}

#if defined(__CUDA_ARCH__)

__device__ __forceinline__ unsigned gc_f32_to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void gc_mma_m16n8k16_f16(float d[4], const unsigned a[4],
                                                    const unsigned b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void gc_mma_m16n8k16_bf16(float d[4], const unsigned a[4],
                                                     const unsigned b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void gc_mma_m16n8k8_tf32(float d[4], const unsigned a[4],
                                                    const unsigned b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void gc_mma_m8n8k4_f64(double d[2], const double a[1],
                                                  const double b[1], const double c[2]) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%4,%5};\n"
               : "=d"(d[0]), "=d"(d[1])
               : "d"(a[0]), "d"(b[0]), "d"(c[0]), "d"(c[1]));
}

__device__ __forceinline__ unsigned gc_smem_u32(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void gc_ldmatrix_x1(unsigned r[1], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(gc_smem_u32(smem)) : "memory");
}
__device__ __forceinline__ void gc_ldmatrix_x2(unsigned r[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(gc_smem_u32(smem)) : "memory");
}
__device__ __forceinline__ void gc_ldmatrix_x4(unsigned r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(gc_smem_u32(smem))
               : "memory");
}
__device__ __forceinline__ void gc_ldmatrix_x1_trans(unsigned r[1], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(gc_smem_u32(smem)) : "memory");
}
__device__ __forceinline__ void gc_ldmatrix_x2_trans(unsigned r[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(gc_smem_u32(smem)) : "memory");
}
__device__ __forceinline__ void gc_ldmatrix_x4_trans(unsigned r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(gc_smem_u32(smem))
               : "memory");
}

__device__ __forceinline__ void gc_cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               :: "r"(gc_smem_u32(smem)), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void gc_cp_async_8(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n"
               :: "r"(gc_smem_u32(smem)), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void gc_cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(gc_smem_u32(smem)), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void gc_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void gc_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

#elif defined(__CUDASIM__)  // ------------------------------------------- the CPU emulator

__device__ __forceinline__ unsigned gc_f32_to_tf32(float x) { return gc_f32_to_tf32_portable(x); }

__device__ __forceinline__ void gc_mma_m16n8k16_f16(float d[4], const unsigned a[4],
                                                    const unsigned b[2], const float c[4]
                                                    GC_WARP_LINE_ARG) {
  cudasim_mma(CUDASIM_W_MMA_F16, d, a, b, c, gc_line);
}
__device__ __forceinline__ void gc_mma_m16n8k16_bf16(float d[4], const unsigned a[4],
                                                     const unsigned b[2], const float c[4]
                                                     GC_WARP_LINE_ARG) {
  cudasim_mma(CUDASIM_W_MMA_BF16, d, a, b, c, gc_line);
}
__device__ __forceinline__ void gc_mma_m16n8k8_tf32(float d[4], const unsigned a[4],
                                                    const unsigned b[2], const float c[4]
                                                    GC_WARP_LINE_ARG) {
  cudasim_mma(CUDASIM_W_MMA_TF32, d, a, b, c, gc_line);
}
__device__ __forceinline__ void gc_mma_m8n8k4_f64(double d[2], const double a[1],
                                                  const double b[1], const double c[2]
                                                  GC_WARP_LINE_ARG) {
  cudasim_mma(CUDASIM_W_MMA_F64, d, a, b, c, gc_line);
}

__device__ __forceinline__ void gc_ldmatrix_x1(unsigned r[1], const void* smem GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X1, r, smem, gc_line);
}
__device__ __forceinline__ void gc_ldmatrix_x2(unsigned r[2], const void* smem GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X2, r, smem, gc_line);
}
__device__ __forceinline__ void gc_ldmatrix_x4(unsigned r[4], const void* smem GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X4, r, smem, gc_line);
}
__device__ __forceinline__ void gc_ldmatrix_x1_trans(unsigned r[1], const void* smem
                                                     GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X1_T, r, smem, gc_line);
}
__device__ __forceinline__ void gc_ldmatrix_x2_trans(unsigned r[2], const void* smem
                                                     GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X2_T, r, smem, gc_line);
}
__device__ __forceinline__ void gc_ldmatrix_x4_trans(unsigned r[4], const void* smem
                                                     GC_WARP_LINE_ARG) {
  cudasim_ldmatrix(CUDASIM_W_LDSM_X4_T, r, smem, gc_line);
}

__device__ __forceinline__ void gc_cp_async_4(void* smem, const void* gmem, int src_bytes
                                              GC_WARP_LINE_ARG) {
  cudasim_cp_async(smem, gmem, 4, src_bytes, gc_line);
}
__device__ __forceinline__ void gc_cp_async_8(void* smem, const void* gmem, int src_bytes
                                              GC_WARP_LINE_ARG) {
  cudasim_cp_async(smem, gmem, 8, src_bytes, gc_line);
}
__device__ __forceinline__ void gc_cp_async_16(void* smem, const void* gmem, int src_bytes
                                               GC_WARP_LINE_ARG) {
  cudasim_cp_async(smem, gmem, 16, src_bytes, gc_line);
}
__device__ __forceinline__ void gc_cp_async_commit(GC_WARP_LINE_ONLY) {
  cudasim_cp_async_commit(gc_line);
}
template <int N>
__device__ __forceinline__ void gc_cp_async_wait(GC_WARP_LINE_ONLY) {
  static_assert(N >= 0, "cp.async.wait_group N needs N >= 0");
  cudasim_cp_async_wait(N, gc_line);
}

#endif  // __CUDA_ARCH__ / __CUDASIM__ (a host-only pass declares no device helpers)

#endif  // GPUCONV_WARP_CUH
