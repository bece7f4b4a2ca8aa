"""CPU backend: chunked im2col + BLAS GEMM, tap loops for depthwise.

Memory is bounded: every temporary (the padded input chunk, the column buffer,
the GEMM result chunk) is sized so that together they stay under the workspace
limit (default 256 MiB; ``GPUCONV_WORKSPACE_MB`` or
:func:`gpuconv.set_workspace_limit`).  Chunks run over images and, when a single
image is too large, over rows of the first output dimension.

float16 / bfloat16 are computed in float32 and rounded once at the end;
float32 in float32; float64 in float64.
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np

_MB = 1 << 20
_workspace = None


def get_workspace_limit() -> int:
    """Current CPU workspace limit in bytes."""
    global _workspace
    if _workspace is None:
        env = os.environ.get("GPUCONV_WORKSPACE_MB")
        try:
            mb = float(env) if env else 256.0
        except ValueError:
            raise ValueError(f"GPUCONV_WORKSPACE_MB={env!r} is not a number of MiB") from None
        if mb <= 0:
            raise ValueError(f"GPUCONV_WORKSPACE_MB={env!r} must be > 0")
        _workspace = int(mb * _MB)
    return _workspace


def set_workspace_limit(megabytes) -> None:
    """Bound the temporaries of the CPU backend to ``megabytes`` MiB (> 0)."""
    global _workspace
    mb = float(megabytes)
    if not mb > 0:
        raise ValueError(f"set_workspace_limit: megabytes={megabytes!r} must be > 0")
    _workspace = int(mb * _MB)


def _compute_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


class _Plan:
    """Chunking of one pass: images per chunk and first-dim output rows per chunk."""

    def __init__(self, g, per_image_fixed, per_row):
        """per_image_fixed: bytes per image independent of rows (padded input etc.);
        per_row: bytes per image per output row of the first spatial dim."""
        limit = get_workspace_limit()
        P0 = g.out_spatial[0]
        per_image = per_image_fixed + per_row * P0
        if per_image <= limit:
            self.nb = max(1, min(g.N, limit // max(per_image, 1)))
            self.rows = P0
        else:
            self.nb = 1
            self.rows = max(1, min(P0, (limit - per_image_fixed) // max(per_row, 1)))
        self.N = g.N
        self.P0 = P0

    def chunks(self):
        for n0 in range(0, self.N, self.nb):
            n1 = min(self.N, n0 + self.nb)
            for p0 in range(0, self.P0, self.rows):
                yield n0, n1, p0, min(self.P0, p0 + self.rows)


def _pad_chunk(x, g, n0, n1, cdt):
    """Zero-padded copy of images n0:n1 in the compute dtype: (nb, C, *padded)."""
    xp = np.zeros((n1 - n0, x.shape[1]) + g.padded_spatial(), dtype=cdt)
    interior = (slice(None), slice(None)) + tuple(
        slice(lo, lo + l) for lo, l in zip(g.pad_lo, g.in_spatial))
    xp[interior] = x[n0:n1]
    return xp


def _window(g, tap, p0, p1):
    """Slices of the padded input read by kernel tap `tap` for output rows p0:p1."""
    sl = []
    for d in range(g.nd):
        a = tap[d] * g.dilation[d]
        lo_out, hi_out = (p0, p1) if d == 0 else (0, g.out_spatial[d])
        start = a + lo_out * g.stride[d]
        stop = start + (hi_out - lo_out - 1) * g.stride[d] + 1
        sl.append(slice(start, stop, g.stride[d]))
    return tuple(sl)


def _taps(g):
    return list(itertools.product(*[range(k) for k in g.kernel]))


def _im2col(xpad, g, p0, p1, cols):
    """cols (nb, C, T, rows, *rest) <- windows of xpad for every tap."""
    for t, tap in enumerate(_taps(g)):
        cols[:, :, t] = xpad[(slice(None), slice(None)) + _window(g, tap, p0, p1)]


class NumpyBackend:
    name = "numpy"
    xp = np

    # ------------------------------------------------------------------ forward
    def forward(self, x, w, bias, g):
        cdt = _compute_dtype(g.dtype)
        y = np.empty(g.y_shape, dtype=cdt)
        if g.depthwise:
            self._forward_depthwise(x, w, g, y, cdt)
        else:
            self._forward_dense(x, w, g, y, cdt)
        if bias is not None:
            y += bias.astype(cdt).reshape((1, -1) + (1,) * g.nd)
        return y if y.dtype == g.dtype else y.astype(g.dtype)

    def _forward_dense(self, x, w, g, y, cdt):
        G, Cg, Kg, T = g.groups, g.Cg, g.Kg, g.taps
        it = np.dtype(cdt).itemsize
        rest = math.prod(g.out_spatial[1:])
        plan = _Plan(g, per_image_fixed=g.C * math.prod(g.padded_spatial()) * it,
                     per_row=(g.C * T + g.K) * rest * it)
        wm = w.astype(cdt).reshape(G, Kg, Cg * T)
        for n0, n1, p0, p1 in plan.chunks():
            if p0 == 0:
                xpad = _pad_chunk(x, g, n0, n1, cdt)
            nb, rows = n1 - n0, p1 - p0
            cols = np.empty((nb, g.C, T, rows) + g.out_spatial[1:], dtype=cdt)
            _im2col(xpad, g, p0, p1, cols)
            out = np.matmul(wm, cols.reshape(nb, G, Cg * T, rows * rest))
            y[n0:n1, :, p0:p1] = out.reshape((nb, g.K, rows) + g.out_spatial[1:])

    def _forward_depthwise(self, x, w, g, y, cdt):
        G, Kg = g.groups, g.Kg
        it = np.dtype(cdt).itemsize
        rest = math.prod(g.out_spatial[1:])
        plan = _Plan(g, per_image_fixed=g.C * math.prod(g.padded_spatial()) * it,
                     per_row=2 * g.K * rest * it)
        wt = w.astype(cdt).reshape((G, Kg, g.taps) + (1,) * g.nd)
        yv = y.reshape((g.N, G, Kg) + g.out_spatial)
        for n0, n1, p0, p1 in plan.chunks():
            if p0 == 0:
                xpad = _pad_chunk(x, g, n0, n1, cdt)
            acc = yv[n0:n1, :, :, p0:p1]
            acc[...] = 0
            tmp = np.empty_like(acc)
            for t, tap in enumerate(_taps(g)):
                win = xpad[(slice(None), slice(None)) + _window(g, tap, p0, p1)][:, :, None]
                np.multiply(win, wt[:, :, t], out=tmp)
                acc += tmp

    # ------------------------------------------------------------------ input grad
    def input_grad(self, gy, w, g):
        cdt = _compute_dtype(g.dtype)
        G, Cg, Kg, T = g.groups, g.Cg, g.Kg, g.taps
        it = np.dtype(cdt).itemsize
        rest = math.prod(g.out_spatial[1:])
        gx = np.empty(g.x_shape, dtype=g.dtype)
        interior = (slice(None), slice(None)) + tuple(
            slice(lo, lo + l) for lo, l in zip(g.pad_lo, g.in_spatial))
        if g.depthwise:
            per_row = 2 * g.K * rest * it
        else:
            per_row = (g.C * T + g.K) * rest * it
        plan = _Plan(g, per_image_fixed=g.C * math.prod(g.padded_spatial()) * it, per_row=per_row)
        wc = w.astype(cdt)
        wmT = np.ascontiguousarray(wc.reshape(G, Kg, Cg * T).transpose(0, 2, 1))
        wt = wc.reshape((G, Kg, T) + (1,) * g.nd)
        taps = _taps(g)
        gxpad = None
        for n0, n1, p0, p1 in plan.chunks():
            nb, rows = n1 - n0, p1 - p0
            if p0 == 0:
                gxpad = np.zeros((nb, g.C) + g.padded_spatial(), dtype=cdt)
            gyc = gy[n0:n1, :, p0:p1].astype(cdt, copy=False)
            if g.depthwise:
                gyv = gyc.reshape((nb, G, Kg, rows) + g.out_spatial[1:])
                for t, tap in enumerate(taps):
                    contrib = (gyv * wt[:, :, t]).sum(axis=2) if Kg > 1 else gyv[:, :, 0] * wt[:, 0, t]
                    gxpad[(slice(None), slice(None)) + _window(g, tap, p0, p1)] += contrib
            else:
                gcols = np.matmul(wmT, gyc.reshape(nb, G, Kg, rows * rest))
                gcols = gcols.reshape((nb, g.C, T, rows) + g.out_spatial[1:])
                for t, tap in enumerate(taps):
                    gxpad[(slice(None), slice(None)) + _window(g, tap, p0, p1)] += gcols[:, :, t]
            if p1 == g.out_spatial[0]:
                gx[n0:n1] = gxpad[interior]
        return gx

    # ------------------------------------------------------------------ weight grad
    def weight_grad(self, x, gy, g):
        cdt = _compute_dtype(g.dtype)
        G, Cg, Kg, T = g.groups, g.Cg, g.Kg, g.taps
        it = np.dtype(cdt).itemsize
        rest = math.prod(g.out_spatial[1:])
        taps = _taps(g)
        if g.depthwise:
            per_row = 2 * g.K * rest * it
        else:
            per_row = (g.C * T + g.K) * rest * it
        plan = _Plan(g, per_image_fixed=g.C * math.prod(g.padded_spatial()) * it, per_row=per_row)
        gw = np.zeros((G, Kg, Cg * T), dtype=cdt)
        for n0, n1, p0, p1 in plan.chunks():
            nb, rows = n1 - n0, p1 - p0
            if p0 == 0:
                xpad = _pad_chunk(x, g, n0, n1, cdt)
            gyc = gy[n0:n1, :, p0:p1].astype(cdt, copy=False)
            if g.depthwise:
                gyv = gyc.reshape((nb, G, Kg, rows * rest))
                for t, tap in enumerate(taps):
                    win = xpad[(slice(None), slice(None)) + _window(g, tap, p0, p1)]
                    win = win.reshape(nb, G, rows * rest)
                    gw[:, :, t] += np.einsum("ngkl,ngl->gk", gyv, win)
            else:
                cols = np.empty((nb, g.C, T, rows) + g.out_spatial[1:], dtype=cdt)
                _im2col(xpad, g, p0, p1, cols)
                colsm = cols.reshape(nb, G, Cg * T, rows * rest)
                gym = np.ascontiguousarray(gyc).reshape(nb, G, Kg, rows * rest)
                gw += np.matmul(gym, colsm.transpose(0, 1, 3, 2)).sum(axis=0)
        return gw.reshape(g.w_shape).astype(g.dtype, copy=False)
