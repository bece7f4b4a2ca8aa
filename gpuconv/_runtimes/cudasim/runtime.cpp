// runtime.cpp -- fiber scheduler of gpuconv's CUDA emulator (gpuconv.testing.cudasim).
//
// Built once into a shared library (cached by content hash) and loaded with
// RTLD_GLOBAL; kernel modules (the .cu source + cudasim.h + a generated trailer)
// resolve cudasim_* against it.
//
// One launch = blocks run one after another; in a block every CUDA thread is a
// fiber with its own stack.  Fibers switch only at barriers and warp operations
// (and when they exit), in the order of the chosen schedule.  Misuse of
// barriers / warp operations, deadlocks, faults (guard pages), arithmetic traps
// and the time limit end the launch with an error record for Python, never a crash.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define CUDASIM_RUNTIME 1
#include "cudasim.h"

#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#if !defined(__x86_64__)
#define CUDASIM_UCONTEXT 1
#endif

namespace {

enum State { RUNNABLE = 0, AT_BAR, AT_WARP, EXITED, FAILED };
enum Sched { S_FORWARD = 0, S_REVERSE, S_RANDOM, S_WARP };
enum ErrCode {
  E_OK = 0, E_SYNC = 1, E_FAULT = 2, E_TIMEOUT = 3, E_CRASH = 4, E_SMEM = 5, E_CONFIG = 6,
  E_STACK = 7, E_WARP = 8, E_ASYNC = 9, E_OPERAND = 10, E_ALIGN = 11
};

// one cp.async in flight: its data (read from global memory at issue) lands at the
// wait_group that covers its commit group
struct PendingCopy {
  char* dst;
  unsigned char data[16];
  int size;
  int group;  // commit group of the issuing thread (== its committed count while open)
  int line;
};

struct Fiber {
  cudasim_thread pub;  // must stay first: kernels read pub.tid through cudasim_cur
  int state;
  int warp, lane;
  int op, line;        // where it waits
  int pred;            // barrier predicate
  unsigned int mask;   // warp op
  int aux, width, size;
  unsigned long long val, result;
  unsigned long long aligned_seq;  // .aligned warp instructions (mma, ldmatrix) executed
  int cp_committed;    // cp.async commit groups committed so far
  int cp_npend, cp_cap;
  PendingCopy* cp_pend;  // cp.async copies not yet landed (issue order)
  void* sp;            // saved stack pointer (x86-64 switch)
  char* stack_lo;      // usable stack [stack_lo, stack_hi); guard page below stack_lo
  char* stack_hi;
#ifdef CUDASIM_UCONTEXT
  ucontext_t uc;
#endif
};

}  // namespace

// ------------------------------------------------------------------ exported state
extern "C" {
__attribute__((visibility("default"))) cudasim_thread* cudasim_cur = nullptr;
__attribute__((visibility("default"))) uint3 cudasim_block_idx = {0, 0, 0};
__attribute__((visibility("default"))) dim3 cudasim_block_dim(1, 1, 1);
__attribute__((visibility("default"))) dim3 cudasim_grid_dim(1, 1, 1);

struct cudasim_launch_desc {
  cudasim_invoker invoke;
  void* fn;
  void** argv;
  unsigned int grid[3];
  unsigned int block[3];
  unsigned long long dyn_bytes;   // dynamic shared memory of the launch
  char* dyn_array;                // module's dynamic shared array (page aligned)
  unsigned long long dyn_capacity;  // its size: usable bytes + one trailing guard page
  char* tls_block;                // module TLS block (static __shared__), poisoned per block
  unsigned long long tls_size;
  int schedule;
  unsigned long long seed;
  double time_limit;              // seconds, <= 0: none
  unsigned long long stack_size;
};

struct cudasim_error {
  int code;
  int has_thread;
  unsigned int block[3];
  unsigned int thread[3];
  unsigned long long addr;
  int access;  // 0 read, 1 write, -1 unknown
  int line;
  unsigned long long blocks_done;
  char msg[4096];
};
}

namespace {

const unsigned char POISON = 0xFF;
const size_t PAGE = 4096;

// launch state (one launch at a time: Python holds a lock)
const cudasim_launch_desc* g_desc = nullptr;
cudasim_error* g_err = nullptr;
Fiber* g_fibers = nullptr;
int g_nfibers_alloc = 0;
size_t g_stack_size_alloc = 0;
int g_n = 0;                 // threads per block
int g_nwarps = 0;
Fiber* g_running = nullptr;  // fiber currently executing, null in the scheduler
volatile sig_atomic_t g_in_launch = 0;
volatile sig_atomic_t g_timed_out = 0;
sigjmp_buf g_jb;
void* g_sched_sp = nullptr;
#ifdef CUDASIM_UCONTEXT
ucontext_t g_sched_uc;
#endif
char* g_dyn_base = nullptr;   // == desc->dyn_array
size_t g_dyn_prot_lo = 0, g_dyn_prot_hi = 0;  // protected byte range of the dyn array

// scheduling bookkeeping
int g_nrunnable = 0, g_nexited = 0, g_bar_arrived = 0;
int* g_wrun = nullptr;       // runnable lanes per warp
int* g_rq = nullptr;         // random: runnable ids
int* g_rqpos = nullptr;
int g_rqn = 0;
int g_cursor = 0, g_cur_warp = 0;
unsigned long long g_rng = 1;

unsigned long long rng_next() {
  unsigned long long x = g_rng;
  x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
  g_rng = x;
  return x * 2685821657736338717ULL;
}

// ------------------------------------------------------------------ error records
void err_vset(int code, const char* fmt, va_list ap) {
  if (g_err->code != E_OK) return;  // keep the first error
  g_err->code = code;
  g_err->block[0] = cudasim_block_idx.x;
  g_err->block[1] = cudasim_block_idx.y;
  g_err->block[2] = cudasim_block_idx.z;
  if (g_running) {
    g_err->has_thread = 1;
    g_err->thread[0] = g_running->pub.tid.x;
    g_err->thread[1] = g_running->pub.tid.y;
    g_err->thread[2] = g_running->pub.tid.z;
  }
  vsnprintf(g_err->msg, sizeof g_err->msg, fmt, ap);
}
void err_set(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void err_set(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  err_vset(code, fmt, ap);
  va_end(ap);
}
// append to the message (used by the deadlock report)
void err_append(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void err_append(const char* fmt, ...) {
  size_t len = strlen(g_err->msg);
  if (len + 1 >= sizeof g_err->msg) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err->msg + len, sizeof g_err->msg - len, fmt, ap);
  va_end(ap);
}

const char* op_name(int op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
                                "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync",
                                "__match_any_sync",
                                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                                "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64",
                                "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
                                "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
                                "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                                "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16",
                                "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                                "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"};
  return (op >= 0 && op < CUDASIM_W_NOPS) ? names[op] : "?";
}
const char* bar_name(int op) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                "__syncthreads_or"};
  return (op >= 0 && op < 4) ? names[op] : "?";
}

// ------------------------------------------------------------------ context switch
#ifndef CUDASIM_UCONTEXT
extern "C" void cudasim_swap(void** save_sp, void* new_sp);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl cudasim_swap\n"
    ".hidden cudasim_swap\n"
    ".type cudasim_swap,@function\n"
    "cudasim_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size cudasim_swap, .-cudasim_swap\n");
#endif

void fiber_main();

inline void to_scheduler(Fiber* f) {
#ifdef CUDASIM_UCONTEXT
  swapcontext(&f->uc, &g_sched_uc);
#else
  cudasim_swap(&f->sp, g_sched_sp);
#endif
}
inline void to_fiber(Fiber* f) {
  g_running = f;
  cudasim_cur = &f->pub;
#ifdef CUDASIM_UCONTEXT
  swapcontext(&g_sched_uc, &f->uc);
#else
  cudasim_swap(&g_sched_sp, f->sp);
#endif
  g_running = nullptr;
}

