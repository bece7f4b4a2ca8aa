"""CPU backend: chunked im2col + BLAS GEMM, tap loops for depthwise.

How it runs
-----------
* Dense and grouped convolutions are GEMMs over column matrices
  ``cols (C*T, nb*rows*Q)`` (T kernel taps) built by ONE strided copy from a
  window view of the (padded) input.  Columns are laid out channel-major per
  image, so a one-image GEMM result is already the NCHW output rows and is
  written in place (``np.matmul(..., out=)``).  A 1x1, stride-1, unpadded
  convolution needs no copy at all: the input image is the column matrix.
* Small images are batched (``nb`` images per GEMM) so the GEMM is not skinny;
  large images are split into rows of the first spatial dimension when one
  image does not fit the workspace.
* The input gradient is a GEMM ``W^T @ gy`` followed by a col2im of one strided
  add per tap, chunked by *input* rows so that every input row is owned by one
  chunk (no overlap between chunks, no zero-dilated gradient).
* The weight gradient is ``gy @ cols^T`` summed over chunks in a fixed order.
* Depthwise (one input channel per group, any channel multiplier) runs as a
  loop over kernel taps of in-cache ufuncs on blocks of channels; it never
  calls BLAS per channel.
* Chunks are spread statically over a small pool of threads (one per core the
  BLAS library would use), each running single-threaded BLAS; NumPy releases
  the GIL in its copies, ufuncs and BLAS calls, so the copies use every core
  too.  Static assignment keeps every reduction in a fixed order: results are
  identical from run to run.

Memory is bounded: every temporary (padded input slab, column buffer, GEMM
result staging, per-thread weight-gradient partials) is carved from per-thread
arenas whose total stays under the workspace limit (default 256 MiB;
``GPUCONV_WORKSPACE_MB`` or :func:`gpuconv.set_workspace_limit`), so the peak
extra memory of a call is at most the workspace plus the output.  The bound
holds as long as one output row of the first spatial dimension of one image
fits; below that the backend still runs, with one-row chunks.  Arenas are
kept between calls (so large buffers are not page-faulted in again every call),
never more than the limit in total; :func:`clear_workspace_cache` frees them.

float16 / bfloat16 are computed in float32 and rounded once at the end;
float32 in float32; float64 in float64.  Inputs are never written to; every
result is a fresh array.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["NumpyBackend", "get_workspace_limit", "set_workspace_limit", "clear_workspace_cache",
           "get_num_threads"]

_MB = 1 << 20
_workspace = None

# Tuning constants (measured on a 2-core AVX-512 machine; see benchmarks/RESULTS.md).
_MIN_GEMM_COLS = 1024        # batch small images until a GEMM has at least this many columns
# depthwise: elements of one output block.  Blocks that fit L2 (~48 K) are fastest on one
# thread, but every ufunc call then lasts only microseconds and two threads spend more
# time handing the GIL over than computing; 512 K-element blocks scale to 2 threads.
_DW_BLOCK_ELEMS = 512 * 1024
_ALIGN = 64
_WGRAD_ONE_GEMM_COLS = 4096   # weight grad: up to this many N*P*Q columns, one batched GEMM
_WGRAD_TRANS_MIN_COLS = 4096  # weight grad: compute the transposed gradient from here up
# NumPy's ufunc/copy machinery buffers strided, broadcast or casting operands in
# blocks of 8192 elements (up to ~64 KiB per call); reserve that per thread.
_UFUNC_RESERVE = 96 * 1024


def get_workspace_limit() -> int:
    """Current CPU workspace limit in bytes."""
    global _workspace
    if _workspace is None:
        env = os.environ.get("GPUCONV_WORKSPACE_MB")
        try:
            mb = float(env) if env else 256.0
        except ValueError:
            raise ValueError(f"GPUCONV_WORKSPACE_MB={env!r} is not a number of MiB") from None
        if not mb > 0:
            raise ValueError(f"GPUCONV_WORKSPACE_MB={env!r} must be > 0")
        _workspace = int(mb * _MB)
    return _workspace


def set_workspace_limit(megabytes) -> None:
    """Bound the temporaries of the CPU backend to ``megabytes`` MiB (> 0)."""
    global _workspace
    mb = float(megabytes)
    if not mb > 0:
        raise ValueError(f"set_workspace_limit: megabytes={megabytes!r} must be > 0")
    _workspace = max(1, int(mb * _MB))
    clear_workspace_cache()


def _compute_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ============================================================================ arenas
class _Arena:
    """One contiguous byte buffer handed out as typed sub-arrays."""

    def __init__(self, nbytes):
        self.buf = np.empty(max(int(nbytes), _ALIGN), dtype=np.uint8)
        self.off = 0

    @property
    def nbytes(self):
        return self.buf.nbytes

    def take(self, shape, dtype):
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        start = -(-self.off // _ALIGN) * _ALIGN
        if start + n > self.buf.nbytes:  # planning error: never silently exceed
            raise AssertionError(f"gpuconv workspace arena overflow ({start + n} > "
                                 f"{self.buf.nbytes} bytes)")
        self.off = start + n
        return self.buf[start:start + n].view(dtype).reshape(shape)

    def reset(self):
        self.off = 0


def _arena_bytes(sizes):
    """Bytes an arena needs to hold buffers of the given byte sizes (with alignment)."""
    return sum(-(-int(s) // _ALIGN) * _ALIGN for s in sizes if s) + _ALIGN


_pool_lock = threading.Lock()
_free_arenas: list = []


def _acquire(nbytes):
    with _pool_lock:
        best = None
        for a in _free_arenas:
            if a.nbytes >= nbytes and (best is None or a.nbytes < best.nbytes):
                best = a
        if best is not None:
            _free_arenas.remove(best)
            best.reset()
            return best
    return _Arena(nbytes)


def _release(arena):
    arena.reset()
    with _pool_lock:
        _free_arenas.append(arena)
        _free_arenas.sort(key=lambda a: -a.nbytes)
        limit = get_workspace_limit()
        total = 0
        keep = []
        for a in _free_arenas:  # keep the largest ones that fit the limit together
            if total + a.nbytes <= limit:
                keep.append(a)
                total += a.nbytes
        _free_arenas[:] = keep


def clear_workspace_cache() -> None:
    """Free the workspace buffers the CPU backend keeps between calls."""
    with _pool_lock:
        _free_arenas.clear()


# ============================================================================ threads
_executor = None
_exec_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_state = {"depth": 0, "saved": None}
_blas_libs = None


def _blas_controllers():
    """threadpoolctl controllers of the BLAS library NumPy uses ([] without threadpoolctl)."""
    global _blas_libs
    if _blas_libs is None:
        libs = []
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController()
            blas = [lc for lc in ctl.lib_controllers if lc.user_api == "blas"]
            mine = [lc for lc in blas if "numpy" in str(getattr(lc, "filepath", "")).lower()]
            libs = mine or blas
        except Exception:
            libs = []
        _blas_libs = libs
    return _blas_libs


def get_num_threads() -> int:
    """Threads the CPU backend uses: ``GPUCONV_NUM_THREADS``, else the BLAS thread
    count (as set by threadpoolctl or OPENBLAS_NUM_THREADS etc.), at most the usable cores."""
    env = os.environ.get("GPUCONV_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"GPUCONV_NUM_THREADS={env!r} is not an integer") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    libs = _blas_controllers()
    if not libs:
        return 1  # cannot make BLAS single-threaded per worker: let BLAS thread alone
    with _blas_lock:
        if _blas_state["depth"]:
            saved = _blas_state["saved"]
            blas = max(n for n in saved) if saved else 1
        else:
            blas = max(lc.num_threads for lc in libs)
    return max(1, min(cores, blas))


class _SingleThreadedBlas:
    """While any parallel region runs, BLAS runs one thread per caller (re-entrant)."""

    def __enter__(self):
        """Returns True when BLAS really runs one thread here.  OpenBLAS may ignore the
        setting when it comes from a thread other than the one that first used it
        (seen with 0.3.31 from a non-main Python thread): the caller then runs its
        chunks in this thread alone instead of oversubscribing the cores."""
        with _blas_lock:
            libs = _blas_controllers()
            if _blas_state["depth"] == 0:
                _blas_state["saved"] = [lc.num_threads for lc in libs]
                for lc in libs:
                    lc.set_num_threads(1)
            _blas_state["depth"] += 1
            return all(lc.num_threads == 1 for lc in libs)

    def __exit__(self, *exc):
        with _blas_lock:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                for lc, n in zip(_blas_controllers(), _blas_state["saved"]):
                    lc.set_num_threads(n)
                _blas_state["saved"] = None


def _after_fork_in_child():
    # worker threads do not survive fork(); a child builds its own pool
    global _executor, _exec_lock, _blas_lock, _pool_lock
    _executor = None
    _exec_lock, _blas_lock, _pool_lock = threading.Lock(), threading.Lock(), threading.Lock()
    _blas_state.update(depth=0, saved=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _get_executor(n):
    global _executor
    with _exec_lock:
        if _executor is None or _executor._max_workers < n:
            _executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpuconv")
        return _executor


def _run_parallel(chunks, nworkers, arena_bytes, work, init=None):
    """Run work(arena, state, chunk) for every chunk; chunks spread round-robin over
    workers.  Each worker gets its own arena and ``state = init(arena)``; returns the
    list of states in worker order (deterministic)."""
    nworkers = max(1, min(nworkers, len(chunks)))
    parts = [chunks[i::nworkers] for i in range(nworkers)]

    def job(part):
        arena = _acquire(arena_bytes)
        try:
            state = init(arena) if init is not None else None
            for c in part:
                work(arena, state, c)
            return state
        finally:
            _release(arena)

    if nworkers == 1:
        return [job(parts[0])]
    with _SingleThreadedBlas() as single:
        if not single:  # same chunks, same order, one thread
            return [job(p) for p in parts]
        ex = _get_executor(nworkers - 1)
        futs = [ex.submit(job, p) for p in parts[1:]]
        try:
            first = job(parts[0])
        finally:
            others = [f.result() for f in futs]  # wait for all before leaving the region
    return [first] + others


# ============================================================================ helpers
def _matrix_view(a, shape):
    """a reshaped to `shape` without copying, or None when that needs a copy."""
    try:
        v = a.view()
        v.shape = shape
        return v
    except AttributeError:
        return None


def _view(a, shape):
    """a reshaped to `shape` as a view (the layouts used here always allow it)."""
    v = _matrix_view(a, shape)
    if v is None:
        raise AssertionError(f"gpuconv: internal error, {a.shape} -> {shape} needs a copy")
    return v


def _blasable(m):
    """True if the (stack of) matrices m is laid out so BLAS can use it directly.

    Strides of size-1 axes are ignored (numpy gives them arbitrary values): a chunk of
    one column of a BLAS-ready image is as usable as the image itself."""
    it = m.itemsize
    if m.shape[-1] != 1 and m.strides[-1] != it:
        return False
    if m.shape[-2] != 1 and m.strides[-2] < m.shape[-1] * it:
        return False
    return all(s >= 0 for s, n in zip(m.strides, m.shape) if n != 1)


def _whole_image_blasable(a, G, rows):
    """Whether every image of a (N, G*rows, *spatial) is a (G, rows, prod(spatial)) BLAS
    matrix stack as a view.  Checked on a whole image, so that any run of first-dim
    rows of it is one too (a single row always is: it proves nothing)."""
    m = _matrix_view(a[0], (G, rows, math.prod(a.shape[2:])))
    return m is not None and _blasable(m)


def _tap_range(o0, o1, i0, i1, k, s, d, lo):
    """Outputs o in [o0, o1) whose input i = o*s + k*d - lo lies in [i0, i1):
    returns (a, b, i_a) with i_a the input index of o = a; a >= b when empty."""
    off = k * d - lo
    a = max(o0, -(-(i0 - off) // s))
    b = min(o1, (i1 - 1 - off) // s + 1)
    return a, b, a * s + off


def _in_rows_for(p0, p1, g):
    """Padded input rows [a, b) (first spatial dim) read by output rows p0:p1."""
    s, eff = g.stride[0], g.dilation[0] * (g.kernel[0] - 1) + 1
    return p0 * s, (p1 - 1) * s + eff


def _out_rows_for(h0, h1, g):
    """Output rows [p0, p1) (first spatial dim) whose windows touch input rows h0:h1."""
    s, d, lo = g.stride[0], g.dilation[0], g.pad_lo[0]
    eff = d * (g.kernel[0] - 1) + 1
    p0 = max(0, -(-(h0 + lo - eff + 1) // s))
    p1 = min(g.out_spatial[0], (h1 - 1 + lo) // s + 1)
    return p0, max(p0, p1)


def _needs_slab(g, x, cdt):
    return x.dtype != cdt or any(g.pad_lo) or any(g.pad_hi)


def _slab(x, g, n0, n1, c0, c1, a, b, arena, cdt, needed):
    """Input rows [a, b) in padded coordinates of images n0:n1, channels c0:c1, zero
    padded in every dim: a view of x when no padding/cast is needed, else a copy."""
    lo0 = g.pad_lo[0]
    if not needed:
        return x[n0:n1, c0:c1, a - lo0:b - lo0]
    rest_p = g.padded_spatial()[1:]
    buf = arena.take((n1 - n0, c1 - c0, b - a) + rest_p, cdt)
    H = g.in_spatial[0]
    r0, r1 = max(a, lo0), min(b, lo0 + H)  # padded rows holding data
    if r0 >= r1:
        buf[...] = 0
        return buf
    # zero the padding strips only
    if r0 > a:
        buf[:, :, :r0 - a] = 0
    if r1 < b:
        buf[:, :, r1 - a:] = 0
    inner = [slice(None), slice(None), slice(r0 - a, r1 - a)]
    for d in range(1, g.nd):
        lo, L = g.pad_lo[d], g.in_spatial[d]
        if lo:
            buf[tuple(inner) + (slice(None),) * (d - 1) + (slice(0, lo),)] = 0
        if g.pad_hi[d]:
            buf[tuple(inner) + (slice(None),) * (d - 1) + (slice(lo + L, None),)] = 0
    interior = tuple(inner) + tuple(slice(lo, lo + L) for lo, L in
                                    zip(g.pad_lo[1:], g.in_spatial[1:]))
    np.copyto(buf[interior], x[n0:n1, c0:c1, r0 - lo0:r1 - lo0], casting="unsafe")
    return buf


def _im2col_view(src, g, rows):
    """Window view (C, *kernel, nb, rows, *out_rest) of a slab src (nb, C, rin, *rest)."""
    nb, C = src.shape[:2]
    sn, sc = src.strides[:2]
    sp = src.strides[2:]
    shape = (C,) + g.kernel + (nb, rows) + g.out_spatial[1:]
    strides = ((sc,) + tuple(s * d for s, d in zip(sp, g.dilation)) + (sn,)
               + tuple(s * st for s, st in zip(sp, g.stride)))
    return as_strided(src, shape=shape, strides=strides, writeable=False)



def _columns(src, g, nbc, rows, arena, cdt, direct):
    """Column matrix (G, Cg*T, nbc*rows*Q) of a chunk: a view of the input slab when
    the convolution needs no copy (``direct``: 1x1, stride 1, no padding) and the
    view suits BLAS, else an im2col copy into the arena."""
    G, Cg, T = g.groups, g.Cg, g.taps
    L = rows * math.prod(g.out_spatial[1:])
    if direct and nbc == 1:
        colsm = _matrix_view(src[0], (G, Cg, L))
        if colsm is not None and _blasable(colsm):
            return colsm
    cols = arena.take((g.C,) + g.kernel + (nbc, rows) + g.out_spatial[1:], cdt)
    np.copyto(cols, _im2col_view(src, g, rows))
    return cols.reshape(G, Cg * T, nbc * L)

def _taps(g):
    return list(itertools.product(*[range(k) for k in g.kernel]))


def _balance_nb(nb, N, W):
    """Largest nb' <= nb whose chunk count ceil(N/nb') is a multiple of W (if any >= nb/2)."""
    if W <= 1:
        return nb
    for cand in range(nb, max(1, nb // 2) - 1, -1):
        if (-(-N // cand)) % W == 0:
            return cand
    return nb


def _plan(N, R, W, budget, cost, cols_per_row, min_cols=_MIN_GEMM_COLS):
    """Choose (nb images, r rows) per chunk: cost(nb, r) bytes <= budget when possible.

    Batches small images until a chunk has ~min_cols GEMM columns, keeps at least
    W chunks when the batch allows it, splits rows when one image does not fit.
    """
    if cost(1, R) <= budget:
        nb = max(1, min(-(-min_cols // max(1, cols_per_row * R)), -(-N // W)))
        while nb > 1 and cost(nb, R) > budget:
            nb -= 1
        nb = _balance_nb(nb, N, W)
        r = R
    else:
        nb = 1
        lo, hi = 1, R
        while lo < hi:  # largest r with cost(1, r) <= budget (at least 1)
            mid = (lo + hi + 1) // 2
            if cost(1, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        r = lo
    nchunks = -(-N // nb) * -(-R // r)
    if nchunks < W and nb == 1 and R > 1:  # too few images: split rows over the workers
        r = max(1, -(-R // -(-W // N)))
    return nb, r


def _budget(W):
    """Arena bytes one of W workers may use."""
    return max(1, get_workspace_limit() // W - _UFUNC_RESERVE)


def _chunks(N, R, nb, r):
    return [(n0, min(N, n0 + nb), p0, min(R, p0 + r))
            for n0 in range(0, N, nb) for p0 in range(0, R, r)]



# ============================================================================ flat depthwise
# A depthwise tap loop over a zero-padded "box" of the input flattened to 1-D.
# With stride s the box is split into s**nd phase planes (plane[rho][i] =
# padded_input[s*i + rho], per dim), so every tap reads ONE plane with unit
# stride: tap k (offset k*dil = s*a + rho per dim) reads plane rho at i = p + a.
# Output position p sits at grid index t = sum_d p_d * pitch_d (pitches of a
# plane), so tap k reads plane_flat[off_k + t] with off_k = sum_d a_d*pitch_d:
# every ufunc runs over one long contiguous run instead of short rows; the few
# grid columns past the output width are computed and dropped.

def _flat_ok(g):
    return all(st == g.stride[0] for st in g.stride)


class _Flat:
    """Plane and grid sizes of one flat tap loop producing `out` (per-dim extents)."""

    def __init__(self, out, kernel, dilation, s):
        nd = len(out)
        amax = [(d * (k - 1)) // s for k, d in zip(kernel, dilation)]
        ext = [o + a for o, a in zip(out, amax)]
        pitch = [1] * nd
        for d in range(nd - 2, -1, -1):
            pitch[d] = pitch[d + 1] * ext[d + 1]
        self.gshape = (out[0],) + tuple(ext[1:])
        self.n_t = math.prod(self.gshape)
        self.taps = []  # (phase index, flat offset) per tap
        for tap in itertools.product(*[range(k) for k in kernel]):
            ph, off = 0, 0
            for d in range(nd):
                a, rho = divmod(tap[d] * dilation[d], s)
                ph = ph * s + rho
                off += a * pitch[d]
            self.taps.append((ph, off))
        need = max(off for _, off in self.taps) + self.n_t
        ext[0] = max(ext[0], -(-need // pitch[0]))
        self.ext = tuple(ext)
        self.plane_len = math.prod(ext)
        self.n_ph = s ** nd
        self.box_len = self.n_ph * self.plane_len
        self.out = tuple(out)
        self.s = s
        self.nd = nd

    def window(self, boxf, k):
        """boxf (..., n_ph, plane_len): what tap k reads for every grid point (..., n_t)."""
        ph, off = self.taps[k]
        return boxf[..., ph, off:off + self.n_t]

    def valid(self, grid):
        """The output part of a (..., n_t) grid array, as (..., *out)."""
        lead = grid.shape[:-1]
        v = grid.reshape(lead + self.gshape)
        return v[(Ellipsis,) + tuple(slice(0, o) for o in self.out)]

    def fill(self, box, src, origin):
        """box (..., n_ph, *ext) <- phase planes of the zero-padded src, where box
        coordinate b (per dim, before phase splitting) reads src[b + origin]."""
        s, nd = self.s, self.nd
        used = {ph for ph, _ in self.taps}
        for ph, rhos in enumerate(itertools.product(range(s), repeat=nd)):
            if ph not in used:  # e.g. a kernel smaller than the stride: never read
                continue
            view, org = src, []
            for d, rho in enumerate(rhos):
                m = rho + origin[d]  # plane index i reads src[s*i + m]
                i0 = max(0, -(-(-m) // s))  # first i with s*i + m >= 0
                start = s * i0 + m
                ax = view.ndim - nd + d
                sl = [slice(None)] * view.ndim
                sl[ax] = slice(start, None, s) if start < view.shape[ax] else slice(0, 0)
                view = view[tuple(sl)]
                org.append(-i0)
            _fill_padded(box[(Ellipsis, ph) + (slice(None),) * nd], view, tuple(org))


def _fill_padded(buf, src, origin):
    """buf[..., j] = src[..., j + origin] where that index exists in src, else 0, over the
    trailing len(origin) dims (any sign of origin; casts to buf's dtype)."""
    nd = len(origin)
    lead = buf.ndim - nd
    bsl, ssl = [], []
    for d in range(nd):
        n_b, n_s, o = buf.shape[lead + d], src.shape[lead + d], origin[d]
        j0, j1 = max(0, -o), min(n_b, n_s - o)
        if j1 <= j0:
            buf[...] = 0
            return
        bsl.append((j0, j1))
        ssl.append(slice(j0 + o, j1 + o))
    for d, (j0, j1) in enumerate(bsl):  # zero the strips outside the copied block
        pre = (Ellipsis,) + tuple(slice(a, b) for a, b in bsl[:d])
        post = (slice(None),) * (nd - d - 1)
        if j0 > 0:
            buf[pre + (slice(0, j0),) + post] = 0
        if j1 < buf.shape[lead + d]:
            buf[pre + (slice(j1, None),) + post] = 0
    np.copyto(buf[(Ellipsis,) + tuple(slice(a, b) for a, b in bsl)],
              src[(Ellipsis,) + tuple(ssl)], casting="unsafe")


if hasattr(np, "vecdot"):
    def _rowdot(a, b):
        return np.vecdot(a, b)
else:  # numpy < 2.0
    def _rowdot(a, b):
        return np.einsum("...t,...t->...", a, b)


def _dw_row_chunks(N, C, R, cb, r):
    return [(n, c0, min(C, c0 + cb), p0, min(R, p0 + r))
            for n in range(N) for c0 in range(0, C, cb) for p0 in range(0, R, r)]

# ============================================================================ backend
class NumpyBackend:
    name = "numpy"
    xp = np

    # ------------------------------------------------------------------ common
    @staticmethod
    def _setup(g):
        cdt = _compute_dtype(g.dtype)
        W = get_num_threads()
        return cdt, cdt.itemsize, W

    @staticmethod
    def _direct_ok(g, x, cdt):
        """1x1, stride 1, unpadded, and x's images usable as (C, L) BLAS matrices."""
        if g.taps != 1 or any(s != 1 for s in g.stride) or _needs_slab(g, x, cdt):
            return False
        return _whole_image_blasable(x, g.groups, g.Cg)

    # ------------------------------------------------------------------ forward
    def forward(self, x, w, bias, g):
        cdt, it, W = self._setup(g)
        y = np.empty(g.y_shape, dtype=g.dtype)
        b = None if bias is None else np.ascontiguousarray(bias, dtype=cdt)
        if g.depthwise:
            if _flat_ok(g):
                self._forward_dw_flat(x, w, b, g, y, cdt, it, W)
            else:
                self._forward_depthwise(x, w, b, g, y, cdt, it, W)
        else:
            self._forward_dense(x, w, b, g, y, cdt, it, W)
        return y

    def _forward_dense(self, x, w, b, g, y, cdt, it, W):
        G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
        N, P0 = g.N, g.out_spatial[0]
        Qr = math.prod(g.out_spatial[1:])
        rest_p = math.prod(g.padded_spatial()[1:])
        wm = np.ascontiguousarray(w.reshape(G, Kg, Cg * T), dtype=cdt)
        slab = _needs_slab(g, x, cdt)
        direct = self._direct_ok(g, x, cdt)
        cast_out = y.dtype != cdt

        def sizes(nb, r):
            a, bb = _in_rows_for(0, r, g)
            s = []
            if slab:
                s.append(nb * C * (bb - a) * rest_p * it)
            if not (direct and nb == 1):
                s.append(C * T * nb * r * Qr * it)
            if nb > 1 or cast_out:
                s.append(K * nb * r * Qr * it)
            return s

        budget = _budget(W)
        nb, r = _plan(N, P0, W, budget, lambda nb, r: _arena_bytes(sizes(nb, r)), Qr)
        chunks = _chunks(N, P0, nb, r)
        arena_bytes = _arena_bytes(sizes(nb, r))
        bias_v = None if b is None else b.reshape(G, Kg, 1)

        def work(arena, _state, c):
            n0, n1, p0, p1 = c
            arena.reset()
            nbc, rows = n1 - n0, p1 - p0
            L = rows * Qr
            a, bb = _in_rows_for(p0, p1, g)
            src = _slab(x, g, n0, n1, 0, C, a, bb, arena, cdt, slab)
            colsm = _columns(src, g, nbc, rows, arena, cdt, direct)
            if nbc == 1 and not cast_out:
                dst = _view(y[n0, :, p0:p1], (G, Kg, L))  # y is fresh and contiguous
                np.matmul(wm, colsm, out=dst)
                if bias_v is not None:
                    np.add(dst, bias_v, out=dst)
                return
            buf = arena.take((G, Kg, nbc * L), cdt)
            np.matmul(wm, colsm, out=buf)
            if bias_v is not None:
                np.add(buf, bias_v, out=buf)
            res = buf.reshape((K, nbc, rows) + g.out_spatial[1:]).swapaxes(0, 1)
            np.copyto(y[n0:n1, :, p0:p1], res, casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    # ------------------------------------------------------------------ input grad
    def input_grad(self, gy, w, g):
        cdt, it, W = self._setup(g)
        gx = np.empty(g.x_shape, dtype=g.dtype)
        if g.depthwise:
            if _flat_ok(g) and all(st == 1 for st in g.stride):
                self._input_grad_dw_flat(gy, w, g, gx, cdt, it, W)
            else:
                self._input_grad_depthwise(gy, w, g, gx, cdt, it, W)
        else:
            self._input_grad_dense(gy, w, g, gx, cdt, it, W)
        return gx

    def _input_grad_dense(self, gy, w, g, gx, cdt, it, W):
        G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
        N, H = g.N, g.in_spatial[0]
        Qr = math.prod(g.out_spatial[1:])
        Lr = math.prod(g.in_spatial[1:])
        s0 = g.stride[0]
        eff0 = g.dilation[0] * (g.kernel[0] - 1) + 1
        # a transposed view: BLAS reads it as op(A) = A^T (no slow transposing copy)
        wmT = np.ascontiguousarray(w.reshape(G, Kg, Cg * T), dtype=cdt).swapaxes(1, 2)
        cast = gx.dtype != cdt
        gy_direct = gy.dtype == cdt  # else always staged (cast) through a buffer
        direct = (T == 1 and all(s == 1 for s in g.stride) and not any(g.pad_lo)
                  and not any(g.pad_hi) and not cast)

        def out_rows(h):  # most output rows touched by h input rows
            return min(g.out_spatial[0], -(-h // s0) + -(-eff0 // s0))

        def sizes(nb, h):
            rows = out_rows(h)
            s = [C * T * nb * rows * Qr * it]
            if nb > 1 or not gy_direct or not gy_is_blas_friendly:
                s.append(K * nb * rows * Qr * it)
            if cast:
                s.append(nb * C * h * Lr * it)
            return s

        gy_is_blas_friendly = gy_direct and _whole_image_blasable(gy, G, Kg)
        budget = _budget(W)
        nb, hr = _plan(N, H, W, budget, lambda nb, h: _arena_bytes(sizes(nb, h)), Lr)
        chunks = _chunks(N, H, nb, hr)
        arena_bytes = _arena_bytes(sizes(nb, hr))
        taps = _taps(g)
        # per-dim tap ranges of the trailing dims (same for every chunk)
        rest_ranges = []
        for tap in taps:
            rr = []
            for d in range(1, g.nd):
                rr.append(_tap_range(0, g.out_spatial[d], 0, g.in_spatial[d], tap[d], g.stride[d],
                                     g.dilation[d], g.pad_lo[d]))
            rest_ranges.append(rr)

        def work(arena, _state, c):
            n0, n1, h0, h1 = c
            arena.reset()
            nbc = n1 - n0
            p0, p1 = _out_rows_for(h0, h1, g)
            target = gx[n0:n1, :, h0:h1]
            if p1 <= p0:
                target[...] = 0
                return
            rows = p1 - p0
            L = rows * Qr
            gym = None
            if nbc == 1 and gy_direct:
                gym = _matrix_view(gy[n0, :, p0:p1], (G, Kg, L))
                if gym is not None and not _blasable(gym):
                    gym = None
            if gym is None:
                buf = arena.take((K, nbc, rows) + g.out_spatial[1:], cdt)
                np.copyto(buf, gy[n0:n1, :, p0:p1].swapaxes(0, 1), casting="unsafe")
                gym = buf.reshape(G, Kg, nbc * L)
            if direct and nbc == 1:  # 1x1 stride 1: the GEMM result is the gradient
                np.matmul(wmT, gym, out=_view(target[0], (G, Cg, L)))
                return
            gcols = arena.take((G, Cg * T, nbc * L), cdt)
            np.matmul(wmT, gym, out=gcols)
            gcols = gcols.reshape((C,) + g.kernel + (nbc, rows) + g.out_spatial[1:])
            acc = arena.take((nbc, C, h1 - h0) + g.in_spatial[1:], cdt) if cast else target
            ops = []
            full = None
            for tap, rr in zip(taps, rest_ranges):
                a0, b0, i0 = _tap_range(p0, p1, h0, h1, tap[0], s0, g.dilation[0], g.pad_lo[0])
                if a0 >= b0 or any(a >= b for a, b, _ in rr):
                    continue
                isl = (slice(i0 - h0, i0 - h0 + (b0 - a0 - 1) * s0 + 1, s0),) + tuple(
                    slice(i, i + (b - a - 1) * st + 1, st)
                    for (a, b, i), st in zip(rr, g.stride[1:]))
                osl = (slice(a0 - p0, b0 - p0),) + tuple(slice(a, b) for a, b, _ in rr)
                covers = (b0 - a0 == h1 - h0 and s0 == 1 and
                          all(b - a == L_d and st == 1
                              for (a, b, _), L_d, st in zip(rr, g.in_spatial[1:], g.stride[1:])))
                op = ((slice(None), slice(None)) + isl,
                      (slice(None),) + tap + (slice(None),) + osl)
                if covers and full is None:
                    full = op
                else:
                    ops.append(op)
            if full is not None:
                np.copyto(acc, gcols[full[1]].swapaxes(0, 1))
            else:
                acc[...] = 0
            for isl, osl in ops:
                av = acc[isl]
                np.add(av, gcols[osl].swapaxes(0, 1), out=av)
            if cast:
                np.copyto(target, acc, casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    # ------------------------------------------------------------------ weight grad
    def weight_grad(self, x, gy, g):
        cdt, it, W = self._setup(g)
        if g.depthwise:
            if _flat_ok(g):
                gw = self._weight_grad_dw_flat(x, gy, g, cdt, it, W)
            else:
                gw = self._weight_grad_depthwise(x, gy, g, cdt, it, W)
        else:
            gw = self._weight_grad_dense(x, gy, g, cdt, it, W)
        return gw.reshape(g.w_shape).astype(g.dtype, copy=False)

    def _weight_grad_dense(self, x, gy, g, cdt, it, W):
        G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
        N, P0 = g.N, g.out_spatial[0]
        Qr = math.prod(g.out_spatial[1:])
        rest_p = math.prod(g.padded_spatial()[1:])
        slab = _needs_slab(g, x, cdt)
        direct = self._direct_ok(g, x, cdt)
        gy_direct = gy.dtype == cdt
        gy_ok = gy_direct and _whole_image_blasable(gy, G, Kg)
        wbytes = G * Kg * Cg * T * it

        def sizes(nb, r, tmp=True):
            a, bb = _in_rows_for(0, r, g)
            s = [wbytes, wbytes if tmp else 0]  # this worker's partial sum, one GEMM result
            if slab:
                s.append(nb * C * (bb - a) * rest_p * it)
            if not (direct and nb == 1):
                s.append(C * T * nb * r * Qr * it)
            if nb > 1 or not gy_direct or not gy_ok:
                s.append(K * nb * r * Qr * it)
            return s

        total_cols = N * P0 * Qr
        if total_cols <= _WGRAD_ONE_GEMM_COLS and (
                _arena_bytes(sizes(N, P0, False)) <= _budget(1)):
            # short reduction (small images): one GEMM over the whole batch with
            # multi-threaded BLAS beats per-thread partial sums of a large gradient
            W = 1
            nb, r = N, P0
        else:
            nb, r = _plan(N, P0, W, _budget(W), lambda nb, r: _arena_bytes(sizes(nb, r)), Qr,
                          min_cols=2 * _MIN_GEMM_COLS)
        chunks = _chunks(N, P0, nb, r)
        need_tmp = len(chunks) > W  # some worker sums more than one GEMM result
        arena_bytes = _arena_bytes(sizes(nb, r, need_tmp))

        # OpenBLAS is faster with the larger of the two output dims as M: accumulate
        # the transposed gradient (G, Cg*T, Kg) when Cg*T > Kg
        # (the final transposing copy is slow, ~1 ns/element: only worth it for a
        # long reduction)
        trans = Cg * T > Kg and total_cols >= _WGRAD_TRANS_MIN_COLS
        pshape = (G, Cg * T, Kg) if trans else (G, Kg, Cg * T)

        def init(arena):
            return {"acc": arena.take(pshape, cdt),
                    "tmp": arena.take(pshape, cdt) if need_tmp else None,
                    "n": 0, "off": arena.off}

        def work(arena, st, c):
            n0, n1, p0, p1 = c
            arena.off = st["off"]  # keep the partial sums, reuse the rest
            nbc, rows = n1 - n0, p1 - p0
            L = rows * Qr
            a, bb = _in_rows_for(p0, p1, g)
            src = _slab(x, g, n0, n1, 0, C, a, bb, arena, cdt, slab)
            colsm = _columns(src, g, nbc, rows, arena, cdt, direct)
            gym = None
            if nbc == 1 and gy_direct and gy_ok:
                gym = _matrix_view(gy[n0, :, p0:p1], (G, Kg, L))
                if gym is not None and not _blasable(gym):
                    gym = None
            if gym is None:
                buf = arena.take((K, nbc, rows) + g.out_spatial[1:], cdt)
                np.copyto(buf, gy[n0:n1, :, p0:p1].swapaxes(0, 1), casting="unsafe")
                gym = buf.reshape(G, Kg, nbc * L)
            a, b = (colsm, gym.swapaxes(1, 2)) if trans else (gym, colsm.swapaxes(1, 2))
            if st["n"] == 0:
                np.matmul(a, b, out=st["acc"])
            else:
                np.matmul(a, b, out=st["tmp"])
                np.add(st["acc"], st["tmp"], out=st["acc"])
            st["n"] += 1

        gw = _run_parallel_sum(chunks, W, arena_bytes, work, init)
        return np.ascontiguousarray(gw.swapaxes(1, 2)) if trans else gw

    # ------------------------------------------------------------------ depthwise
    @staticmethod
    def _dw_plan(g, W, sizes, R, row_elems):
        """Depthwise chunking: (channel block cb, rows r) with about _DW_BLOCK_ELEMS
        output elements per block (kept in cache), at least 2 chunks per worker when
        the batch allows it, and an arena within the per-worker budget."""
        budget = _budget(W)
        C, N = g.C, g.N
        per_ch = max(1, row_elems * R * g.Kg)
        if per_ch <= _DW_BLOCK_ELEMS:
            cb, r = max(1, min(C, _DW_BLOCK_ELEMS // per_ch)), R
            while cb > 1 and N * -(-C // cb) < 2 * W:
                cb = -(-cb // 2)
        else:
            cb, r = 1, max(1, min(R, _DW_BLOCK_ELEMS // max(1, row_elems * g.Kg)))
        while _arena_bytes(sizes(cb, r)) > budget:
            if cb > 1:
                cb = -(-cb // 2)
            elif r > 1:
                r = -(-r // 2)
            else:
                break
        return cb, r

    # ------------------------------------------------------------------ flat depthwise
    def _forward_dw_flat(self, x, w, b, g, y, cdt, it, W):
        C, Kg, N, P0, s = g.C, g.Kg, g.N, g.out_spatial[0], g.stride[0]
        wt = np.ascontiguousarray(w.reshape(C, Kg, g.taps), dtype=cdt)

        def fl(rows):
            return _Flat((rows,) + g.out_spatial[1:], g.kernel, g.dilation, s)

        def sizes(cbc, rows):
            f = fl(rows)
            return [cbc * f.box_len * it, 2 * cbc * Kg * f.n_t * it]

        cb, r = self._dw_plan(g, W, sizes, P0, fl(1).n_t)
        chunks = _dw_row_chunks(N, C, P0, cb, r)
        arena_bytes = _arena_bytes(sizes(cb, r))
        bias = None if b is None else b.reshape(C, Kg, 1)

        def work(arena, _st, c):
            n, c0, c1, p0, p1 = c
            arena.reset()
            cbc, f = c1 - c0, fl(p1 - p0)
            box = arena.take((cbc, f.n_ph) + f.ext, cdt)
            f.fill(box, x[n, c0:c1], (p0 * s - g.pad_lo[0],) + tuple(
                -lo for lo in g.pad_lo[1:]))
            boxf = box.reshape(cbc, 1, f.n_ph, f.plane_len)
            acc = arena.take((cbc, Kg, f.n_t), cdt)
            tmp = arena.take((cbc, Kg, f.n_t), cdt)
            wv = wt[c0:c1, :, :, None]
            np.multiply(f.window(boxf, 0), wv[:, :, 0], out=acc)
            for k in range(1, g.taps):
                np.multiply(f.window(boxf, k), wv[:, :, k], out=tmp)
                np.add(acc, tmp, out=acc)
            if bias is not None:
                np.add(acc, bias[c0:c1], out=acc)
            np.copyto(y[n, c0 * Kg:c1 * Kg, p0:p1], f.valid(acc.reshape(cbc * Kg, f.n_t)),
                      casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    def _input_grad_dw_flat(self, gy, w, g, gx, cdt, it, W):
        """Stride 1: gx = correlation of gy, padded by (eff-1-lo) below, with the
        flipped kernel, summed over the channel multiplier."""
        C, Kg, N, H = g.C, g.Kg, g.N, g.in_spatial[0]
        T = g.taps
        wf = np.ascontiguousarray(
            w.reshape((C, Kg) + g.kernel)[(slice(None), slice(None)) +
                                          (slice(None, None, -1),) * g.nd].reshape(C, Kg, T),
            dtype=cdt)
        lo2 = [d * (k - 1) - lo for k, d, lo in zip(g.kernel, g.dilation, g.pad_lo)]

        def fl(rows):
            return _Flat((rows,) + g.in_spatial[1:], g.kernel, g.dilation, 1)

        def sizes(cbc, rows):
            f = fl(rows)
            return [cbc * Kg * f.box_len * it, 2 * cbc * f.n_t * it]

        cb, r = self._dw_plan(g, W, sizes, H, fl(1).n_t)
        chunks = _dw_row_chunks(N, C, H, cb, r)
        arena_bytes = _arena_bytes(sizes(cb, r))

        def work(arena, _st, c):
            n, c0, c1, h0, h1 = c
            arena.reset()
            cbc, f = c1 - c0, fl(h1 - h0)
            box = arena.take((cbc, Kg, 1) + f.ext, cdt)
            src = gy[n, c0 * Kg:c1 * Kg]
            src = src.reshape((cbc, Kg) + src.shape[1:])  # splitting a dim: a view
            f.fill(box, src, (h0 - lo2[0],) + tuple(-v for v in lo2[1:]))
            boxf = box.reshape(cbc, Kg, 1, f.plane_len)
            acc = arena.take((cbc, f.n_t), cdt)
            tmp = arena.take((cbc, f.n_t), cdt)
            first = True
            for kk in range(Kg):
                for k in range(T):
                    win = f.window(boxf[:, kk], k)
                    wk = wf[c0:c1, kk, k, None]
                    if first:
                        np.multiply(win, wk, out=acc)
                        first = False
                    else:
                        np.multiply(win, wk, out=tmp)
                        np.add(acc, tmp, out=acc)
            np.copyto(gx[n, c0:c1, h0:h1], f.valid(acc), casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    def _weight_grad_dw_flat(self, x, gy, g, cdt, it, W):
        C, Kg, N, P0, s = g.C, g.Kg, g.N, g.out_spatial[0], g.stride[0]
        T = g.taps
        wbytes = C * Kg * T * it

        def fl(rows):
            return _Flat((rows,) + g.out_spatial[1:], g.kernel, g.dilation, s)

        def sizes(cbc, rows):
            f = fl(rows)
            return [wbytes, cbc * f.box_len * it, cbc * Kg * f.n_t * it, cbc * Kg * T * it]

        cb, r = self._dw_plan(g, W, sizes, P0, fl(1).n_t)
        chunks = _dw_row_chunks(N, C, P0, cb, r)
        arena_bytes = _arena_bytes(sizes(cb, r))

        def init(arena):
            acc = arena.take((C, Kg, T), cdt)
            acc[...] = 0
            return {"acc": acc, "off": arena.off}

        def work(arena, st, c):
            n, c0, c1, p0, p1 = c
            arena.off = st["off"]
            cbc, f = c1 - c0, fl(p1 - p0)
            box = arena.take((cbc, f.n_ph) + f.ext, cdt)
            f.fill(box, x[n, c0:c1], (p0 * s - g.pad_lo[0],) + tuple(
                -lo for lo in g.pad_lo[1:]))
            boxf = box.reshape(cbc, 1, f.n_ph, f.plane_len)
            gyg = arena.take((cbc * Kg,) + f.gshape, cdt)
            _fill_padded(gyg, gy[n, c0 * Kg:c1 * Kg, p0:p1], (0,) * g.nd)
            gyg = gyg.reshape(cbc, Kg, f.n_t)
            part = arena.take((cbc, Kg, T), cdt)
            for k in range(T):
                part[:, :, k] = _rowdot(gyg, f.window(boxf, k))
            accv = st["acc"][c0:c1]
            np.add(accv, part, out=accv)

        gw = _run_parallel_sum(chunks, W, arena_bytes, work, init)
        return gw

    def _forward_depthwise(self, x, w, b, g, y, cdt, it, W):
        C, Kg, N, P0 = g.C, g.Kg, g.N, g.out_spatial[0]
        Qr = math.prod(g.out_spatial[1:])
        rest_p = math.prod(g.padded_spatial()[1:])
        wt = np.ascontiguousarray(w.reshape(C, Kg, g.taps), dtype=cdt)
        slab = _needs_slab(g, x, cdt)
        cast = y.dtype != cdt

        def sizes(cbc, rows):
            a, bb = _in_rows_for(0, rows, g)
            s = [cbc * Kg * rows * Qr * it]
            if cast:
                s.append(cbc * Kg * rows * Qr * it)
            if slab:
                s.append(cbc * (bb - a) * rest_p * it)
            return s

        cb, r = self._dw_plan(g, W, sizes, P0, Qr)
        chunks = [(n, c0, min(C, c0 + cb), p0, min(P0, p0 + r))
                  for n in range(N) for c0 in range(0, C, cb) for p0 in range(0, P0, r)]
        arena_bytes = _arena_bytes(sizes(cb, r))
        taps = _taps(g)
        nd = g.nd

        def work(arena, _st, c):
            n, c0, c1, p0, p1 = c
            arena.reset()
            cbc, rows = c1 - c0, p1 - p0
            a, bb = _in_rows_for(p0, p1, g)
            src = _slab(x, g, n, n + 1, c0, c1, a, bb, arena, cdt, slab)[0]  # (cb, rin, *rest)
            src = src[:, None]  # (cb, 1, rin, *rest)
            tshape = (cbc, Kg, rows) + g.out_spatial[1:]
            tmp = arena.take(tshape, cdt)
            if cast:
                acc = arena.take(tshape, cdt)
            else:
                acc = _view(y[n, c0 * Kg:c1 * Kg, p0:p1], tshape)
            wv = wt[c0:c1]
            for t, tap in enumerate(taps):
                win = src[(slice(None), slice(None)) + tuple(
                    slice(k * dl, k * dl + (n_ - 1) * st + 1, st)
                    for k, dl, st, n_ in zip(tap, g.dilation, g.stride,
                                             (rows,) + g.out_spatial[1:]))]
                wk = wv[:, :, t].reshape((cbc, Kg) + (1,) * nd)
                if t == 0:
                    np.multiply(win, wk, out=acc)
                else:
                    np.multiply(win, wk, out=tmp)
                    np.add(acc, tmp, out=acc)
            if b is not None:
                np.add(acc, b[c0 * Kg:c1 * Kg].reshape((cbc, Kg) + (1,) * nd), out=acc)
            if cast:
                np.copyto(y[n, c0 * Kg:c1 * Kg, p0:p1], acc.reshape((cbc * Kg, rows) +
                                                                     g.out_spatial[1:]),
                          casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    def _input_grad_depthwise(self, gy, w, g, gx, cdt, it, W):
        C, Kg, N, H = g.C, g.Kg, g.N, g.in_spatial[0]
        Lr = math.prod(g.in_spatial[1:])
        Qr = math.prod(g.out_spatial[1:])
        s0 = g.stride[0]
        eff0 = g.dilation[0] * (g.kernel[0] - 1) + 1
        wt = np.ascontiguousarray(w.reshape(C, Kg, g.taps), dtype=cdt)
        cast = gx.dtype != cdt
        gy_cast = gy.dtype != cdt

        def out_rows(h):
            return min(g.out_spatial[0], -(-h // s0) + -(-eff0 // s0))

        def sizes(cbc, h):
            s = [cbc * h * Lr * it]  # tmp: one tap's contribution, at most the block
            if cast:
                s.append(cbc * h * Lr * it)
            if gy_cast:
                s.append(cbc * Kg * out_rows(h) * Qr * it)
            return s

        cb, hr = self._dw_plan(g, W, sizes, H, Lr)
        chunks = [(n, c0, min(C, c0 + cb), h0, min(H, h0 + hr))
                  for n in range(N) for c0 in range(0, C, cb) for h0 in range(0, H, hr)]
        arena_bytes = _arena_bytes(sizes(cb, hr))
        taps = _taps(g)
        rest_ranges = [[_tap_range(0, g.out_spatial[d], 0, g.in_spatial[d], tap[d], g.stride[d],
                                   g.dilation[d], g.pad_lo[d]) for d in range(1, g.nd)]
                       for tap in taps]

        def work(arena, _st, c):
            n, c0, c1, h0, h1 = c
            arena.reset()
            cbc = c1 - c0
            target = gx[n, c0:c1, h0:h1]
            p0, p1 = _out_rows_for(h0, h1, g)
            if p1 <= p0:
                target[...] = 0
                return
            rows = p1 - p0
            gys = gy[n, c0 * Kg:c1 * Kg, p0:p1]
            if gy_cast:
                buf = arena.take(gys.shape, cdt)
                np.copyto(buf, gys, casting="unsafe")
                gys = buf
            gys = gys.reshape((cbc, Kg, rows) + g.out_spatial[1:])
            tmp_full = arena.take((cbc * (h1 - h0) * Lr,), cdt)
            acc = arena.take((cbc, h1 - h0) + g.in_spatial[1:], cdt) if cast else target
            ops, full = [], None
            for t, (tap, rr) in enumerate(zip(taps, rest_ranges)):
                a0, b0, i0 = _tap_range(p0, p1, h0, h1, tap[0], s0, g.dilation[0], g.pad_lo[0])
                if a0 >= b0 or any(a >= b for a, b, _ in rr):
                    continue
                isl = (slice(None), slice(i0 - h0, i0 - h0 + (b0 - a0 - 1) * s0 + 1, s0)) + tuple(
                    slice(i, i + (b - a - 1) * st + 1, st) for (a, b, i), st in zip(rr, g.stride[1:]))
                osl = (slice(a0 - p0, b0 - p0),) + tuple(slice(a, b) for a, b, _ in rr)
                covers = (b0 - a0 == h1 - h0 and s0 == 1 and Kg == 1 and
                          all(b - a == L_d and st == 1
                              for (a, b, _), L_d, st in zip(rr, g.in_spatial[1:], g.stride[1:])))
                if covers and full is None:
                    full = (t, isl, osl)
                else:
                    ops.append((t, isl, osl))
            bshape = (cbc,) + (1,) * g.nd
            if full is not None:
                t, isl, osl = full
                np.multiply(gys[(slice(None), 0) + osl], wt[c0:c1, 0, t].reshape(bshape), out=acc)
            else:
                acc[...] = 0
            for t, isl, osl in ops:
                av = acc[isl]
                tmp = tmp_full[:av.size].reshape(av.shape)
                for k in range(Kg):
                    np.multiply(gys[(slice(None), k) + osl], wt[c0:c1, k, t].reshape(bshape),
                                out=tmp)
                    np.add(av, tmp, out=av)
            if cast:
                np.copyto(target, acc, casting="unsafe")

        _run_parallel(chunks, W, arena_bytes, work)

    def _weight_grad_depthwise(self, x, gy, g, cdt, it, W):
        C, Kg, N, P0 = g.C, g.Kg, g.N, g.out_spatial[0]
        T = g.taps
        Qr = math.prod(g.out_spatial[1:])
        rest_p = math.prod(g.padded_spatial()[1:])
        slab = _needs_slab(g, x, cdt)
        gy_cast = gy.dtype != cdt
        wbytes = C * Kg * T * it

        def sizes(cbc, rows):
            a, bb = _in_rows_for(0, rows, g)
            s = [wbytes, cbc * Kg * rows * Qr * it]
            if slab:
                s.append(cbc * (bb - a) * rest_p * it)
            if gy_cast:
                s.append(cbc * Kg * rows * Qr * it)
            return s

        cb, r = self._dw_plan(g, W, sizes, P0, Qr)
        chunks = [(n, c0, min(C, c0 + cb), p0, min(P0, p0 + r))
                  for n in range(N) for c0 in range(0, C, cb) for p0 in range(0, P0, r)]

        arena_bytes = _arena_bytes(sizes(cb, r))
        taps = _taps(g)
        nd = g.nd
        red_axes = tuple(range(2, 2 + nd))

        def init(arena):
            acc = arena.take((C, Kg, T), cdt)
            acc[...] = 0
            return {"acc": acc, "off": arena.off}

        def work(arena, st, c):
            n, c0, c1, p0, p1 = c
            arena.off = st["off"]
            cbc, rows = c1 - c0, p1 - p0
            a, bb = _in_rows_for(p0, p1, g)
            src = _slab(x, g, n, n + 1, c0, c1, a, bb, arena, cdt, slab)[0][:, None]
            gys = gy[n, c0 * Kg:c1 * Kg, p0:p1]
            if gy_cast:
                buf = arena.take(gys.shape, cdt)
                np.copyto(buf, gys, casting="unsafe")
                gys = buf
            gys = gys.reshape((cbc, Kg, rows) + g.out_spatial[1:])
            tmp = arena.take(gys.shape, cdt)
            accv = st["acc"][c0:c1]
            for t, tap in enumerate(taps):
                win = src[(slice(None), slice(None)) + tuple(
                    slice(k * dl, k * dl + (n_ - 1) * stt + 1, stt)
                    for k, dl, stt, n_ in zip(tap, g.dilation, g.stride,
                                              (rows,) + g.out_spatial[1:]))]
                np.multiply(gys, win, out=tmp)
                accv[:, :, t] += tmp.sum(axis=red_axes)

        gw = _run_parallel_sum(chunks, W, arena_bytes, work, init)
        return gw


def _run_parallel_sum(chunks, nworkers, arena_bytes, work, init):
    """Run `work` over the chunks like _run_parallel, each worker accumulating into
    ``state["acc"]`` in its own arena; return the workers' sums added in worker order
    (a fixed order: deterministic for a given thread count) and release the arenas."""
    states = _run_parallel_keep(chunks, nworkers, arena_bytes, work, init)
    try:
        total = np.array(states[0][0]["acc"], copy=True)
        for st, _ in states[1:]:
            total += st["acc"]
    finally:
        for _, arena in states:
            _release(arena)
    return total


def _run_parallel_keep(chunks, nworkers, arena_bytes, work, init):
    """Like _run_parallel, but each worker's arena is returned with its state (the
    caller reads the partial sums in it, then releases the arenas)."""
    nworkers = max(1, min(nworkers, len(chunks)))
    parts = [chunks[i::nworkers] for i in range(nworkers)]

    def job(part):
        arena = _acquire(arena_bytes)
        try:
            state = init(arena)
            for c in part:
                work(arena, state, c)
        except BaseException:
            _release(arena)
            raise
        return state, arena

    if nworkers == 1:
        return [job(parts[0])]
    with _SingleThreadedBlas() as single:
        if not single:  # same chunks, same order, one thread
            results = []
            try:
                for p in parts:
                    results.append(job(p))
            except BaseException:
                for _, arena in results:
                    _release(arena)
                raise
            return results
        ex = _get_executor(nworkers - 1)
        futs = [ex.submit(job, p) for p in parts[1:]]
        results, err = [], None
        try:
            results.append(job(parts[0]))
        except BaseException as e:
            err = e
        for f in futs:
            try:
                results.append(f.result())
            except BaseException as e:
                err = err or e
    if err is not None:
        for _, arena in results:
            _release(arena)
        raise err
    return results
