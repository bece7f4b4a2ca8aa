"""CPU depthwise passes (one input channel per group, any channel multiplier).

They run as loops over kernel taps of in-cache ufuncs on blocks of channels and
never call BLAS per channel.  Two forms: the "flat" tap loop over a zero-padded
box flattened to 1-D (equal strides in every dim), and the row-wise tap loop.
Every pass takes a :class:`gpuconv._cpu.dense.Pass` context first.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .._geometry import effective_kernel
from .dense import _in_rows_for, _needs_slab, _out_rows_for, _slab, _tap_range, _taps, _view
from .parallel import run_parallel as _run_parallel
from .parallel import run_parallel_sum as _run_parallel_sum
from .workspace import arena_bytes as _arena_bytes
from .workspace import budget as _budget

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