#ifdef CUDASIM_UCONTEXT
void fiber_main_uc() { fiber_main(); }
#endif

void reset_fiber(Fiber* f) {
#ifdef CUDASIM_UCONTEXT
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = (size_t)(f->stack_hi - f->stack_lo);
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_main_uc, 0);
#else
  uintptr_t top = (uintptr_t)f->stack_hi & ~(uintptr_t)15;
  void** sp = (void**)top;
  *--sp = nullptr;                  // keeps rsp == 8 (mod 16) at fiber_main's entry
  *--sp = (void*)&fiber_main;       // return address of cudasim_swap
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  --sp;                             // mxcsr + x87 control word
  unsigned int csr[2] = {0, 0};
  __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
  __asm__ volatile("fnstcw %0" : "=m"(csr[1]));
  memcpy(sp, csr, 8);
  f->sp = sp;
#endif
  f->state = RUNNABLE;
}

// ------------------------------------------------------------------ runnable sets
inline void mark_runnable(int i) {
  Fiber& f = g_fibers[i];
  f.state = RUNNABLE;
  ++g_nrunnable;
  ++g_wrun[f.warp];
  if (g_desc->schedule == S_RANDOM) {
    g_rqpos[i] = g_rqn;
    g_rq[g_rqn++] = i;
  }
}
inline void mark_blocked(int i, int state) {
  Fiber& f = g_fibers[i];
  f.state = state;
  --g_nrunnable;
  --g_wrun[f.warp];
  if (g_desc->schedule == S_RANDOM) {
    int p = g_rqpos[i], last = g_rq[--g_rqn];
    g_rq[p] = last;
    g_rqpos[last] = p;
  }
}

int pick() {
  if (g_nrunnable == 0) return -1;
  switch (g_desc->schedule) {
    case S_REVERSE:
      for (int k = 0; k < g_n; ++k) {
        int i = ((g_cursor - k) % g_n + g_n) % g_n;
        if (g_fibers[i].state == RUNNABLE) { g_cursor = i - 1; return i; }
      }
      return -1;
    case S_RANDOM:
      return g_rq[rng_next() % (unsigned long long)g_rqn];
    case S_WARP:
      for (int k = 0; k < g_nwarps; ++k) {
        int w = (g_cur_warp + k) % g_nwarps;
        if (g_wrun[w] == 0) continue;
        if (w != g_cur_warp) { g_cur_warp = w; g_cursor = w * 32; }
        int lo = w * 32, hi = lo + 32 < g_n ? lo + 32 : g_n;
        for (int j = 0; j < hi - lo; ++j) {
          int i = lo + ((g_cursor - lo + j) % (hi - lo));
          if (g_fibers[i].state == RUNNABLE) { g_cursor = i + 1; return i; }
        }
      }
      return -1;
    default:
      for (int k = 0; k < g_n; ++k) {
        int i = (g_cursor + k) % g_n;
        if (g_fibers[i].state == RUNNABLE) { g_cursor = i + 1; return i; }
      }
      return -1;
  }
}

// ------------------------------------------------------------------ fiber side
void fail_in_fiber(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
void fail_in_fiber(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  err_vset(code, fmt, ap);
  va_end(ap);
  Fiber* f = g_running;
  f->state = FAILED;
  to_scheduler(f);
  abort();  // never resumed
}

void fiber_main() {
  Fiber* f = g_running;
  g_desc->invoke(g_desc->fn, g_desc->argv);
  f->state = EXITED;
  to_scheduler(f);
  abort();
}

unsigned int warp_lanes_mask(int w) {
  int n = g_n - w * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int cudasim_syncthreads(int op, int pred, int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: __syncthreads outside a kernel launch\n"); abort(); }
  f->op = op;
  f->pred = pred;
  f->line = line;
  f->state = AT_BAR;
  to_scheduler(f);
  return (int)f->result;
}

namespace {
unsigned long long warp_arrive(Fiber* f, int op, unsigned int mask, unsigned long long bits,
                               int size, int aux, int width, int line);
}

extern "C" __attribute__((visibility("default"))) unsigned long long cudasim_warp(
    int op, unsigned int mask, unsigned long long bits, int size, int aux, int width, int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: warp operation outside a kernel launch\n"); abort(); }
  if (!(mask >> f->lane & 1u))
    fail_in_fiber(E_WARP, "%s at {L%d}: the calling lane %d (warp %d) is not in mask 0x%08x",
                  op_name(op), line, f->lane, f->warp, mask);
  unsigned int exist = warp_lanes_mask(f->warp);
  if (mask & ~exist)
    fail_in_fiber(E_WARP, "%s at {L%d}: mask 0x%08x names lanes that do not exist in warp %d "
                  "(it has %d threads, lane mask 0x%08x)", op_name(op), line, mask, f->warp,
                  __builtin_popcount(exist), exist);
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail_in_fiber(E_WARP, "%s at {L%d}: width=%d is not a power of 2 in 1..32", op_name(op), line,
                  width);
  return warp_arrive(f, op, mask, bits, size, aux, width, line);
}

namespace {
unsigned long long warp_arrive(Fiber* f, int op, unsigned int mask, unsigned long long bits,
                               int size, int aux, int width, int line) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = g_fibers[f->warp * 32 + l];
    if (o.state == EXITED)
      fail_in_fiber(E_WARP, "%s at {L%d}: lane %d of warp %d is in mask 0x%08x but has already "
                    "exited, so it can never arrive", op_name(op), line, l, f->warp, mask);
  }
  f->op = op;
  f->mask = mask;
  f->val = bits;
  f->size = size;
  f->aux = aux;
  f->width = width;
  f->line = line;
  f->state = AT_WARP;
  to_scheduler(f);
  return f->result;
}
}  // namespace

