"""Depthwise family of the CUDA backend (kernels/depthwise.cu): when it runs, its tile
plans, shared-memory sizes and launches.

Depthwise-like layers (groups > 1, at most :data:`MAX_CG` input and :data:`MAX_KG`
output channels per group: depthwise, channel multipliers K = m*C, small groups) run
here.  The input gradient at stride 1 is the depthwise forward of grad_out with the
flipped weight (:func:`gpuconv._geometry.dgrad_as_forward` / :func:`~gpuconv._geometry.flip_weight`),
otherwise the stride-phase kernel; the weight gradient is a two-level fixed-order
reduction.  Every plan is a pure function of the frozen geometry (and the forcing
environment), cached, so a repeated call does no planning.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import _geometry as geo
from .._runtimes.limits import MAX_GRID, SHARED_MEM_PER_BLOCK
from . import launch
from .plans import dgrad_phases, geo_args, split_reduction
from .sources import DW_MAXKW, DW_RH, DW_RW

MAX_CG = 4      # input channels per group the depthwise kernels take in auto mode
MAX_KG = 8      # output channels per group (channel multiplier) in auto mode
THREADS = launch.DEFAULT_THREADS
_HAS_BIAS = {False: (np.int32(0),), True: (np.int32(1),)}


@dataclass(frozen=True)
class DwTile:
    TX: int
    TY: int
    P: int
    RH: int
    SROWS: int
    SCOLS: int
    tiles_w: int
    tiles_h: int
    smem: int

    @property
    def TW(self):
        return self.TX * DW_RW

    @property
    def TH(self):
        return self.TY * self.RH

    @functools.cached_property
    def args(self):
        """The GC_DW_TILE_PARAMS scalars (built once per plan)."""
        return tuple(np.int32(v) for v in (self.TX, self.TY, self.P, self.RH, self.SROWS,
                                           self.SCOLS, self.tiles_w))


def _pow2_at_least(v):
    return 1 << max(0, (int(v) - 1).bit_length())


def _round_up(v, m):
    return -(-v // m) * m


def _three(t, fill):
    return (fill,) * (3 - len(t)) + tuple(t)


def tile_plan(g, kind):
    """The DwTile of pass `kind` ('fwd', 'dgrad', 'wgrad') or None when it does not fit
    (shared memory, grid, taps)."""
    KD, KH, KW = _three(g.kernel, 1)
    sd, sh, sw = _three(g.stride, 1)
    dd, dh, dw = _three(g.dilation, 1)
    if kind == "dgrad":
        D, H, W = _three(g.in_spatial, 1)      # destination: the input plane
    else:
        D, H, W = _three(g.out_spatial, 1)     # destination: the output plane
    taps = KD * KH * KW
    V = 16 // g.dtype.itemsize
    acc = g.accumulate_dtype.itemsize
    if kind == "wgrad" and (KD * KH > THREADS or KW > DW_MAXKW):
        return None  # a thread per kernel row and lane, KW accumulators each
    tx = min(32, _pow2_at_least(-(-W // DW_RW)))
    if kind == "dgrad":
        tx = _round_up(tx, sw)   # columns tx + TX*j share one stride phase
        if tx > THREADS:
            return None
    # rows per thread: the forward at unit row stride and dilation reuses each loaded
    # shared value for DW_RH rows
    rh = DW_RH if (kind == "fwd" and sh == 1 and dh == 1 and H >= DW_RH) else 1
    ty = max(1, min(-(-H // rh), THREADS // tx))
    planes = g.N * (g.C if kind == "dgrad" else g.K)
    p = 1 if kind == "wgrad" else max(1, min(planes, THREADS // (tx * ty)))

    def size(ty, p):
        TW, TH = tx * DW_RW, ty * rh
        if kind == "dgrad":
            rows = (TH - 1 + (KH - 1) * dh) // sh + 2
            cols = _round_up((TW - 1 + (KW - 1) * dw) // sw + 2 + V - 1, V)
        else:
            rows = (TH - 1) * sh + (KH - 1) * dh + 1
            cols = _round_up((TW - 1) * sw + (KW - 1) * dw + 1 + V - 1, V)
        if kind == "wgrad":
            smem = (KD * rows * cols + TH * TW + THREADS) * acc
        else:
            smem = p * (KD * rows * cols + taps) * acc
        return rows, cols, smem

    rows, cols, smem = size(ty, p)
    while smem > SHARED_MEM_PER_BLOCK and p > 1:
        p = max(1, p // 2)
        rows, cols, smem = size(ty, p)
    while smem > SHARED_MEM_PER_BLOCK and ty > 1:
        ty = max(1, ty // 2)
        rows, cols, smem = size(ty, p)
    if smem > SHARED_MEM_PER_BLOCK:
        return None
    tiles_w = -(-W // (tx * DW_RW))
    tiles_h = -(-H // (ty * rh))
    if tiles_w * tiles_h > MAX_GRID[1] or D > MAX_GRID[2]:
        return None
    return DwTile(tx, ty, p, rh, rows, cols, tiles_w, tiles_h, smem)


@functools.lru_cache(maxsize=1024)
def _plans(g, algo):
    """(forward tile, input-grad mode and tile, weight-grad tile) or None when the
    depthwise family does not take `g`."""
    if algo in ("direct", "tiled", "igemm"):
        return None
    if algo != "depthwise" and not (g.groups > 1 and g.Cg <= MAX_CG and g.Kg <= MAX_KG):
        return None
    fwd = tile_plan(g, "fwd")
    g2 = geo.dgrad_as_forward(g)
    if g2 is not None:
        dgrad = ("flip", g2, tile_plan(g2, "fwd"))
    else:
        dgrad = ("phase", g, tile_plan(g, "dgrad"))
    wgrad = tile_plan(g, "wgrad")
    if fwd is None or dgrad[2] is None or wgrad is None:
        return None
    return fwd, dgrad, wgrad


def plans(g, algo):
    return _plans(g, algo)


def forward(be, x, w, bias, g, tile):
    rt = be.rt
    xc, wc = rt.ascontiguous(x), rt.ascontiguous(w)
    bc = rt.ascontiguous(bias) if bias is not None else wc
    y = rt.empty(g.y_shape, g.dtype)
    fn, _ = be._fn("dw", g, xc.size, wc.size, math.prod(g.y_shape), kind="dw_fwd")
    OD = _three(g.out_spatial, 1)[0]
    grid_x = max(1, min(-(-(g.N * g.K) // tile.P), rt.max_blocks_1d))
    cfg = launch.LaunchConfig((grid_x, tile.tiles_w * tile.tiles_h, OD), (tile.TX, tile.TY, tile.P))
    args = (xc, wc, bc, y) + _geo(g) + _HAS_BIAS[bias is not None] + tile.args
    launch.launch(rt, fn, cfg, args, shared_mem=tile.smem)
    return y


def input_grad(be, gy, w, g, mode):
    kind, g2, tile = mode
    if kind == "flip":
        return forward(be, gy, geo.flip_weight(w, g), None, g2, tile)
    rt = be.rt
    gyc, wc = rt.ascontiguous(gy), rt.ascontiguous(w)
    gx = rt.empty(g.x_shape, g.dtype)
    fn, _ = be._fn("dw", g, gyc.size, wc.size, math.prod(g.x_shape), kind="dw_dgrad")
    D = _three(g.in_spatial, 1)[0]
    grid_x = max(1, min(-(-(g.N * g.C) // tile.P), rt.max_blocks_1d))
    cfg = launch.LaunchConfig((grid_x, tile.tiles_w * tile.tiles_h, D), (tile.TX, tile.TY, tile.P))
    args = (gyc, wc, gx) + _geo(g) + _phases(g) + tile.args
    launch.launch(rt, fn, cfg, args, shared_mem=tile.smem)
    return gx


def weight_grad(be, x, gy, g, tile):
    rt = be.rt
    xc, gyc = rt.ascontiguous(x), rt.ascontiguous(gy)
    welems = math.prod(g.w_shape)
    grid_x, splits, chunk = _wgrad_split(g, tile, rt.max_blocks_1d)
    partial = rt.empty((splits, welems), g.accumulate_dtype)
    gw = rt.empty(g.w_shape, g.dtype)
    fn, _ = be._fn("dw", g, xc.size, gyc.size, splits * welems, kind="dw_wgrad")
    cfg = launch.LaunchConfig((grid_x, splits, 1), (THREADS, 1, 1))
    launch.launch(rt, fn, cfg, (xc, gyc, partial) + _geo(g) + tile.args + (np.int32(chunk),),
                  shared_mem=tile.smem)
    red = be.modules.function("dw", f"gpuconv_dw_wgrad_reduce_{g.dtype_info.suffix}")
    launch.launch(rt, red, be._grid_1d(welems), (partial, gw, np.int64(welems), np.int32(splits)))
    return gw


@functools.lru_cache(maxsize=1024)
def _wgrad_split(g, tile, max_blocks):
    """(grid_x, splits, chunk): weight planes K*C/G over grid x (grid-stride), the
    N*OD*tiles reduction cut into `splits` runs of `chunk` tiles (grid y)."""
    OD = _three(g.out_spatial, 1)[0]
    ntiles = g.N * OD * tile.tiles_w * tile.tiles_h
    grid_x = max(1, min(g.K * g.Cg, max_blocks))
    splits, chunk = split_reduction(grid_x, ntiles, 1024, 2, 1)
    return grid_x, splits, chunk


@functools.lru_cache(maxsize=1024)
def _geo(g):
    return geo_args(g)


@functools.lru_cache(maxsize=1024)
def _phases(g):
    return dgrad_phases(g)
