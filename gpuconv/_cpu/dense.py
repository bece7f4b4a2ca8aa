"""CPU dense and grouped passes: chunked im2col + BLAS GEMM.

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

The slab, tap-range and chunk-planning helpers here serve the depthwise passes too.
Every pass takes a :class:`Pass` context first.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._geometry import ConvGeometry
from .parallel import matmul
from .parallel import run_parallel as _run_parallel
from .parallel import run_parallel_sum as _run_parallel_sum
from .workspace import arena_bytes as _arena_bytes
from .workspace import budget as _budget

# Tuning constants (measured on a 2-core AVX-512 machine; see benchmarks/RESULTS.md).
_MIN_GEMM_COLS = 1024        # batch small images until a GEMM has at least this many columns
_WGRAD_ONE_GEMM_COLS = 4096   # weight grad: up to this many N*P*Q columns, one batched GEMM
_WGRAD_TRANS_MIN_COLS = 4096  # weight grad: compute the transposed gradient from here up


@dataclass(frozen=True)
class Pass:
    """What every CPU pass needs besides its arrays: the geometry, the compute dtype
    (the accumulate dtype: float32 for half types) and its item size, and the number
    of worker threads."""

    g: ConvGeometry
    cdt: np.dtype
    itemsize: int
    workers: int


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
    s, eff = g.stride[0], g.effective_kernel[0]
    return p0 * s, (p1 - 1) * s + eff


def _out_rows_for(h0, h1, g):
    """Output rows [p0, p1) (first spatial dim) whose windows touch input rows h0:h1."""
    s, d, lo = g.stride[0], g.dilation[0], g.pad_lo[0]
    eff = g.effective_kernel[0]
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


def _balance_nb(nb, N, workers):
    """Largest nb' <= nb whose chunk count ceil(N/nb') is a multiple of workers (if any >= nb/2)."""
    if workers <= 1:
        return nb
    for cand in range(nb, max(1, nb // 2) - 1, -1):
        if (-(-N // cand)) % workers == 0:
            return cand
    return nb


def _plan(N, R, workers, budget, cost, cols_per_row, min_cols=_MIN_GEMM_COLS):
    """Choose (nb images, r rows) per chunk: cost(nb, r) bytes <= budget when possible.

    Batches small images until a chunk has ~min_cols GEMM columns, keeps at least
    workers chunks when the batch allows it, splits rows when one image does not fit.
    """
    if cost(1, R) <= budget:
        nb = max(1, min(-(-min_cols // max(1, cols_per_row * R)), -(-N // workers)))
        while nb > 1 and cost(nb, R) > budget:
            nb -= 1
        nb = _balance_nb(nb, N, workers)
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
    if nchunks < workers and nb == 1 and R > 1:  # too few images: split rows over the workers
        r = max(1, -(-R // -(-workers // N)))
    return nb, r


def _chunks(N, R, nb, r):
    return [(n0, min(N, n0 + nb), p0, min(R, p0 + r))
            for n0 in range(0, N, nb) for p0 in range(0, R, r)]


def _direct_ok(g, x, cdt):
    """1x1, stride 1, unpadded, and x's images usable as (C, L) BLAS matrices."""
    if g.taps != 1 or any(s != 1 for s in g.stride) or _needs_slab(g, x, cdt):
        return False
    return _whole_image_blasable(x, g.groups, g.Cg)


def forward(p, x, w, b, y):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
    N, P0 = g.N, g.out_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    rest_p = math.prod(g.padded_spatial()[1:])
    wm = np.ascontiguousarray(w.reshape(G, Kg, Cg * T), dtype=cdt)
    slab = _needs_slab(g, x, cdt)
    direct = _direct_ok(g, x, cdt)
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

    budget = _budget(workers)
    nb, r = _plan(N, P0, workers, budget, lambda nb, r: _arena_bytes(sizes(nb, r)), Qr)
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
            matmul(wm, colsm, dst)
            if bias_v is not None:
                np.add(dst, bias_v, out=dst)
            return
        buf = arena.take((G, Kg, nbc * L), cdt)
        matmul(wm, colsm, buf)
        if bias_v is not None:
            np.add(buf, bias_v, out=buf)
        res = buf.reshape((K, nbc, rows) + g.out_spatial[1:]).swapaxes(0, 1)
        np.copyto(y[n0:n1, :, p0:p1], res, casting="unsafe")

    _run_parallel(chunks, workers, arena_bytes, work)


def input_grad(p, gy, w, gx):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
    N, H = g.N, g.in_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    Lr = math.prod(g.in_spatial[1:])
    s0 = g.stride[0]
    eff0 = g.effective_kernel[0]
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
    budget = _budget(workers)
    nb, hr = _plan(N, H, workers, budget, lambda nb, h: _arena_bytes(sizes(nb, h)), Lr)
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
            matmul(wmT, gym, _view(target[0], (G, Cg, L)))
            return
        gcols = arena.take((G, Cg * T, nbc * L), cdt)
        matmul(wmT, gym, gcols)
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

    _run_parallel(chunks, workers, arena_bytes, work)


def weight_grad(p, x, gy):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    G, Cg, Kg, C, K, T = g.groups, g.Cg, g.Kg, g.C, g.K, g.taps
    N, P0 = g.N, g.out_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    rest_p = math.prod(g.padded_spatial()[1:])
    slab = _needs_slab(g, x, cdt)
    direct = _direct_ok(g, x, cdt)
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
        workers = 1
        nb, r = N, P0
    else:
        nb, r = _plan(N, P0, workers, _budget(workers), lambda nb, r: _arena_bytes(sizes(nb, r)), Qr,
                      min_cols=2 * _MIN_GEMM_COLS)
    chunks = _chunks(N, P0, nb, r)
    need_tmp = len(chunks) > workers  # some worker sums more than one GEMM result
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
            matmul(a, b, st["acc"])
        else:
            matmul(a, b, st["tmp"])
            np.add(st["acc"], st["tmp"], out=st["acc"])
        st["n"] += 1

    gw = _run_parallel_sum(chunks, workers, arena_bytes, work, init)
    return np.ascontiguousarray(gw.swapaxes(1, 2)) if trans else gw