// ------------------------------------------------------------------ tensor cores, cp.async
// Semantics (the specification is the table in kernels/warp.cuh, after the PTX ISA):
//  * mma / ldmatrix are .aligned warp collectives: all 32 lanes of a full warp arrive at
//    the same instruction (same line, same dynamic instance), resolved in the scheduler;
//  * cp.async reads its global source at issue, poisons its shared destination, and the
//    data lands when a cp.async.wait_group of the issuing thread covers its commit group.
namespace {

void thread_str(int i, char* buf, size_t n);
unsigned short* g_shadow = nullptr;  // per byte of the module TLS block: cp.async in flight
size_t g_shadow_cap = 0;
bool g_shadow_dirty = false;

struct MmaFrame { void* d; const void* a; const void* b; const void* c; };
bool resolve_mma_(int base, int op, int line);
struct LdsmFrame { unsigned int* r; const char* row; };

inline bool is_mma(int op) { return op >= CUDASIM_W_MMA_F16 && op <= CUDASIM_W_MMA_F64; }
inline bool is_ldsm(int op) { return op >= CUDASIM_W_LDSM_X1 && op <= CUDASIM_W_LDSM_X4_T; }
inline int ldsm_nmat(int op) {
  int k = (op - CUDASIM_W_LDSM_X1) % 3;
  return k == 0 ? 1 : k == 1 ? 2 : 4;
}
inline bool ldsm_trans(int op) { return op >= CUDASIM_W_LDSM_X1_T; }

// where [p, p+n) lies: 1 dynamic shared memory, 2 static __shared__ memory, 0 elsewhere;
// *off = byte offset in that space, *why = set when the range leaves it
int smem_where(const void* p, size_t n, size_t* off, const char** why) {
  const char* a = (const char*)p;
  const cudasim_launch_desc* d = g_desc;
  *why = nullptr;
  *off = 0;
  if (g_dyn_base && a >= d->dyn_array && a < d->dyn_array + d->dyn_capacity) {
    if (a < g_dyn_base) { *why = "before the start of dynamic shared memory"; return 1; }
    *off = (size_t)(a - g_dyn_base);
    if (*off + n > d->dyn_bytes) *why = "past the end of the launch's dynamic shared memory";
    return 1;
  }
  if (d->tls_block && a >= d->tls_block && a < d->tls_block + d->tls_size) {
    *off = (size_t)(a - d->tls_block);
    if (a + n > d->tls_block + d->tls_size) *why = "past the end of static shared memory";
    return 2;
  }
  return 0;
}
const char* space_name(int w) {
  return w == 1 ? "dynamic shared memory" : "static __shared__ memory";
}

inline void shadow_add(const char* p, int n, int delta) {
  if (!g_shadow || !g_desc->tls_block) return;
  const char* t0 = g_desc->tls_block;
  if (p < t0 || p + n > t0 + g_desc->tls_size) return;
  size_t o = (size_t)(p - t0);
  for (int i = 0; i < n; ++i) g_shadow[o + i] = (unsigned short)(g_shadow[o + i] + delta);
  if (delta > 0) g_shadow_dirty = true;
}
inline bool shadow_busy(const char* p, int n) {
  if (!g_shadow || !g_desc->tls_block) return false;
  const char* t0 = g_desc->tls_block;
  if (p < t0 || p + n > t0 + g_desc->tls_size) return false;
  size_t o = (size_t)(p - t0);
  for (int i = 0; i < n; ++i)
    if (g_shadow[o + i]) return true;
  return false;
}
void shadow_reset() {
  if (g_shadow && g_shadow_dirty) memset(g_shadow, 0, g_desc->tls_size * sizeof(unsigned short));
  g_shadow_dirty = false;
}
bool ensure_shadow() {
  size_t need = g_desc->tls_block ? g_desc->tls_size : 0;
  if (need > g_shadow_cap) {
    free(g_shadow);
    g_shadow = (unsigned short*)calloc(need, sizeof(unsigned short));
    if (!g_shadow) { g_shadow_cap = 0; return false; }
    g_shadow_cap = need;
    g_shadow_dirty = false;
  } else {
    g_shadow_dirty = true;  // another module may have left marks: clear before the first block
  }
  return true;
}

// the thread whose pending cp.async covers shared byte p (for the error message)
bool find_pending(const char* p, int n, int* who, PendingCopy** pc) {
  for (int i = 0; i < g_n; ++i) {
    Fiber& f = g_fibers[i];
    for (int k = 0; k < f.cp_npend; ++k) {
      PendingCopy& c = f.cp_pend[k];
      if (c.dst < p + n && p < c.dst + c.size) { *who = i; *pc = &c; return true; }
    }
  }
  return false;
}

void require_full_warp(Fiber* f, int op, int line) {
  unsigned int exist = warp_lanes_mask(f->warp);
  if (exist != 0xffffffffu)
    fail_in_fiber(E_WARP, "%s at {L%d}: a warp-wide .aligned instruction needs all 32 lanes, but "
                  "warp %d of this block has only %d threads (block size not a multiple of 32)",
                  op_name(op), line, f->warp, __builtin_popcount(exist));
  ++f->aligned_seq;
}

double half_bits_to_double(unsigned int h) {
  unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  double v;
  if (e == 0) v = ldexp((double)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = ldexp((double)(m | 0x400u), (int)e - 25);
  return (h & 0x8000u) ? -v : v;
}
double f32_bits_to_double(unsigned int u) {
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}

// fragment tables (kernels/warp.cuh is the specification); g = lane >> 2, t = lane % 4
// the scheduler reads and writes the lanes' fragment arrays (normally registers, i.e. the
// fibers' stacks); g_running names the lane meanwhile, so a fault is that lane's error
bool resolve_mma(int base, int op, int line) {
  bool ok = resolve_mma_(base, op, line);
  g_running = nullptr;
  return ok;
}
bool resolve_mma_(int base, int op, int line) {
  double A[16][16], B[16][8], C[16][8];
  MmaFrame* fr[32];
  for (int l = 0; l < 32; ++l) fr[l] = (MmaFrame*)(uintptr_t)g_fibers[base + l].val;
  if (op == CUDASIM_W_MMA_F64) {
    for (int l = 0; l < 32; ++l) {
      int g = l >> 2, t = l & 3;
      g_running = &g_fibers[base + l];
      const double* a = (const double*)fr[l]->a;
      const double* b = (const double*)fr[l]->b;
      const double* c = (const double*)fr[l]->c;
      A[g][t] = a[0];
      B[t][g] = b[0];
      C[g][2 * t] = c[0];
      C[g][2 * t + 1] = c[1];
    }
    double D[8][8];
    for (int m = 0; m < 8; ++m)
      for (int n = 0; n < 8; ++n) {
        double acc = C[m][n];
        for (int k = 0; k < 4; ++k) acc = fma(A[m][k], B[k][n], acc);
        D[m][n] = acc;
      }
    for (int l = 0; l < 32; ++l) {
      int g = l >> 2, t = l & 3;
      g_running = &g_fibers[base + l];
      double* d = (double*)fr[l]->d;
      d[0] = D[g][2 * t];
      d[1] = D[g][2 * t + 1];
    }
    return true;
  }
  const bool tf32 = op == CUDASIM_W_MMA_TF32;
  const int K = tf32 ? 8 : 16;
  for (int l = 0; l < 32; ++l) {
    int g = l >> 2, t = l & 3;
    g_running = &g_fibers[base + l];
    const unsigned int* a = (const unsigned int*)fr[l]->a;
    const unsigned int* b = (const unsigned int*)fr[l]->b;
    const float* c = (const float*)fr[l]->c;
    if (tf32) {
      // a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4);  b0 (t, g)  b1 (t+4, g)
      const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {t, t, t + 4, t + 4};
      const int br[2] = {t, t + 4};
      for (int i = 0; i < 6; ++i) {
        unsigned int u = i < 4 ? a[i] : b[i - 4];
        bool nan = (u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu);
        if ((u & 0x1fffu) && !nan) {
          g_running = &g_fibers[base + l];
          err_set(E_OPERAND, "%s at {L%d}: operand %s (row %d, col %d), held by lane %d in %s[%d], "
                  "is 0x%08x (%.9g): not a TF32 value (its low 13 mantissa bits are not zero). "
                  "Round it with gc_f32_to_tf32() (cvt.rna.tf32.f32): the tensor core would "
                  "silently ignore those bits", op_name(op), line, i < 4 ? "A" : "B",
                  i < 4 ? ar[i] : br[i - 4], i < 4 ? ac[i] : g, l, i < 4 ? "a" : "b",
                  i < 4 ? i : i - 4, u, f32_bits_to_double(u));
          g_running = nullptr;
          return false;
        }
      }
      for (int i = 0; i < 4; ++i) A[ar[i]][ac[i]] = f32_bits_to_double(a[i]);
      B[t][g] = f32_bits_to_double(b[0]);
      B[t + 4][g] = f32_bits_to_double(b[1]);
    } else {
      const bool bf = op == CUDASIM_W_MMA_BF16;
      // register j holds elements 2j (low 16 bits) and 2j+1 (high 16 bits)
      // A: a0,a1 (g, 2t+{0,1})  a2,a3 (g+8, 2t+{0,1})  a4,a5 (g, 2t+8+{0,1})  a6,a7 (g+8, 2t+8+{0,1})
      // B: b0,b1 (2t+{0,1}, g)  b2,b3 (2t+8+{0,1}, g)
      for (int j = 0; j < 4; ++j) {
        int row = g + ((j & 1) ? 8 : 0), col = 2 * t + ((j & 2) ? 8 : 0);
        for (int h = 0; h < 2; ++h) {
          unsigned int e = (a[j] >> (16 * h)) & 0xffffu;
          A[row][col + h] = bf ? f32_bits_to_double(e << 16) : half_bits_to_double(e);
        }
      }
      for (int j = 0; j < 2; ++j)
        for (int h = 0; h < 2; ++h) {
          unsigned int e = (b[j] >> (16 * h)) & 0xffffu;
          B[2 * t + 8 * j + h][g] = bf ? f32_bits_to_double(e << 16) : half_bits_to_double(e);
        }
    }
    // C/D: c0,c1 (g, 2t+{0,1})  c2,c3 (g+8, 2t+{0,1})
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = (double)c[i];
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      // products are exact in double (<= 22 significant bits); the sum is kept in float32
      float acc = (float)C[m][n];
      for (int k = 0; k < K; ++k) acc = (float)((double)acc + A[m][k] * B[k][n]);
      D[m][n] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    int g = l >> 2, t = l & 3;
    g_running = &g_fibers[base + l];
    float* d = (float*)fr[l]->d;
    for (int i = 0; i < 4; ++i) d[i] = D[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)];
  }
  return true;
}

// Shared-memory bank accounting of ldmatrix (what the hardware serialises): each 8x8
// matrix is one phase of 8 row reads of 16 bytes; shared memory has 32 banks of 4 bytes,
// so a row covers the 4 banks of its 16-byte group (offset / 16) % 8, and a phase takes
// as many wavefronts as the most distinct rows sharing one group (rows at the same
// address are one read, broadcast).  Counted per launch; the worst instruction is kept.
struct LdsmStats {
  unsigned long long instr, phases, wavefronts;
  int worst_line, worst_ways;
};
LdsmStats g_ldsm_stats;

void count_ldsm_banks(const size_t* off, int nmat, int line) {
  g_ldsm_stats.instr += 1;
  for (int i = 0; i < nmat; ++i) {
    int ways = 0;
    for (int g = 0; g < 8; ++g) {
      int n = 0;
      for (int j = 0; j < 8; ++j) {
        const size_t a = off[8 * i + j];
        if ((int)((a >> 4) & 7) != g) continue;
        bool dup = false;  // the same 16 bytes as an earlier row: broadcast
        for (int k = 0; k < j; ++k) dup = dup || off[8 * i + k] == a;
        n += !dup;
      }
      ways = n > ways ? n : ways;
    }
    g_ldsm_stats.phases += 1;
    g_ldsm_stats.wavefronts += (unsigned long long)ways;
    if (ways > g_ldsm_stats.worst_ways) {
      g_ldsm_stats.worst_ways = ways;
      g_ldsm_stats.worst_line = line;
    }
  }
}

bool resolve_ldsm(int base, int op, int line) {
  const int nmat = ldsm_nmat(op);
  const bool trans = ldsm_trans(op);
  unsigned short rows[4][8][8];
  size_t row_off[32];
  for (int i = 0; i < nmat; ++i)
    for (int j = 0; j < 8; ++j) {
      Fiber& o = g_fibers[base + 8 * i + j];
      const char* p = ((LdsmFrame*)(uintptr_t)o.val)->row;
      if (shadow_busy(p, 16)) {
        int who = -1;
        PendingCopy* pc = nullptr;
        g_running = &o;
        size_t off;
        const char* why;
        int w = smem_where(p, 16, &off, &why);
        if (find_pending(p, 16, &who, &pc)) {
          char t[48];
          thread_str(who, t, sizeof t);
          Fiber& iss = g_fibers[who];
          err_set(E_ASYNC, "%s at {L%d}: row %d of matrix %d (lane %d's address, %s byte offset "
                  "%zu) reads bytes that a cp.async has not delivered yet: thread %s issued it "
                  "{L%d} in its commit group %d, %s", op_name(op), line, j, i, 8 * i + j,
                  space_name(w), off, t, pc->line, pc->group,
                  pc->group >= iss.cp_committed
                      ? "which it has not committed yet (cp.async.commit_group missing?)"
                      : "and no cp.async.wait_group of that thread covers that group yet "
                        "(wait_group N completes all but the newest N committed groups; a "
                        "missing wait, or a wait<1> where wait<0> is needed?)");
        } else {
          err_set(E_ASYNC, "%s at {L%d}: row %d of matrix %d reads bytes of a cp.async still "
                  "in flight", op_name(op), line, j, i);
        }
        g_running = nullptr;
        return false;
      }
      memcpy(rows[i][j], p, 16);
      size_t o16;
      const char* w16;
      smem_where(p, 16, &o16, &w16);
      row_off[8 * i + j] = o16;
    }
  count_ldsm_banks(row_off, nmat, line);
  for (int l = 0; l < 32; ++l) {
    g_running = &g_fibers[base + l];  // a fault writing r[] is this lane's
    unsigned int* r = ((LdsmFrame*)(uintptr_t)g_fibers[base + l].val)->r;
    int q = l >> 2, c = 2 * (l & 3);
    for (int i = 0; i < nmat; ++i) {
      unsigned int lo = trans ? rows[i][c][q] : rows[i][q][c];
      unsigned int hi = trans ? rows[i][c + 1][q] : rows[i][q][c + 1];
      r[i] = lo | (hi << 16);
    }
  }
  g_running = nullptr;
  return true;
}

// all 32 lanes wait at the same .aligned instruction (same line): check the dynamic
// instance, compute, release
bool resolve_aligned(int i) {
  Fiber& f = g_fibers[i];
  const int base = f.warp * 32, op = f.op;
  for (int l = 0; l < 32; ++l) {
    Fiber& o = g_fibers[base + l];
    if (o.aligned_seq != f.aligned_seq) {
      int lo = o.aligned_seq < f.aligned_seq ? l : f.lane;
      int hi = o.aligned_seq < f.aligned_seq ? f.lane : l;
      g_running = &g_fibers[base + lo];
      err_set(E_WARP, "%s at {L%d}: the lanes of warp %d arrive from different dynamic instances "
              "(lane %d at its warp-wide instruction #%llu, lane %d at #%llu): a lane skipped an "
              "earlier mma/ldmatrix (every lane must execute every .aligned instruction)",
              op_name(op), f.line, f.warp, lo, g_fibers[base + lo].aligned_seq, hi,
              g_fibers[base + hi].aligned_seq);
      g_running = nullptr;
      return false;
    }
  }
  bool ok = is_mma(op) ? resolve_mma(base, op, f.line) : resolve_ldsm(base, op, f.line);
  if (!ok) return false;
  for (int l = 0; l < 32; ++l) mark_runnable(base + l);
  return true;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void cudasim_mma(int op, void* d, const void* a,
                                                                  const void* b, const void* c,
                                                                  int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: mma outside a kernel launch\n"); abort(); }
  require_full_warp(f, op, line);
  MmaFrame fr = {d, a, b, c};
  warp_arrive(f, op, 0xffffffffu, (unsigned long long)(uintptr_t)&fr, 0, 0, 32, line);
}

extern "C" __attribute__((visibility("default"))) void cudasim_ldmatrix(int op, unsigned int* r,
                                                                       const void* row, int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: ldmatrix outside a kernel launch\n"); abort(); }
  require_full_warp(f, op, line);
  const int nmat = ldsm_nmat(op);
  if (f->lane < 8 * nmat) {  // lanes 8i..8i+7 give the row addresses of matrix i
    int mi = f->lane / 8, ri = f->lane % 8;
    size_t off;
    const char* why;
    int w = smem_where(row, 16, &off, &why);
    if (!w)
      fail_in_fiber(E_SMEM, "%s at {L%d}: lane %d gives the address of row %d of matrix %d, %p, "
                    "which is not in shared memory (ldmatrix reads shared memory only)",
                    op_name(op), line, f->lane, ri, mi, row);
    if (why)
      fail_in_fiber(E_SMEM, "%s at {L%d}: lane %d gives the address of row %d of matrix %d: its "
                    "16 bytes at %s byte offset %zu are %s (%llu bytes)", op_name(op), line,
                    f->lane, ri, mi, space_name(w), off, why,
                    w == 1 ? g_desc->dyn_bytes : g_desc->tls_size);
    if ((uintptr_t)row & 15u)
      fail_in_fiber(E_SMEM, "%s at {L%d}: lane %d gives the address of row %d of matrix %d at %s "
                    "byte offset %zu (address %% 16 = %d): ldmatrix rows must be 16-byte aligned",
                    op_name(op), line, f->lane, ri, mi, space_name(w), off,
                    (int)((uintptr_t)row & 15u));
  }
  LdsmFrame fr = {r, (const char*)row};
  warp_arrive(f, op, 0xffffffffu, (unsigned long long)(uintptr_t)&fr, 0, 0, 32, line);
}

extern "C" __attribute__((visibility("default"))) void cudasim_cp_async(void* dst, const void* src,
                                                                       int cp_size, int src_bytes,
                                                                       int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: cp.async outside a kernel launch\n"); abort(); }
  const char* what = cp_size == 16 ? "cp.async.cg.shared.global (16 bytes)"
                     : cp_size == 8 ? "cp.async.ca.shared.global (8 bytes)"
                                    : "cp.async.ca.shared.global (4 bytes)";
  if (src_bytes < 0 || src_bytes > cp_size)
    fail_in_fiber(E_SMEM, "%s at {L%d}: src_bytes=%d outside 0..%d", what, line, src_bytes, cp_size);
  size_t off;
  const char* why;
  int w = smem_where(dst, (size_t)cp_size, &off, &why);
  if (!w)
    fail_in_fiber(E_SMEM, "%s at {L%d}: the destination %p is not in shared memory", what, line, dst);
  if (why)
    fail_in_fiber(E_SMEM, "%s at {L%d}: the destination's %d bytes at %s byte offset %zu are %s "
                  "(%llu bytes)", what, line, cp_size, space_name(w), off, why,
                  w == 1 ? g_desc->dyn_bytes : g_desc->tls_size);
  if ((uintptr_t)dst % (unsigned)cp_size)
    fail_in_fiber(E_SMEM, "%s at {L%d}: the destination (%s byte offset %zu) is not %d-byte aligned",
                  what, line, space_name(w), off, cp_size);
  PendingCopy pc;
  memset(&pc, 0, sizeof pc);
  if (src_bytes > 0) {
    size_t o2;
    const char* w2;
    if (smem_where(src, 1, &o2, &w2))
      fail_in_fiber(E_SMEM, "%s at {L%d}: the source %p is in shared memory; cp.async copies "
                    "global -> shared", what, line, src);
    if ((uintptr_t)src % (unsigned)cp_size)
      fail_in_fiber(E_SMEM, "%s at {L%d}: the global source address %p is not %d-byte aligned",
                    what, line, src, cp_size);
    memcpy(pc.data, src, (size_t)src_bytes);  // a bad source faults here, like any load
  }
  pc.dst = (char*)dst;
  pc.size = cp_size;
  pc.group = f->cp_committed;
  pc.line = line;
  if (f->cp_npend == f->cp_cap) {
    int cap = f->cp_cap ? 2 * f->cp_cap : 16;
    PendingCopy* n = (PendingCopy*)realloc(f->cp_pend, (size_t)cap * sizeof(PendingCopy));
    if (!n) fail_in_fiber(E_CRASH, "cudasim: out of memory for cp.async bookkeeping");
    f->cp_pend = n;
    f->cp_cap = cap;
  }
  f->cp_pend[f->cp_npend++] = pc;
  memset(dst, POISON, (size_t)cp_size);  // not visible before the wait: NaN bytes meanwhile
  shadow_add((const char*)dst, cp_size, 1);
}

extern "C" __attribute__((visibility("default"))) void cudasim_cp_async_commit(int) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: cp.async.commit_group outside a kernel launch\n"); abort(); }
  ++f->cp_committed;
}

extern "C" __attribute__((visibility("default"))) void cudasim_cp_async_wait(int n, int line) {
  Fiber* f = g_running;
  if (!f) { fprintf(stderr, "cudasim: cp.async.wait_group outside a kernel launch\n"); abort(); }
  if (n < 0)
    fail_in_fiber(E_CRASH, "cp.async.wait_group %d at {L%d}: N must be >= 0", n, line);
  const int done = f->cp_committed - n;  // groups [0, done) complete
  int k = 0;
  for (int i = 0; i < f->cp_npend; ++i) {
    PendingCopy& c = f->cp_pend[i];
    if (c.group < done) {
      memcpy(c.dst, c.data, (size_t)c.size);
      shadow_add(c.dst, c.size, -1);
    } else {
      f->cp_pend[k++] = c;
    }
  }
  f->cp_npend = k;
}

extern "C" __attribute__((visibility("default"))) void cudasim_misaligned(const void* p, int align,
                                                                         int write,
                                                                         const char* type,
                                                                         int line) {
  if (!g_running) { fprintf(stderr, "cudasim: misaligned %s access outside a launch\n", type); abort(); }
  g_err->addr = (unsigned long long)(uintptr_t)p;
  g_err->access = write;
  size_t off;
  const char* why;
  int w = smem_where(p, 1, &off, &why);
  char where[160];
  if (w) snprintf(where, sizeof where, " (%s byte offset %zu)", space_name(w), off);
  else where[0] = 0;
  char at[32];
  if (line > 0) snprintf(at, sizeof at, " {L%d}", line);
  else at[0] = 0;
  fail_in_fiber(E_ALIGN, "misaligned %d-byte %s %s%s at address %p%s (address %% %d = %d): vector "
                "types must be accessed at multiples of their size (the GPU faults with "
                "'misaligned address')", align, type, write ? "store" : "load", at, p, where, align,
                (int)((uintptr_t)p % (unsigned)align));
}

extern "C" __attribute__((visibility("default"))) unsigned int cudasim_activemask(void) {
  Fiber* f = g_running;
  if (!f) return 0;
  unsigned int m = 0;
  for (int l = 0; l < 32 && f->warp * 32 + l < g_n; ++l)
    if (g_fibers[f->warp * 32 + l].state != EXITED) m |= 1u << l;
  return m;
}

extern "C" __attribute__((visibility("default"))) void cudasim_trap(const char* what, int line) {
  if (!g_running) { fprintf(stderr, "cudasim: %s outside a kernel launch\n", what); abort(); }
  fail_in_fiber(E_CRASH, "%s called at {L%d}", what, line);
}

extern "C" __attribute__((visibility("default"))) long long cudasim_clock(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

namespace {

// ------------------------------------------------------------------ scheduler side
void thread_str(int i, char* buf, size_t n) {
  const uint3& t = g_fibers[i].pub.tid;
  snprintf(buf, n, "(%u,%u,%u)", t.x, t.y, t.z);
}

// all lanes of f's mask wait at the same warp op with the same mask: compute results
bool try_resolve_warp(int i) {
  Fiber& f = g_fibers[i];
  const int base = f.warp * 32;
  const unsigned int mask = f.mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = g_fibers[base + l];
    if (o.state != AT_WARP || o.op != f.op || o.mask != mask || o.line != f.line) return false;
  }
  if (is_mma(f.op) || is_ldsm(f.op)) return resolve_aligned(i);
  const int op = f.op;
  unsigned long long bal = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && g_fibers[base + l].val) bal |= 1ull << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = g_fibers[base + l];
    int w = o.width, seg = l & ~(w - 1), src = l;
    bool shfl = true;
    switch (op) {
      case CUDASIM_W_SHFL: src = seg + (o.aux & (w - 1)); break;
      case CUDASIM_W_SHFL_UP: src = l - o.aux; if (src < seg) src = l; break;
      case CUDASIM_W_SHFL_DOWN: src = l + o.aux; if (src >= seg + w) src = l; break;
      case CUDASIM_W_SHFL_XOR: src = l ^ o.aux; if (src >= seg + w || src < 0) src = l; break;
      default: shfl = false;
    }
    if (shfl) {
      if (src < 0 || src > 31 || !(mask >> src & 1u)) {
        g_running = &o;
        err_set(E_WARP, "%s at {L%d}: lane %d of warp %d reads lane %d, which is not in mask "
                "0x%08x (the value would be undefined)", op_name(op), f.line, l, f.warp, src, mask);
        g_running = nullptr;
        return false;
      }
      o.result = g_fibers[base + src].val;
      continue;
    }
    switch (op) {
      case CUDASIM_W_SYNCWARP: o.result = 0; break;
      case CUDASIM_W_BALLOT: o.result = bal; break;
      case CUDASIM_W_ANY: o.result = bal != 0; break;
      case CUDASIM_W_ALL: o.result = bal == (unsigned long long)mask; break;
      case CUDASIM_W_MATCH_ANY: {
        unsigned int m = 0;
        for (int k = 0; k < 32; ++k)
          if ((mask >> k & 1u) && g_fibers[base + k].val == o.val) m |= 1u << k;
        o.result = m;
        break;
      }
      default: {  // reductions over 32-bit values
        long long acc = 0;
        bool first = true;
        for (int k = 0; k < 32; ++k) {
          if (!(mask >> k & 1u)) continue;
          unsigned int u = (unsigned int)g_fibers[base + k].val;
          long long v = o.aux ? (long long)(int)u : (long long)u;
          if (first) { acc = v; first = false; continue; }
          switch (op) {
            case CUDASIM_W_RED_ADD: acc += v; break;
            case CUDASIM_W_RED_MIN: acc = v < acc ? v : acc; break;
            case CUDASIM_W_RED_MAX: acc = v > acc ? v : acc; break;
            case CUDASIM_W_RED_AND: acc &= v; break;
            case CUDASIM_W_RED_OR: acc |= v; break;
            case CUDASIM_W_RED_XOR: acc ^= v; break;
          }
        }
        o.result = (unsigned int)acc;
      }
    }
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) mark_runnable(base + l);
  return true;
}

