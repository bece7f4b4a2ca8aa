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

from .._geometry import ConvGeometry, dgrad_as_forward, flip_weight
from .parallel import add_into, copyto, hosted, matmul
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
    copyto(buf[interior], x[n0:n1, c0:c1, r0 - lo0:r1 - lo0])
    return buf


def _im2col_window(src, g, rows, kernel=None):
    """(shape, byte strides) of the window view (C, *kernel, nb, rows, *out_rest) of a
    slab src (nb, C, rin, *rest) (``kernel``: a leading block of taps, default all of
    g.kernel)."""
    nb, C = src.shape[:2]
    sn, sc = src.strides[:2]
    sp = src.strides[2:]
    shape = (C,) + (g.kernel if kernel is None else tuple(kernel)) + (nb, rows) + g.out_spatial[1:]
    strides = ((sc,) + tuple(s * d for s, d in zip(sp, g.dilation)) + (sn,)
               + tuple(s * st for s, st in zip(sp, g.stride)))
    return shape, strides


def _im2col_view(src, g, rows, kernel=None):
    """The window view itself (read-only)."""
    shape, strides = _im2col_window(src, g, rows, kernel)
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
    copyto(cols, src, _im2col_window(src, g, rows))
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


def _largest(lo, hi, ok):
    """Largest v in [lo, hi] with ok(v) (ok monotone decreasing), or None."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _block_plan(g, R, workers, budget, cost):
    """When one output row with the whole reduction does not fit: (r, cb, rb, ub) -- rows
    per chunk, input channels (per group), first-dim and second-dim kernel taps per
    reduction block -- with cost(r, cb, rb, ub) <= budget when any block fits (else the
    smallest)."""
    k0 = g.kernel[0]
    k1 = g.kernel[1] if g.nd > 1 else 1
    cb, rb, ub = 1, 1, 1
    c = _largest(1, g.Cg, lambda v: cost(1, v, k0, k1) <= budget)
    if c is not None:
        cb, rb, ub = c, k0, k1
    else:
        t = _largest(1, k0, lambda v: cost(1, 1, v, k1) <= budget)
        if t is not None:
            rb, ub = t, k1
        else:
            ub = _largest(1, k1, lambda v: cost(1, 1, 1, v) <= budget) or 1
    r = _largest(1, R, lambda v: cost(v, cb, rb, ub) <= budget) or 1
    return r, cb, rb, ub


def _blocks(g, cb, rb, ub):
    """Reduction blocks (group, c0, c1, t0, t1, u0, u1): input channels c0:c1 of the
    group, first-dim kernel taps t0:t1 and second-dim taps u0:u1, in a fixed order."""
    k1 = g.kernel[1] if g.nd > 1 else 1
    return [(gi, c0, min(g.Cg, c0 + cb), t0, min(g.kernel[0], t0 + rb), u0, min(k1, u0 + ub))
            for gi in range(g.groups) for c0 in range(0, g.Cg, cb)
            for t0 in range(0, g.kernel[0], rb) for u0 in range(0, k1, ub)]


def _block_kernel(g, blk):
    """Kernel shape of a reduction block: (t1-t0, u1-u0, *kernel[2:])."""
    _, _, _, t0, t1, u0, u1 = blk
    return (t1 - t0,) + (((u1 - u0),) + g.kernel[2:] if g.nd > 1 else ())


def _block_columns(x, g, n, p0, p1, blk, arena, cdt, slab):
    """Column matrix (cb*|taps|, rows*Q) of image n, output rows p0:p1, reduction block blk."""
    gi, c0, c1, t0, t1, u0, _ = blk
    s0, d0 = g.stride[0], g.dilation[0]
    a = p0 * s0 + t0 * d0
    b = (p1 - 1) * s0 + (t1 - 1) * d0 + 1
    src = _slab(x, g, n, n + 1, gi * g.Cg + c0, gi * g.Cg + c1, a, b, arena, cdt, slab)
    if g.nd > 1 and u0:
        src = src[:, :, :, u0 * g.dilation[1]:]
    kb = _block_kernel(g, blk)
    view = _im2col_view(src, g, p1 - p0, kb)
    cols = arena.take(view.shape, cdt)
    np.copyto(cols, view, casting="unsafe")
    return cols.reshape((c1 - c0) * math.prod(kb), -1)


def _block_weight(w, g, blk, arena, cdt):
    """The weight block (Kg, cb*|taps|) of the block's group (a copy in the arena)."""
    gi, c0, c1, t0, t1, u0, u1 = blk
    src = w[gi * g.Kg:(gi + 1) * g.Kg, c0:c1, t0:t1]
    if g.nd > 1:
        src = src[:, :, :, u0:u1]
    buf = arena.take(src.shape, cdt)
    np.copyto(buf, src, casting="unsafe")
    return buf.reshape(g.Kg, -1)


