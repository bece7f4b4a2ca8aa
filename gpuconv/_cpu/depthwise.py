"""CPU depthwise passes (one input channel per group, any channel multiplier).

* forward (every stride) and the stride-1 input grad: the banded GEMM
  (:func:`forward_band`, :func:`input_grad_band`, see "banded GEMM" below): one
  batched BLAS matmul per chunk of channels, images and row tiles;
* the strided input grad and the weight grad: loops over kernel taps of in-cache
  ufuncs on blocks of channels, in two forms: the "flat" tap loop over a zero-padded
  box flattened to 1-D (equal strides in every dim), and the row-wise tap loop (the
  flat forward / stride-1 input grad stay as references for benchmarks).
Every pass takes a :class:`gpuconv._cpu.dense.Pass` context first.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .._geometry import effective_kernel
from . import native
from .dense import _in_rows_for, _needs_slab, _out_rows_for, _slab, _tap_range, _taps, _view
from .parallel import matmul as _matmul
from .parallel import run_parallel as _run_parallel
from .parallel import run_parallel_sum as _run_parallel_sum
from .workspace import arena_bytes as _arena_bytes
from .workspace import _UFUNC_RESERVE
from .workspace import acquire as _acquire
from .workspace import budget as _budget
from .workspace import get_workspace_limit as _get_workspace_limit
from .workspace import release as _release

# elements of one output block.  Blocks that fit L2 (~48 K) are fastest on one
# thread, but every ufunc call then lasts only microseconds and two threads spend more
# time handing the GIL over than computing; 512 K-element blocks scale to 2 threads.
_DW_BLOCK_ELEMS = 512 * 1024



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
        amax = [(effective_kernel(k, d) - 1) // s for k, d in zip(kernel, dilation)]
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



def _dw_plan(g, workers, sizes, R, row_elems):
    """Depthwise chunking: (channel block cb, rows r) with about _DW_BLOCK_ELEMS
    output elements per block (kept in cache), at least 2 chunks per worker when
    the batch allows it, and an arena within the per-worker budget."""
    budget = _budget(workers)
    C, N = g.C, g.N
    per_ch = max(1, row_elems * R * g.Kg)
    if per_ch <= _DW_BLOCK_ELEMS:
        cb, r = max(1, min(C, _DW_BLOCK_ELEMS // per_ch)), R
        while cb > 1 and N * -(-C // cb) < 2 * workers:
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


def forward_flat(p, x, w, b, y):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    C, Kg, N, P0, s = g.C, g.Kg, g.N, g.out_spatial[0], g.stride[0]
    wt = np.ascontiguousarray(w.reshape(C, Kg, g.taps), dtype=cdt)

    def fl(rows):
        return _Flat((rows,) + g.out_spatial[1:], g.kernel, g.dilation, s)

    def sizes(cbc, rows):
        f = fl(rows)
        return [cbc * f.box_len * it, 2 * cbc * Kg * f.n_t * it]

    cb, r = _dw_plan(g, workers, sizes, P0, fl(1).n_t)
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

    _run_parallel(chunks, workers, arena_bytes, work)


def input_grad_flat(p, gy, w, gx):
    """Stride 1: gx = correlation of gy, padded by (eff-1-lo) below, with the
    flipped kernel, summed over the channel multiplier."""
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    C, Kg, N, H = g.C, g.Kg, g.N, g.in_spatial[0]
    T = g.taps
    wf = np.ascontiguousarray(
        w.reshape((C, Kg) + g.kernel)[(slice(None), slice(None)) +
                                      (slice(None, None, -1),) * g.nd].reshape(C, Kg, T),
        dtype=cdt)
    lo2 = [e - 1 - lo for e, lo in zip(g.effective_kernel, g.pad_lo)]

    def fl(rows):
        return _Flat((rows,) + g.in_spatial[1:], g.kernel, g.dilation, 1)

    def sizes(cbc, rows):
        f = fl(rows)
        return [cbc * Kg * f.box_len * it, 2 * cbc * f.n_t * it]

    cb, r = _dw_plan(g, workers, sizes, H, fl(1).n_t)
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

    _run_parallel(chunks, workers, arena_bytes, work)


def weight_grad_flat(p, x, gy):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    C, Kg, N, P0, s = g.C, g.Kg, g.N, g.out_spatial[0], g.stride[0]
    T = g.taps
    wbytes = C * Kg * T * it

    def fl(rows):
        return _Flat((rows,) + g.out_spatial[1:], g.kernel, g.dilation, s)

    def sizes(cbc, rows):
        f = fl(rows)
        return [wbytes, cbc * f.box_len * it, cbc * Kg * f.n_t * it, cbc * Kg * T * it]

    cb, r = _dw_plan(g, workers, sizes, P0, fl(1).n_t)
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

    gw = _run_parallel_sum(chunks, workers, arena_bytes, work, init)
    return gw


def forward(p, x, w, b, y):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
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

    cb, r = _dw_plan(g, workers, sizes, P0, Qr)
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

    _run_parallel(chunks, workers, arena_bytes, work)


def input_grad(p, gy, w, gx):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
    C, Kg, N, H = g.C, g.Kg, g.N, g.in_spatial[0]
    Lr = math.prod(g.in_spatial[1:])
    Qr = math.prod(g.out_spatial[1:])
    s0 = g.stride[0]
    eff0 = g.effective_kernel[0]
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

    cb, hr = _dw_plan(g, workers, sizes, H, Lr)
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

    _run_parallel(chunks, workers, arena_bytes, work)


def weight_grad(p, x, gy):
    g, cdt, it, workers = p.g, p.cdt, p.itemsize, p.workers
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

    cb, r = _dw_plan(g, workers, sizes, P0, Qr)
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

    gw = _run_parallel_sum(chunks, workers, arena_bytes, work, init)
    return gw


# ============================================================================ banded GEMM
# Depthwise forward (and the stride-1 input grad, the same correlation of gy with the
# flipped kernel) as one GEMM per channel and tile of Pt output rows of dim 0:
#
#   S[c, r, ks, jr, n, q] = src_padded[n, c*Ks + ks, r, s*q + jr*dil]    (rest dims: q, jr)
#   out[n, c*Ko + ko, t*Pt + pp, q] = sum_(v, ks, jr) T[c, pp, ko, v, ks, jr] *
#                                     S[c, s0*Pt*t + v, ks, jr, n, q]
#
# with T[c, pp, ko, s0*pp + i*d0, ks, jr] = W[c, ko, ks, i, jr] (banded: kh non-zero
# rows of dim 0 per output row).  S holds one strided copy of the (zero-padded) source
# per tap of the rest dims (kw copies in 2-D); the rows (v, ks, jr) of S for one tile
# are contiguous, so each tile is a plain (K' x nb*Q) matrix and every tile of every
# channel of a chunk runs as one batched matmul of (Ko*Pt) x K' by K' x (nb*Q) with
# K' = (s0*(Pt-1) + (kh-1)*d0 + 1) * Ks * prod(kernel[1:]).  No tap loops, no shifted
# adds: the kh vertical taps ride in the band of T (Pt + kh - 1 rows of work for Pt),
# the horizontal ones in K'.  The result is laid out (c, t, pp, ko, n, q) and copied
# (with the bias and the cast to the output dtype) into the output once.

# Pt: output rows of dim 0 per tile.  The GEMM does (s0*(Pt-1) + kh) / kh times the
# useful work (1.4x for 7x7, 2x for 3x3 at Pt = 4); larger Pt makes it larger, smaller Pt
# makes each GEMM too thin for BLAS (measured: Pt = 4 best for 3x3 and 7x7, s = 1 and 2).
_GEMM_TILE_ROWS = 4
_GEMM_CHUNK_BYTES = 1 << 20  # about this much of S per chunk (kept in L2)


class _Band:
    """Sizes of one banded-GEMM pass (dim 0 vertical; 1-D is run as 2-D with H = 1)."""

    def __init__(self, in_sp, out_sp, kernel, stride, dil, Ks, Ko, pt):
        self.in_sp, self.out_sp = tuple(in_sp), tuple(out_sp)
        self.kernel, self.stride, self.dil = tuple(kernel), tuple(stride), tuple(dil)
        self.Ks, self.Ko = Ks, Ko
        # kh = 1: the band is diagonal (Pt times the work), so one row per tile
        self.pt = 1 if kernel[0] == 1 else max(1, min(pt, out_sp[0]))
        self.Jr = math.prod(kernel[1:])
        self.Qr = math.prod(out_sp[1:])
        self.K = stride[0] * (self.pt - 1) + (kernel[0] - 1) * dil[0] + 1
        self.Kp = self.K * Ks * self.Jr
        self.rest_taps = list(itertools.product(*[range(k) for k in kernel[1:]]))

    def rows_in(self, ntiles):
        return self.stride[0] * (ntiles * self.pt - 1) + (self.kernel[0] - 1) * self.dil[0] + 1

    def s_elems(self, cb, nb, ntiles):
        return cb * self.rows_in(ntiles) * self.Ks * self.Jr * nb * self.Qr

    def o_elems(self, cb, nb, ntiles):
        return cb * ntiles * self.pt * self.Ko * nb * self.Qr

    def t_elems(self, cb):
        return cb * self.pt * self.Ko * self.Kp

    def build_t(self, T, W):
        """T (cb, pt, Ko, K, Ks, Jr) <- the band of W (cb, Ko, Ks, kh, Jr): for tap i of
        dim 0, the diagonal T[:, pp, :, s0*pp + i*d0] as one strided view (no temporaries)."""
        T[...] = 0
        s0, d0 = self.stride[0], self.dil[0]
        st = T.strides
        for i in range(self.kernel[0]):
            diag = np.lib.stride_tricks.as_strided(
                T[:, :, :, i * d0], shape=T.shape[:3] + T.shape[4:],
                strides=(st[0], st[1] + s0 * st[3], st[2], st[4], st[5]))
            np.copyto(diag, W[:, None, :, :, i])


def _band_pass(p, src, W, out, bias, band, pad_lo):
    """out (N, C*Ko, *out_sp) <- the banded GEMM of src (N, C*Ks, *in_sp) with
    W (C, Ko, Ks, kh, Jr) in the compute dtype; pad_lo: the source offset per dim
    (output index o of dim d reads source index s_d*o + k*dil_d - pad_lo[d])."""
    cdt, it, workers = p.cdt, p.itemsize, p.workers
    N, C = src.shape[0], W.shape[0]
    b = band
    P0 = b.out_sp[0]
    Ks, Ko, Jr, Qr, pt = b.Ks, b.Ko, b.Jr, b.Qr, b.pt
    if out.size == 0:
        return
    nt_all = -(-P0 // pt)
    limit = _get_workspace_limit()
    # the band matrices of every channel, built once, when they take a small part of
    # the workspace; else each chunk builds its own in its arena
    t_all_bytes = _arena_bytes([b.t_elems(C) * it])
    shared_t = t_all_bytes <= limit // 8
    budget = max(1, (limit - (t_all_bytes if shared_t else 0)) // workers - _UFUNC_RESERVE)

    def nbytes(cb, nb, nt):
        return _arena_bytes([b.s_elems(cb, nb, nt) * it, b.o_elems(cb, nb, nt) * it,
                             0 if shared_t else b.t_elems(cb) * it])

    # chunk = (images, channels, tiles): about _GEMM_CHUNK_BYTES of S, >= 2 chunks per
    # worker when possible, within the per-worker budget.
    target = min(_GEMM_CHUNK_BYTES, budget)
    cb, nb, nt = C, N, nt_all
    while b.s_elems(cb, nb, nt) * it > target and cb > 1:
        cb = -(-cb // 2)
    while b.s_elems(cb, nb, nt) * it > target and nt > 1:
        nt = -(-nt // 2)
    while b.s_elems(cb, nb, nt) * it > target and nb > 1:
        nb = -(-nb // 2)

    def count(cb, nb, nt):
        return -(-C // cb) * -(-N // nb) * -(-nt_all // nt)

    while count(cb, nb, nt) < 2 * workers and (cb > 1 or nt > 1):
        if cb > 1:
            cb = -(-cb // 2)
        else:
            nt = -(-nt // 2)
    while nbytes(cb, nb, nt) > budget and (cb > 1 or nt > 1 or nb > 1):
        if cb > 1:
            cb = -(-cb // 2)
        elif nt > 1:
            nt = -(-nt // 2)
        else:
            nb = -(-nb // 2)
    chunks = [(n0, min(N, n0 + nb), c0, min(C, c0 + cb), t0, min(nt_all, t0 + nt))
              for c0 in range(0, C, cb) for n0 in range(0, N, nb)
              for t0 in range(0, nt_all, nt)]
    arena_bytes = nbytes(cb, nb, nt)
    nd = len(b.in_sp)
    s0, lo0, H = b.stride[0], pad_lo[0], b.in_sp[0]
    # per rest tap: the valid output box [q0, q1) per rest dim and the source slices
    rest = []
    for jr in b.rest_taps:
        box, sl = [], []
        for d in range(1, nd):
            s, m, n_in, n_out = b.stride[d], jr[d - 1] * b.dil[d] - pad_lo[d], b.in_sp[d], b.out_sp[d]
            q0 = min(n_out, max(0, -(-(-m) // s)))  # first q with s*q + m >= 0
            q1 = max(q0, min(n_out, -(-(n_in - m) // s)))  # first q with s*q + m >= n_in
            box.append(slice(q0, q1))
            sl.append(slice(s * q0 + m, s * (q1 - 1) + m + 1, s) if q1 > q0 else None)
        rest.append((tuple(box), None if None in sl else tuple(sl)))
    rd = tuple(range(4, nd + 3))
    src_axes = (1, 3, 2, 0) + rd  # (nb, cb, Ks, H, *rest) -> (cb, H, Ks, nb, *rest)
    o_axes = (3, 0, 1, 2) + rd    # (cb, rows, Ko, nb, *rest) -> (nb, cb, rows, Ko, *rest)
    t_axes = (0, 1, 3, 2) + rd    # (nb, cb, Ko, rows, *rest) -> (nb, cb, rows, Ko, *rest)
    bias_v = None if bias is None else bias.reshape(C, Ko)
    t_arena = None
    if shared_t:
        t_arena = _acquire(t_all_bytes)
        T_all = t_arena.take((C, pt, Ko, b.K, Ks, Jr), cdt)
        b.build_t(T_all, W)

    def init(_arena):
        return {"key": None}

    def work(arena, st, ch):
        n0, n1, c0, c1, t0, t1 = ch
        arena.reset()
        cbc, nbc, ntc = c1 - c0, n1 - n0, t1 - t0
        R = b.rows_in(ntc)
        cols = nbc * Qr
        S = arena.take((cbc, R, Ks, Jr, nbc) + b.out_sp[1:], cdt)  # at offset 0
        if st["key"] != (cbc, nbc, ntc):
            # the zero columns (taps reading the padding) sit at the same place in every
            # chunk of this shape: written once per worker
            st["key"] = (cbc, nbc, ntc)
            for j, (box, sl) in enumerate(rest):
                Sj = S[:, :, :, j]
                if sl is None:
                    Sj[...] = 0
                    continue
                for d, bs in enumerate(box):
                    q0, q1 = bs.start, bs.stop
                    ax = 4 + d
                    lead = (slice(None),) * ax
                    if q0 > 0:
                        Sj[lead + (slice(0, q0),)] = 0
                    if q1 < Sj.shape[ax]:
                        Sj[lead + (slice(q1, None),)] = 0
        org0 = s0 * t0 * pt - lo0  # S row r reads source row r + org0
        ra, rb = max(0, -org0), min(R, H - org0)  # S rows that read source rows
        if rb <= ra:
            S[...] = 0
        else:
            if ra > 0:
                S[:, :ra] = 0
            if rb < R:
                S[:, rb:] = 0
        if rb > ra:
            srcv = src[n0:n1, c0 * Ks:c1 * Ks, ra + org0:rb + org0]
            srcv = srcv.reshape((nbc, cbc, Ks) + srcv.shape[2:]).transpose(src_axes)
            lead = (slice(None), slice(ra, rb), slice(None))
            all4 = (slice(None),) * 4
            for j, (box, sl) in enumerate(rest):
                if sl is not None:  # (cb, rows, Ks, nb, *rest)
                    np.copyto(S[lead + (j, slice(None)) + box], srcv[all4 + sl],
                              casting="unsafe")
        if shared_t:
            T = T_all[c0:c1]
        else:
            T = arena.take((cbc, pt, Ko, b.K, Ks, Jr), cdt)
            b.build_t(T, W[c0:c1])
        # the tiles of S as overlapping (K' x cols) matrices; S starts the arena
        tile = s0 * pt * Ks * Jr * cols
        B = np.ndarray((cbc, ntc, b.Kp, cols), dtype=cdt, buffer=arena.buf, offset=0,
                       strides=(R * Ks * Jr * cols * it, tile * it, cols * it, it))
        O = arena.take((cbc, ntc, pt * Ko, cols), cdt)
        _matmul(T.reshape(cbc, 1, pt * Ko, b.Kp), B, O)
        r0 = t0 * pt
        r1 = min(P0, t1 * pt)
        Ov = O.reshape((cbc, ntc * pt, Ko, nbc) + b.out_sp[1:])[:, :r1 - r0]
        Ov = Ov.transpose(o_axes)  # (nb, cb, rows, Ko, *rest)
        tgt = out[n0:n1, c0 * Ko:c1 * Ko, r0:r1]
        tgt = tgt.reshape((nbc, cbc, Ko) + tgt.shape[2:]).transpose(t_axes)
        if bias_v is None:
            np.copyto(tgt, Ov, casting="unsafe")
        else:
            bv = bias_v[c0:c1].reshape((1, cbc, 1, Ko) + (1,) * (nd - 1))
            np.add(Ov, bv, out=tgt, casting="unsafe")

    try:
        _run_parallel(chunks, workers, arena_bytes, work, init)
    finally:
        if t_arena is not None:
            _release(t_arena)


def _band_args(g):
    """(in_sp, out_sp, kernel, stride, dil, pad_lo) with 1-D promoted to 2-D (H = 1)."""
    if g.nd == 1:
        return ((1,) + g.in_spatial, (1,) + g.out_spatial, (1,) + g.kernel, (1,) + g.stride,
                (1,) + g.dilation, (0,) + g.pad_lo)
    return g.in_spatial, g.out_spatial, g.kernel, g.stride, g.dilation, g.pad_lo


def forward_band(p, x, w, b, y):
    g = p.g
    in_sp, out_sp, kernel, stride, dil, lo = _band_args(g)
    xv = x.reshape(x.shape[:2] + in_sp)
    yv = y.reshape(y.shape[:2] + out_sp)
    W = np.ascontiguousarray(w.reshape((g.C, g.Kg, 1, kernel[0], -1)), dtype=p.cdt)
    band = _Band(in_sp, out_sp, kernel, stride, dil, 1, g.Kg, _GEMM_TILE_ROWS)
    _band_pass(p, xv, W, yv, b, band, lo)


def input_grad_band(p, gy, w, gx):
    """Stride 1 only: gx = correlation of gy (offset eff-1-lo) with the flipped kernel,
    the channel multiplier summed inside the GEMM (Ks = Kg)."""
    g = p.g
    in_sp, out_sp, kernel, stride, dil, lo = _band_args(g)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    lo2 = tuple(e - 1 - l for e, l in zip(eff, lo))
    gyv = gy.reshape(gy.shape[:2] + out_sp)
    gxv = gx.reshape(gx.shape[:2] + in_sp)
    wf = w.reshape((g.C, g.Kg) + kernel)[(slice(None), slice(None)) +
                                         (slice(None, None, -1),) * len(kernel)]
    W = np.ascontiguousarray(wf.reshape((g.C, 1, g.Kg, kernel[0], -1)), dtype=p.cdt)
    band = _Band(out_sp, in_sp, kernel, (1,) * len(kernel), dil, g.Kg, 1, _GEMM_TILE_ROWS)
    _band_pass(p, gyv, W, gxv, None, band, lo2)


# ============================================================================ native
# The compiled direct kernels (native.py, dwconv.cpp) for float32/float64 C-contiguous
# operands: every pass, every stride, 1-3-D.  The work (planes n*C + c for the forward
# and the input grad, channels for the weight grad, which sums over the images inside
# one call) is split into contiguous ranges run by the backend's workers; each output
# element is computed by one call in one fixed order, so results are identical for any
# thread count.  Each worker's scratch (the zero-padded source planes of one plane of
# work) comes from its workspace arena; where it does not fit, the NumPy passes run.

def _native_run(p, pass_, total, arrays, scratch_dtype):
    g = p.g
    prm = native.params(g.N, g.C, 1, g.Kg, g.in_spatial, g.out_spatial, g.kernel, g.stride,
                        g.dilation, g.pad_lo)
    elems = native.scratch_elems(pass_, scratch_dtype, prm)
    it = np.dtype(scratch_dtype).itemsize
    workers = max(1, min(p.workers, total))
    if _arena_bytes([elems * it]) > _budget(workers):
        return False
    n_chunks = min(total, 4 * workers)
    bounds = [total * i // n_chunks for i in range(n_chunks + 1)]
    chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def work(arena, _st, c):
        arena.reset()
        scratch = arena.take((max(1, elems),), scratch_dtype)
        q = prm.copy()
        q[-2:] = c
        native.call(pass_, q, *arrays, scratch=scratch)

    _run_parallel(chunks, workers, _arena_bytes([elems * it]), work)
    return True


def _native_weight(p, w):
    return np.ascontiguousarray(w, dtype=p.cdt)


def forward_native(p, x, w, b, y):
    """True when the native kernel computed y (else nothing was written)."""
    if p.g.Cg != 1 or native.library() is None or not native.supports(x, y) or x.dtype != p.cdt:
        return False
    wc = _native_weight(p, w)
    return _native_run(p, "forward", p.g.N * p.g.C, (x, wc, b, y), p.cdt)


def input_grad_native(p, gy, w, gx):
    if p.g.Cg != 1 or native.library() is None or not native.supports(gy, gx) or gy.dtype != p.cdt:
        return False
    wc = _native_weight(p, w)
    return _native_run(p, "input_grad", p.g.N * p.g.C, (gy, wc, gx), p.cdt)


def weight_grad_native(p, x, gy):
    """The weight grad (C*Kg, 1, taps) in the compute dtype, or None."""
    if (p.g.Cg != 1 or native.library() is None or not native.supports(x, gy)
            or x.dtype != p.cdt):
        return None
    g = p.g
    gw = np.empty((g.C * g.Kg, 1, g.taps), dtype=p.cdt)
    if not _native_run(p, "weight_grad", g.C, (x, gy, gw), p.cdt):
        return None
    return gw