void release_barrier() {
  int line = g_fibers[0].line, op = g_fibers[0].op;
  for (int i = 1; i < g_n; ++i) {
    if (g_fibers[i].line != line || g_fibers[i].op != op) {
      char a[48], b[48];
      thread_str(0, a, sizeof a);
      thread_str(i, b, sizeof b);
      err_set(E_SYNC, "barrier divergence: all %d threads wait at a barrier, but not the same one: "
              "thread %s at %s() {L%d}, thread %s at %s() {L%d}", g_n, a, bar_name(op), line, b,
              bar_name(g_fibers[i].op), g_fibers[i].line);
      return;
    }
  }
  long long cnt = 0;
  for (int i = 0; i < g_n; ++i) cnt += g_fibers[i].pred;
  unsigned long long res = op == CUDASIM_BAR_COUNT ? (unsigned long long)cnt
                           : op == CUDASIM_BAR_AND ? (cnt == g_n)
                           : op == CUDASIM_BAR_OR  ? (cnt != 0) : 0;
  g_bar_arrived = 0;
  for (int i = 0; i < g_n; ++i) {
    g_fibers[i].result = res;
    mark_runnable(i);
  }
}

// nothing runnable but not all threads exited: say who waits for whom
void report_stuck() {
  char t[48];
  // 1. a warp operation whose mask lanes will not all arrive
  for (int i = 0; i < g_n; ++i) {
    Fiber& f = g_fibers[i];
    if (f.state != AT_WARP) continue;
    err_set(E_WARP, "deadlock at %s {L%d} in warp %d (mask 0x%08x):", op_name(f.op), f.line,
            f.warp, f.mask);
    int shown = 0;
    for (int l = 0; l < 32 && shown < 6; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      Fiber& o = g_fibers[f.warp * 32 + l];
      if (o.state == AT_WARP && o.op == f.op && o.mask == f.mask && o.line == f.line) continue;
      ++shown;
      if (o.state == EXITED) err_append(" lane %d has exited;", l);
      else if (o.state == AT_BAR) err_append(" lane %d waits at %s() {L%d};", l, bar_name(o.op), o.line);
      else if (o.state == AT_WARP)
        err_append(" lane %d waits at %s {L%d} with mask 0x%08x;", l, op_name(o.op), o.line, o.mask);
    }
    err_append(" every lane named in the mask must reach the same warp operation with the same mask");
    return;
  }
  // 2. barrier reached by part of the block
  int nbar = 0, first = -1, firstexit = -1, other = -1;
  for (int i = 0; i < g_n; ++i) {
    if (g_fibers[i].state == AT_BAR) {
      ++nbar;
      if (first < 0) first = i;
      else if (g_fibers[i].line != g_fibers[first].line && other < 0) other = i;
    } else if (g_fibers[i].state == EXITED && firstexit < 0) {
      firstexit = i;
    }
  }
  if (first >= 0) {
    Fiber& f = g_fibers[first];
    thread_str(first, t, sizeof t);
    err_set(E_SYNC, "%s() {L%d} reached by only %d of %d threads of the block (e.g. thread %s)",
            bar_name(f.op), f.line, nbar, g_n, t);
    if (other >= 0) {
      thread_str(other, t, sizeof t);
      err_append("; threads wait at different barriers: thread %s at %s() {L%d}", t,
                 bar_name(g_fibers[other].op), g_fibers[other].line);
    }
    if (g_nexited > 0) {
      thread_str(firstexit, t, sizeof t);
      err_append("; %d thread(s) already exited (e.g. thread %s): a return before a barrier", g_nexited, t);
    }
    return;
  }
  err_set(E_SYNC, "deadlock: no thread can run (%d exited)", g_nexited);
}