def _blocked_sizes(g, it, slab, r, cb, rb, ub):
    """Arena bytes of one reduction block of r output rows: slab, columns, weight block."""
    s0, d0 = g.stride[0], g.dilation[0]
    rest_p = math.prod(g.padded_spatial()[1:])
    Qr = math.prod(g.out_spatial[1:])
    taps = rb * ub * math.prod(g.kernel[2:])
    rin = (r - 1) * s0 + (rb - 1) * d0 + 1
    return [cb * rin * rest_p * it if slab else 0, cb * taps * r * Qr * it, g.Kg * cb * taps * it]


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
    if _arena_bytes(sizes(1, 1)) > budget:  # one output row does not fit: split the reduction
        return _forward_blocked(p, x, w, b, y, budget)
    wm = np.ascontiguousarray(w.reshape(G, Kg, Cg * T), dtype=cdt)
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
        copyto(y[n0:n1, :, p0:p1], res)

    _run_parallel(chunks, workers, arena_bytes, work)


def _split_rows(N, R, r, workers):
    """Rows per chunk: r, or fewer so that N images give at least `workers` chunks."""
    if N * -(-R // r) < workers and R > 1:
        r = min(r, max(1, -(-R // -(-workers // N))))
    return r


def _forward_blocked(p, x, w, b, y, budget):
    """Forward when one output row with the whole reduction exceeds the budget: each chunk
    (one image, r output rows) sums the GEMMs of reduction blocks (input channels x
    first-dim taps) in a fixed order into the output rows."""
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    Kg, P0 = g.Kg, g.out_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    slab = _needs_slab(g, x, cdt)
    cast_out = y.dtype != cdt

    def cost(r, cb, rb, ub):
        s = _blocked_sizes(g, it, slab, r, cb, rb, ub)
        s += [Kg * r * Qr * it, Kg * r * Qr * it if cast_out else 0]  # GEMM result, staging
        return _arena_bytes(s)

    r, cb, rb, ub = _block_plan(g, P0, workers, budget, cost)
    r = _split_rows(g.N, P0, r, workers)
    blocks = _blocks(g, cb, rb, ub)
    chunks = _chunks(g.N, P0, 1, r)
    bias = None if b is None else b.reshape(g.groups, Kg, 1)

    def work(arena, _state, c):
        n, _, p0, p1 = c
        L = (p1 - p0) * Qr
        for gi in range(g.groups):
            arena.reset()
            dst = _view(y[n, gi * Kg:(gi + 1) * Kg, p0:p1], (Kg, L))
            acc = arena.take((Kg, L), cdt) if cast_out else dst
            tmp = arena.take((Kg, L), cdt)
            base = arena.off
            first = True
            for blk in blocks:
                if blk[0] != gi:
                    continue
                arena.off = base
                colsm = _block_columns(x, g, n, p0, p1, blk, arena, cdt, slab)
                wb = _block_weight(w, g, blk, arena, cdt)
                if first:
                    matmul(wb, colsm, acc)
                    first = False
                else:
                    matmul(wb, colsm, tmp)
                    np.add(acc, tmp, out=acc)
            if bias is not None:
                np.add(acc, bias[gi], out=acc)
            if cast_out:
                np.copyto(dst, acc, casting="unsafe")

    _run_parallel(chunks, workers, cost(r, cb, rb, ub), work)


def input_grad(p, gy, w, gx):
    g = p.g
    ga = dgrad_as_forward(g) if g.taps > 1 else None
    if ga is not None and not _weight_outweighs_columns(g) and np.isfinite(w).all():
        # stride 1: the forward convolution of grad_out with the flipped weight -- the
        # forward's speed and memory bound (the col2im below recomputes each output
        # row once per input-row chunk it touches: slow for large kernels).  Not with a
        # non-finite weight: its products with grad_out's zero padding would be NaN
        # where the reference (no such products) is finite.
        return forward(Pass(g=ga, cdt=p.cdt, itemsize=p.itemsize, workers=p.workers),
                       gy, flip_weight(w, g), None, gx)
    return _input_grad_col2im(p, gy, w, gx)


def _weight_outweighs_columns(g):
    """Inside a host framework (one chunk thread, so whole images per chunk and no
    recomputed rows in the col2im): whether the flipped weight the forward route copies
    (and scans for non-finite values) is at least as large as the grad_out columns it
    saves -- deep layers on small images, where the col2im of a GEMM straight from a
    transposed view of the weight is the cheaper route."""
    return hosted() and g.C >= g.N * math.prod(g.in_spatial)


def _gy_rows(gy, g, n, gi, p0, p1, arena, cdt):
    """grad_out rows p0:p1 of image n, group gi, as a (Kg, rows*Q) BLAS matrix (a view
    where possible, else a cast copy in the arena)."""
    Kg = g.Kg
    L = (p1 - p0) * math.prod(g.out_spatial[1:])
    src = gy[n, gi * Kg:(gi + 1) * Kg, p0:p1]
    if gy.dtype == cdt:
        m = _matrix_view(src, (Kg, L))
        if m is not None and _blasable(m):
            return m
    buf = arena.take(src.shape, cdt)
    np.copyto(buf, src, casting="unsafe")
    return buf.reshape(Kg, L)


def _input_grad_blocked(p, gy, w, gx, budget):
    """Input gradient by col2im when one input row with the whole reduction exceeds the
    budget: per chunk (one image, h input rows) and group, the GEMM of each block of
    input channels x first-dim taps is scattered into those channels' rows."""
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    Kg, Cg, H, P0 = g.Kg, g.Cg, g.in_spatial[0], g.out_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    Lr = math.prod(g.in_spatial[1:])
    Tr = math.prod(g.kernel[1:])
    s0, d0, lo0 = g.stride[0], g.dilation[0], g.pad_lo[0]
    eff0 = g.effective_kernel[0]
    cast = gx.dtype != cdt

    def out_rows(h):
        return min(P0, -(-h // s0) + -(-eff0 // s0))

    def cost(h, cb, rb, ub):
        rows = out_rows(h)
        taps = rb * ub * math.prod(g.kernel[2:])
        return _arena_bytes([Kg * rows * Qr * it, cb * taps * rows * Qr * it,
                             Kg * cb * taps * it, cb * h * Lr * it if cast else 0])

    hr, cb, rb, ub = _block_plan(g, H, workers, budget, cost)
    hr = _split_rows(g.N, H, hr, workers)
    chunks = _chunks(g.N, H, 1, hr)
    blocks = _blocks(g, cb, rb, ub)
    rest_taps = list(itertools.product(*[range(k) for k in g.kernel[1:]]))
    rest_ranges = [[_tap_range(0, g.out_spatial[d], 0, g.in_spatial[d], t[d - 1], g.stride[d],
                               g.dilation[d], g.pad_lo[d]) for d in range(1, g.nd)]
                   for t in rest_taps]

    def work(arena, _state, c):
        n, _, h0, h1 = c
        p0, p1 = _out_rows_for(h0, h1, g)
        target = gx[n, :, h0:h1]
        if p1 <= p0:
            target[...] = 0
            return
        rows = p1 - p0
        for gi in range(g.groups):
            arena.reset()
            gym = _gy_rows(gy, g, n, gi, p0, p1, arena, cdt)
            after_gy = arena.off
            for c0 in range(0, Cg, cb):
                c1 = min(Cg, c0 + cb)
                arena.off = after_gy
                ch = slice(gi * Cg + c0, gi * Cg + c1)
                acc = arena.take((c1 - c0, h1 - h0) + g.in_spatial[1:], cdt) if cast else target[ch]
                acc[...] = 0
                base = arena.off
                for blk in blocks:
                    if blk[:3] != (gi, c0, c1):
                        continue
                    _, _, _, t0, t1, u0, u1 = blk
                    arena.off = base
                    wb = _block_weight(w, g, blk, arena, cdt)
                    gc = arena.take((wb.shape[1], gym.shape[1]), cdt)
                    matmul(wb.T, gym, gc)
                    kb = _block_kernel(g, blk)
                    gc = gc.reshape((c1 - c0,) + kb + (rows,) + g.out_spatial[1:])
                    for t in range(t0, t1):
                        a0, b0, i0 = _tap_range(p0, p1, h0, h1, t, s0, d0, lo0)
                        if a0 >= b0:
                            continue
                        for tap, rr in zip(rest_taps, rest_ranges):
                            if (g.nd > 1 and not u0 <= tap[0] < u1) or any(a >= b for a, b, _ in rr):
                                continue
                            btap = (tap[0] - u0,) + tap[1:] if g.nd > 1 else ()
                            isl = (slice(i0 - h0, i0 - h0 + (b0 - a0 - 1) * s0 + 1, s0),) + tuple(
                                slice(i, i + (b - a - 1) * st + 1, st)
                                for (a, b, i), st in zip(rr, g.stride[1:]))
                            osl = (slice(a0 - p0, b0 - p0),) + tuple(slice(a, b) for a, b, _ in rr)
                            av = acc[(slice(None),) + isl]
                            np.add(av, gc[(slice(None), t - t0) + btap + osl], out=av)
                if cast:
                    np.copyto(target[ch], acc, casting="unsafe")

    _run_parallel(chunks, workers, cost(hr, cb, rb, ub), work)


def _input_grad_col2im(p, gy, w, gx):
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
    if _arena_bytes(sizes(1, 1)) > budget:  # one input row does not fit: split the reduction
        return _input_grad_blocked(p, gy, w, gx, budget)
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
            copyto(buf, gy[n0:n1, :, p0:p1].swapaxes(0, 1))
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
            copyto(acc, gcols[full[1]].swapaxes(0, 1))
        else:
            acc[...] = 0
        for isl, osl in ops:
            av = acc[isl]
            add_into(av, gcols[osl].swapaxes(0, 1))
        if cast:
            copyto(target, acc)

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

    if _arena_bytes(sizes(1, 1)) > _budget(workers):
        # one output row with the whole reduction (or the per-thread partial sums) does
        # not fit: split the reduction into blocks, each worker owning whole blocks
        return _weight_grad_blocked(p, x, gy)
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

    single = min(workers, len(chunks)) == 1

    def init(arena):
        # one worker sums straight into the result (no copy of the gradient out of the arena)
        return {"acc": np.empty(pshape, cdt) if single else arena.take(pshape, cdt),
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
            copyto(buf, gy[n0:n1, :, p0:p1].swapaxes(0, 1))
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


def _weight_grad_blocked(p, x, gy):
    """Weight gradient by reduction blocks (input channels x first-dim taps of a group):
    the blocks are disjoint parts of the gradient, spread over the workers; each sums
    its GEMMs over the images and row chunks in a fixed order."""
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    Kg, P0 = g.Kg, g.out_spatial[0]
    Qr = math.prod(g.out_spatial[1:])
    Tr = math.prod(g.kernel[1:])
    slab = _needs_slab(g, x, cdt)
    budget = _budget(workers)

    def cost(r, cb, rb, ub):
        s = _blocked_sizes(g, it, slab, r, cb, rb, ub)
        taps = rb * ub * math.prod(g.kernel[2:])
        s += [Kg * r * Qr * it, 2 * Kg * cb * taps * it]  # gy staging, sum and GEMM result
        return _arena_bytes(s)

    r, cb, rb, ub = _block_plan(g, P0, workers, budget, cost)
    blocks = _blocks(g, cb, rb, ub)
    rows = _chunks(g.N, P0, 1, r)
    gw = np.empty((g.K, g.Cg) + g.kernel, dtype=cdt)

    def work(arena, _state, blk):
        gi, c0, c1, t0, t1, u0, u1 = blk
        arena.reset()
        kb = _block_kernel(g, blk)
        nred = (c1 - c0) * math.prod(kb)
        acc = arena.take((Kg, nred), cdt)
        tmp = arena.take((Kg, nred), cdt)
        base = arena.off
        for i, (n, _, p0, p1) in enumerate(rows):
            arena.off = base
            colsm = _block_columns(x, g, n, p0, p1, blk, arena, cdt, slab)
            gym = _gy_rows(gy, g, n, gi, p0, p1, arena, cdt)
            if i == 0:
                matmul(gym, colsm.T, acc)
            else:
                matmul(gym, colsm.T, tmp)
                np.add(acc, tmp, out=acc)
        dst = gw[gi * Kg:(gi + 1) * Kg, c0:c1, t0:t1]
        if g.nd > 1:
            dst = dst[:, :, :, u0:u1]
        dst[...] = acc.reshape((Kg, c1 - c0) + kb)

    _run_parallel(blocks, workers, cost(r, cb, rb, ub), work)
    return gw
