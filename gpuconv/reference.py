"""Float64 direct convolution: the yardstick every backend is tested against.

Deliberately naive and independent of the backends: no im2col, no slicing
tricks.  For every kernel tap it computes, with explicit index arithmetic, the
input position each output position reads (``i = o*stride + r*dilation - pad_lo``),
masks the positions that fall in the padding, and accumulates with an einsum
over channels.  The input gradient scatters with ``np.add.at``.  Written for
clarity, not speed: use it on small problems.

Arrays are numpy (or anything ``np.asarray`` accepts); results are float64.
Shapes follow the library: x ``(N, C, *L)``, w ``(K, C/groups, *R)``,
y ``(N, K, *P)``.
"""
from __future__ import annotations

import itertools

import numpy as np

from ._geometry import conv_geometry

__all__ = ["conv", "conv_input_grad", "conv_weight_grad", "conv_bias_grad", "geometry"]


def geometry(x_shape, w_shape, *, stride=1, padding=0, dilation=1, groups=1):
    return conv_geometry("reference", x_shape, w_shape, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, dtype=np.float64)


def _gather_index(g, tap):
    """For one tap: per spatial dim, the input index of every output position and its mask."""
    idx, ok = [], []
    for d in range(g.nd):
        o = np.arange(g.out_spatial[d])
        i = o * g.stride[d] + tap[d] * g.dilation[d] - g.pad_lo[d]
        idx.append(i)
        ok.append((i >= 0) & (i < g.in_spatial[d]))
    # full broadcast grids over the output positions
    grids = np.meshgrid(*idx, indexing="ij")
    masks = np.meshgrid(*ok, indexing="ij")
    valid = np.logical_and.reduce(masks)
    return [np.where(valid, gi, 0) for gi in grids], valid


def _f64(a):
    return np.asarray(a).astype(np.float64)


def conv(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
    x, w = _f64(x), _f64(w)
    g = geometry(x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    G, Cg, Kg = g.groups, g.Cg, g.Kg
    y = np.zeros(g.y_shape)
    for tap in itertools.product(*[range(r) for r in g.kernel]):
        grids, valid = _gather_index(g, tap)
        # np.where, not "* valid": a NaN/Inf read through a clamped index must not leak
        patch = np.where(valid, x[(slice(None), slice(None)) + tuple(grids)], 0.0)  # (N, C, *P)
        for gi in range(G):
            wk = w[(slice(gi * Kg, (gi + 1) * Kg), slice(None)) + tap]  # (Kg, Cg)
            y[:, gi * Kg:(gi + 1) * Kg] += np.einsum("kc,nc...->nk...", wk,
                                                      patch[:, gi * Cg:(gi + 1) * Cg])
    if bias is not None:
        y += _f64(bias).reshape((1, -1) + (1,) * g.nd)
    return y


def conv_input_grad(gy, w, input_shape, *, stride=1, padding=0, dilation=1, groups=1):
    gy, w = _f64(gy), _f64(w)
    g = geometry(input_shape, w.shape, stride=stride, padding=padding, dilation=dilation,
                 groups=groups)
    assert gy.shape == g.y_shape, (gy.shape, g.y_shape)
    G, Cg, Kg = g.groups, g.Cg, g.Kg
    gx = np.zeros(g.x_shape)
    for tap in itertools.product(*[range(r) for r in g.kernel]):
        grids, valid = _gather_index(g, tap)
        for gi in range(G):
            wk = w[(slice(gi * Kg, (gi + 1) * Kg), slice(None)) + tap]  # (Kg, Cg)
            contrib = np.where(valid, np.einsum("kc,nk...->nc...", wk,
                                                gy[:, gi * Kg:(gi + 1) * Kg]), 0.0)
            # scatter-add each output position's contribution to the input position it read
            for n in range(g.N):
                for c in range(Cg):
                    np.add.at(gx[n, gi * Cg + c], tuple(grids), contrib[n, c])
    return gx


def conv_weight_grad(x, gy, weight_shape, *, stride=1, padding=0, dilation=1, groups=1):
    x, gy = _f64(x), _f64(gy)
    g = geometry(x.shape, weight_shape, stride=stride, padding=padding, dilation=dilation,
                 groups=groups)
    assert gy.shape == g.y_shape, (gy.shape, g.y_shape)
    G, Cg, Kg = g.groups, g.Cg, g.Kg
    gw = np.zeros(g.w_shape)
    P = int(np.prod(g.out_spatial))
    for tap in itertools.product(*[range(r) for r in g.kernel]):
        grids, valid = _gather_index(g, tap)
        patch = np.where(valid, x[(slice(None), slice(None)) + tuple(grids)], 0.0)
        for gi in range(G):
            # einsum cannot sum over '...' dims: flatten the output positions first
            gw[(slice(gi * Kg, (gi + 1) * Kg), slice(None)) + tap] = np.einsum(
                "nkp,ncp->kc", gy[:, gi * Kg:(gi + 1) * Kg].reshape(g.N, Kg, P),
                patch[:, gi * Cg:(gi + 1) * Cg].reshape(g.N, Cg, P))
    return gw


def conv_bias_grad(gy):
    gy = _f64(gy)
    return gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