// ------------------------------------------------------------------ signals
struct sigaction g_old_act[6];
const int g_sigs[6] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP};
stack_t g_old_altstack;
char* g_altstack = nullptr;
const size_t ALTSTACK = 256 * 1024;
int g_timer_sig = 0;
timer_t g_timer;
bool g_timer_ok = false;

bool in_stack_guard(uintptr_t a, int* which) {
  for (int i = 0; i < g_n; ++i) {
    uintptr_t lo = (uintptr_t)g_fibers[i].stack_lo;
    if (a >= lo - PAGE && a < lo) { *which = i; return true; }
  }
  return false;
}

void on_fault(int sig, siginfo_t* si, void* ucv) {
  if (!g_in_launch || !g_running) {
    // not the kernel's fault: let the previous handler (or the default) deal with it
    for (int k = 0; k < 6; ++k)
      if (g_sigs[k] == sig) sigaction(sig, &g_old_act[k], nullptr);
    return;
  }
  uintptr_t a = (uintptr_t)si->si_addr;
  int access = -1;
#if defined(__x86_64__)
  if (sig == SIGSEGV) {
    ucontext_t* uc = (ucontext_t*)ucv;
    access = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
  }
#else
  (void)ucv;
#endif
  const char* what = access == 1 ? "write" : access == 0 ? "read" : "access";
  int which;
  if (sig == SIGSEGV || sig == SIGBUS) {
    g_err->addr = a;
    g_err->access = access;
    uintptr_t d0 = (uintptr_t)g_dyn_base;
    if (g_dyn_base && a >= d0 + g_dyn_prot_lo && a < d0 + g_dyn_prot_hi) {
      if (a < d0)
        err_set(E_SMEM, "out-of-bounds %s of dynamic shared memory at byte offset %lld "
                "(before its start; the launch has %llu bytes)", what, (long long)(a - d0),
                g_desc->dyn_bytes);
      else
        err_set(E_SMEM, "out-of-bounds %s of dynamic shared memory at byte offset %llu "
                "(the launch has %llu bytes)", what, (unsigned long long)(a - d0), g_desc->dyn_bytes);
    } else if (in_stack_guard(a, &which)) {
      err_set(E_STACK, "stack overflow (the emulator gives each thread %llu KiB of stack)",
              (unsigned long long)(g_desc->stack_size / 1024));
    } else {
      err_set(E_FAULT, "invalid %s at address 0x%llx (%s)", what, (unsigned long long)a,
              sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
    }
  } else if (sig == SIGFPE) {
    err_set(E_CRASH, "arithmetic trap (SIGFPE: %s)",
            si->si_code == FPE_INTDIV ? "integer division by zero"
            : si->si_code == FPE_INTOVF ? "integer overflow (INT_MIN / -1?)" : "floating-point");
  } else if (sig == SIGABRT) {
    err_set(E_CRASH, "abort() called (a failed assert()?)");
  } else {
    err_set(E_CRASH, "illegal instruction or trap (signal %d)", sig);
  }
  siglongjmp(g_jb, 1);
}

void on_timer(int, siginfo_t*, void*) {
  if (!g_in_launch) return;
  g_timed_out = 1;
  if (g_running) {
    err_set(E_TIMEOUT, "time limit of %.3g s exceeded (an infinite loop?)", g_desc->time_limit);
    siglongjmp(g_jb, 1);
  }
}

void install_signals() {
  if (!g_altstack) {
    g_altstack = (char*)mmap(nullptr, ALTSTACK, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  stack_t ss;
  ss.ss_sp = g_altstack;
  ss.ss_size = ALTSTACK;
  ss.ss_flags = 0;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int k = 0; k < 6; ++k) sigaction(g_sigs[k], &sa, &g_old_act[k]);
  if (!g_timer_sig) {
    g_timer_sig = SIGRTMIN + 5;
    struct sigaction ta;
    memset(&ta, 0, sizeof ta);
    ta.sa_sigaction = on_timer;
    ta.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ta.sa_mask);
    sigaction(g_timer_sig, &ta, nullptr);  // stays installed; ignores signals outside launches
  }
}

void restore_signals() {
  for (int k = 0; k < 6; ++k) sigaction(g_sigs[k], &g_old_act[k], nullptr);
  if (g_old_altstack.ss_flags & SS_DISABLE) {
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
  } else {
    sigaltstack(&g_old_altstack, nullptr);
  }
}

void start_timer(double seconds) {
  g_timer_ok = false;
  if (seconds <= 0) return;
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = g_timer_sig;
#ifdef sigev_notify_thread_id
  sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
  sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
  if (timer_create(CLOCK_MONOTONIC, &sev, &g_timer) != 0) return;
  struct itimerspec its;
  memset(&its, 0, sizeof its);
  its.it_value.tv_sec = (time_t)seconds;
  its.it_value.tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9);
  if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
  its.it_interval = its.it_value;  // re-fire in case the first one lands in the scheduler
  timer_settime(g_timer, 0, &its, nullptr);
  g_timer_ok = true;
}
void stop_timer() {
  if (g_timer_ok) timer_delete(g_timer);
  g_timer_ok = false;
}

// ------------------------------------------------------------------ memory
bool ensure_fibers(int n, size_t stack_size) {
  if (n <= g_nfibers_alloc && stack_size == g_stack_size_alloc) return true;
  if (g_fibers) {
    for (int i = 0; i < g_nfibers_alloc; ++i) {
      munmap(g_fibers[i].stack_lo - PAGE, g_stack_size_alloc + PAGE);
      free(g_fibers[i].cp_pend);
    }
    free(g_fibers);
    free(g_wrun);
    free(g_rq);
    free(g_rqpos);
  }
  int cap = n < 1024 ? 1024 : n;
  g_fibers = (Fiber*)calloc((size_t)cap, sizeof(Fiber));
  g_wrun = (int*)calloc((size_t)(cap + 31) / 32, sizeof(int));
  g_rq = (int*)calloc((size_t)cap, sizeof(int));
  g_rqpos = (int*)calloc((size_t)cap, sizeof(int));
  for (int i = 0; i < cap; ++i) {
    char* m = (char*)mmap(nullptr, stack_size + PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, PAGE, PROT_NONE);  // guard page: stack overflow faults
    g_fibers[i].stack_lo = m + PAGE;
    g_fibers[i].stack_hi = m + PAGE + stack_size;
  }
  g_nfibers_alloc = cap;
  g_stack_size_alloc = stack_size;
  return true;
}

// canary bytes alternate 0xFE / 0xFF by address parity: NaN in every float format
inline unsigned char canary_at(const char* p) { return ((uintptr_t)p & 1) ? 0xFF : 0xFE; }
void fill_canary(char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = (char)canary_at(p + i);
}
bool check_canary(const char* p, size_t n, size_t* bad) {
  for (size_t i = 0; i < n; ++i)
    if ((unsigned char)p[i] != canary_at(p + i)) { *bad = i; return false; }
  return true;
}

// dynamic shared memory: array = [guard page][usable ... ][guard page]; the symbols of
// `extern __shared__` arrays point PAGE bytes into it.  Per launch, every page past
// the launch's size (rounded up to a page) is protected; the slack is a canary.
void setup_dyn() {
  const cudasim_launch_desc* d = g_desc;
  g_dyn_base = nullptr;
  if (!d->dyn_array) return;
  g_dyn_base = d->dyn_array + PAGE;
  size_t usable = d->dyn_capacity - 2 * PAGE;
  size_t end = (d->dyn_bytes + PAGE - 1) / PAGE * PAGE;
  g_dyn_prot_lo = (size_t)0 - PAGE;  // relative to g_dyn_base (wraps: means -PAGE)
  mprotect(d->dyn_array, PAGE, PROT_NONE);
  if (end < usable + PAGE) mprotect(g_dyn_base + end, usable + PAGE - end, PROT_NONE);
  g_dyn_prot_hi = usable + PAGE;
  fill_canary(g_dyn_base + d->dyn_bytes, end - d->dyn_bytes);
}
void teardown_dyn() {
  if (!g_dyn_base) return;
  mprotect(g_desc->dyn_array, g_desc->dyn_capacity, PROT_READ | PROT_WRITE);
  g_dyn_base = nullptr;
}

void poison_block_memory() {
  const cudasim_launch_desc* d = g_desc;
  if (d->tls_block && d->tls_size) {
    // static __shared__ variables: the module's TLS block except the dynamic array
    char* t0 = d->tls_block;
    char* t1 = d->tls_block + d->tls_size;
    char* a0 = d->dyn_array;
    char* a1 = d->dyn_array ? d->dyn_array + d->dyn_capacity : nullptr;
    if (a0 && a0 >= t0 && a1 <= t1) {
      memset(t0, POISON, (size_t)(a0 - t0));
      memset(a1, POISON, (size_t)(t1 - a1));
    } else {
      memset(t0, POISON, d->tls_size);
    }
  }
  if (g_dyn_base && d->dyn_bytes) memset(g_dyn_base, POISON, d->dyn_bytes);
}

void set_block_idx(unsigned long long lin) {
  const unsigned int* g = g_desc->grid;
  cudasim_block_idx.x = (unsigned int)(lin % g[0]);
  cudasim_block_idx.y = (unsigned int)((lin / g[0]) % g[1]);
  cudasim_block_idx.z = (unsigned int)(lin / ((unsigned long long)g[0] * g[1]));
}

// run one block to completion; false on error
bool run_block() {
  const cudasim_launch_desc* d = g_desc;
  g_nrunnable = 0; g_nexited = 0; g_bar_arrived = 0; g_rqn = 0;
  g_cursor = d->schedule == S_REVERSE ? g_n - 1 : 0;
  g_cur_warp = 0;
  for (int w = 0; w < g_nwarps; ++w) g_wrun[w] = 0;
  for (int i = 0; i < g_n; ++i) {
    reset_fiber(&g_fibers[i]);
    g_fibers[i].state = EXITED;  // mark_runnable counts it
    g_fibers[i].aligned_seq = 0;
    g_fibers[i].cp_committed = 0;
    g_fibers[i].cp_npend = 0;  // copies never waited for are dropped with the block
    mark_runnable(i);
  }
  shadow_reset();
  poison_block_memory();
  for (;;) {
    if (g_timed_out) {
      err_set(E_TIMEOUT, "time limit of %.3g s exceeded", d->time_limit);
      return false;
    }
    int i = pick();
    if (i < 0) {
      if (g_nexited == g_n) break;
      report_stuck();
      return false;
    }
    Fiber& f = g_fibers[i];
    to_fiber(&f);
    if (g_err->code != E_OK) return false;
    switch (f.state) {
      case RUNNABLE: break;
      case EXITED:
        f.state = RUNNABLE;
        mark_blocked(i, EXITED);
        ++g_nexited;
        break;
      case AT_BAR:
        f.state = RUNNABLE;
        mark_blocked(i, AT_BAR);
        if (++g_bar_arrived == g_n) release_barrier();
        break;
      case AT_WARP:
        f.state = RUNNABLE;
        mark_blocked(i, AT_WARP);
        try_resolve_warp(i);
        break;
      default:
        return false;
    }
    if (g_err->code != E_OK) return false;
  }
  // writes into the slack after the dynamic shared memory
  if (g_dyn_base) {
    size_t end = (d->dyn_bytes + PAGE - 1) / PAGE * PAGE, bad;
    if (!check_canary(g_dyn_base + d->dyn_bytes, end - d->dyn_bytes, &bad)) {
      g_err->addr = (unsigned long long)(uintptr_t)(g_dyn_base + d->dyn_bytes + bad);
      g_err->access = 1;
      err_set(E_SMEM, "out-of-bounds write to dynamic shared memory at byte offset %llu (the "
              "launch has %llu bytes); found after the block finished, thread unknown",
              d->dyn_bytes + bad, d->dyn_bytes);
      return false;
    }
  }
  return true;
}

}  // namespace

// out[0..4]: ldmatrix instructions, phases, wavefronts, worst ways, its source line
extern "C" __attribute__((visibility("default"))) void cudasim_ldsm_stats(unsigned long long* out) {
  out[0] = g_ldsm_stats.instr;
  out[1] = g_ldsm_stats.phases;
  out[2] = g_ldsm_stats.wavefronts;
  out[3] = (unsigned long long)g_ldsm_stats.worst_ways;
  out[4] = (unsigned long long)g_ldsm_stats.worst_line;
}

extern "C" __attribute__((visibility("default"))) int cudasim_abi_version(void) {
  return CUDASIM_ABI_VERSION;
}

extern "C" __attribute__((visibility("default"))) int cudasim_launch(const cudasim_launch_desc* d,
                                                                     cudasim_error* err) {
  memset(err, 0, sizeof *err);
  err->access = -1;
  g_desc = d;
  memset(&g_ldsm_stats, 0, sizeof g_ldsm_stats);
  g_err = err;
  unsigned long long nthreads = (unsigned long long)d->block[0] * d->block[1] * d->block[2];
  if (nthreads == 0 || nthreads > 1024) {
    err_set(E_CONFIG, "block of %llu threads (1..1024 allowed)", nthreads);
    return err->code;
  }
  if (d->dyn_bytes && (!d->dyn_array || d->dyn_bytes > d->dyn_capacity - 2 * PAGE)) {
    err_set(E_CONFIG, "dynamic shared memory of %llu bytes exceeds the emulator's %llu",
            d->dyn_bytes, d->dyn_array ? d->dyn_capacity - 2 * PAGE : 0ULL);
    return err->code;
  }
  g_n = (int)nthreads;
  g_nwarps = (g_n + 31) / 32;
  if (!ensure_fibers(g_n, d->stack_size)) {
    err_set(E_CONFIG, "cannot allocate fiber stacks");
    return err->code;
  }
  for (int i = 0; i < g_n; ++i) {
    Fiber& f = g_fibers[i];
    f.pub.tid.x = (unsigned int)(i % d->block[0]);
    f.pub.tid.y = (unsigned int)((i / d->block[0]) % d->block[1]);
    f.pub.tid.z = (unsigned int)(i / (d->block[0] * d->block[1]));
    f.pub.linear = (unsigned int)i;
    f.warp = i / 32;
    f.lane = i % 32;
  }
  cudasim_block_dim = dim3(d->block[0], d->block[1], d->block[2]);
  cudasim_grid_dim = dim3(d->grid[0], d->grid[1], d->grid[2]);
  unsigned long long nblocks = (unsigned long long)d->grid[0] * d->grid[1] * d->grid[2];
  g_rng = d->seed * 0x9E3779B97F4A7C15ULL + 0x2545F4914F6CDD1DULL;
  if (!g_rng) g_rng = 1;
  // block order: forward, reverse, or a random bijection (a*i + b) mod n
  unsigned long long ba = 1, bb = 0;
  if (d->schedule == S_RANDOM && nblocks > 1) {
    for (;;) {
      ba = rng_next() % nblocks;
      unsigned long long x = ba, y = nblocks;
      while (y) { unsigned long long t = x % y; x = y; y = t; }
      if (x == 1 && ba != 0) break;
    }
    bb = rng_next() % nblocks;
  }

  if (!ensure_shadow()) {
    err_set(E_CONFIG, "cannot allocate the cp.async shadow of shared memory");
    return err->code;
  }
  install_signals();
  setup_dyn();
  g_timed_out = 0;
  g_in_launch = 1;
  static volatile unsigned long long done;  // survives siglongjmp
  done = 0;
  if (sigsetjmp(g_jb, 1) == 0) {
    start_timer(d->time_limit);
    for (unsigned long long k = 0; k < nblocks; ++k) {
      unsigned long long lin = d->schedule == S_REVERSE ? nblocks - 1 - k
                               : d->schedule == S_RANDOM ? (unsigned long long)(((unsigned __int128)ba * k + bb) % nblocks)
                               : k;
      set_block_idx(lin);
      if (!run_block()) break;
      done = k + 1;
    }
  }
  g_in_launch = 0;
  stop_timer();
  g_running = nullptr;
  cudasim_cur = nullptr;
  teardown_dyn();
  restore_signals();
  err->blocks_done = done;
  g_desc = nullptr;
  return err->code;
}

// address and size of a module's TLS block for the calling thread (static __shared__)
extern "C" __attribute__((visibility("default"))) int cudasim_module_tls(void* handle, void** addr,
                                                                         unsigned long long* size) {
  *addr = nullptr;
  *size = 0;
  size_t modid = 0;
  if (dlinfo(handle, RTLD_DI_TLS_MODID, &modid) != 0 || modid == 0) return 0;
  void* data = nullptr;
  if (dlinfo(handle, RTLD_DI_TLS_DATA, &data) != 0) return -1;
  struct Q { size_t modid; unsigned long long size; } q = {modid, 0};
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* p) -> int {
        Q* q = (Q*)p;
        if (info->dlpi_tls_modid != q->modid) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS) q->size = info->dlpi_phdr[i].p_memsz;
        return 1;
      },
      &q);
  *addr = data;
  *size = q.size;
  return data ? 1 : -1;
}
