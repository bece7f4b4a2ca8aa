"""CUDA backend: the kernels in kernels/*.cu, written once against a device runtime.

The same code drives a real GPU (``CupyRuntime``: CuPy RawModule/NVRTC) and the
CPU emulator (``gpuconv._runtimes.cudasim.SimRuntime``).  It validates nothing
(the front end did), derives nothing that the geometry already holds, queues
work on the runtime's current stream and never synchronises the host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np

from . import sources as K


def _geo_args(g):
    """The GC_GEO_PARAMS scalars of common.cuh: 3 spatial dims, leading dims padded with 1."""
    pad = 3 - g.nd

    def three(t, fill):
        return (fill,) * pad + tuple(t)

    D, H, W = three(g.in_spatial, 1)
    KD, KH, KW = three(g.kernel, 1)
    OD, OH, OW = three(g.out_spatial, 1)
    s = three(g.stride, 1)
    d = three(g.dilation, 1)
    p = three(g.pad_lo, 0)
    vals = (g.N, g.C, g.K, g.groups, D, H, W, KD, KH, KW, OD, OH, OW) + s + d + p
    return tuple(np.int32(v) for v in vals)


def dgrad_phases(g):
    """Per spatial dim (padded to 3): (step, inv, gcd) so that the taps r with
    r*dilation = i + pad (mod stride) are r = r0 + j*step, r0 = ((q mod s)/gcd*inv) mod step."""
    out = []
    for s, d in zip((1,) * (3 - g.nd) + g.stride, (1,) * (3 - g.nd) + g.dilation):
        gcd = math.gcd(s, d)
        step = s // gcd
        inv = pow(d // gcd, -1, step) if step > 1 else 0
        out += [step, inv, gcd]
    return tuple(np.int32(v) for v in out)


def wgrad_plan(welems: int, red: int, threads: int = 256, target_blocks: int = 2048,
               min_per_split: int = 4 * 256, max_blocks: int = K.MAX_BLOCKS_1D):
    """(grid_x, splits, chunk) for the direct split weight-gradient reduction.

    welems weight elements (one block each, grid-stride), each reduced over
    `red` positions; splits over the reduction (grid y) are added until about
    `target_blocks` blocks exist, keeping at least `min_per_split` positions each.
    """
    grid_x = max(1, min(welems, max_blocks))
    splits, chunk = split_reduction(grid_x, red, target_blocks, min_per_split, 1)
    return grid_x, splits, chunk


def split_reduction(blocks: int, red: int, target_blocks: int, min_per_split: int, align: int):
    """(splits, chunk): cut a reduction of length `red` into `splits` slices of `chunk`
    (a multiple of `align`) so that blocks*splits approaches target_blocks; never an
    empty slice, never more than the grid-dimension limit 65535."""
    want = max(1, -(-target_blocks // max(blocks, 1)))
    splits = max(1, min(want, red // max(min_per_split, 1), K.MAX_GRID[1]))
    chunk = -(-red // splits)
    chunk = max(align, -(-chunk // align) * align)
    splits = max(1, -(-red // chunk))
    return splits, chunk


TILE = 64  # the tiled kernels' M and N tile (GC_TILE_M/GC_TILE_N in common.cuh)
TILE_K = 16  # GC_TILE_K
MAX_TAPS = 512  # GC_MAX_TAPS: the tiled forward keeps a per-tap offset table in shared memory


def _algo():
    """GPUCONV_CUDA_ALGO: 'auto' (default), 'direct' or 'tiled' (tests force each)."""
    a = os.environ.get("GPUCONV_CUDA_ALGO", "auto").strip().lower() or "auto"
    if a not in ("auto", "direct", "tiled"):
        raise ValueError(f"GPUCONV_CUDA_ALGO={a!r}: expected auto, direct or tiled")
    return a


def use_tiled(g) -> bool:
    """Implicit-GEMM tiles pay off for dense/grouped layers; depthwise-like layers
    (few channels per group) use the direct kernels.  Grid y = groups * M tiles
    must fit 65535."""
    fits = (g.groups * -(-g.Kg // TILE) <= K.MAX_GRID[1] and g.taps <= MAX_TAPS
            and math.prod(g.in_spatial) <= K.INT32_LIMIT)  # tap offsets are 32-bit
    algo = _algo()
    if algo == "direct" or not fits:
        return False
    if algo == "tiled":
        return True
    return g.Kg >= 8 and g.Cg * g.taps >= 8


def dgrad_as_forward(g):
    """Geometry of the stride-1 input gradient written as a forward convolution of
    grad_out with the flipped, channel-swapped weight, or None when that needs a
    negative padding (padding wider than the kernel's reach) or stride > 1."""
    if any(s != 1 for s in g.stride):
        return None
    reach = tuple(d * (k - 1) for d, k in zip(g.dilation, g.kernel))
    lo = tuple(r - p for r, p in zip(reach, g.pad_lo))
    hi = tuple(r - p for r, p in zip(reach, g.pad_hi))
    if min(lo + hi) < 0:
        return None
    return dataclasses.replace(g, C=g.K, K=g.C, in_spatial=g.out_spatial,
                               out_spatial=g.in_spatial, pad_lo=lo, pad_hi=hi)


def flip_weight(xp, w, g):
    """w (K, C/G, *k) -> w' (C, K/G, *k) with w'[c, k', t] = w[k, c', T-1-t] per group."""
    G, Kg, Cg = g.groups, g.Kg, g.Cg
    wv = w.reshape((G, Kg, Cg) + g.kernel).swapaxes(1, 2)
    wv = wv[(Ellipsis,) + (slice(None, None, -1),) * g.nd]
    return wv.reshape((g.C, Kg) + g.kernel)


class CudaBackend:
    def __init__(self, runtime):
        self.rt = runtime
        self.xp = runtime.xp
        self.name = runtime.name
        self.modules = K.ModuleCache(runtime)

    def precompile(self):
        self.modules.precompile()

    # ------------------------------------------------------------------ helpers
    def _device(self, a):
        scope = getattr(self.rt, "device_scope", None)
        return scope(a) if scope is not None else contextlib.nullcontext()

    @staticmethod
    def _suffix(g):
        return K.DTYPES[np.dtype(g.dtype).name][0]

    def _fn(self, pass_name, g, *sizes, kind=None):
        # GPUCONV_CUDA_INDEX=64 forces the 64-bit variants (tests run them on small data)
        force64 = os.environ.get("GPUCONV_CUDA_INDEX", "") == "64"
        isuf = "i64" if force64 or K.needs_int64(*sizes) else "i32"
        name = f"gpuconv_{kind or pass_name}_{self._suffix(g)}_{isuf}"
        return self.modules.function(pass_name, name), isuf

    # ------------------------------------------------------------------ passes
    def forward(self, x, w, bias, g):
        with self._device(x):
            return self._forward(x, w, bias, g)

    def _forward(self, x, w, bias, g):
        rt = self.rt
        xc, wc = rt.ascontiguous(x), rt.ascontiguous(w)
        bc = rt.ascontiguous(bias) if bias is not None else wc
        y = rt.empty(g.y_shape, g.dtype)
        total = math.prod(g.y_shape)
        args = (xc, wc, bc, y) + _geo_args(g) + (np.int32(bias is not None),)
        if use_tiled(g):
            fn, _ = self._fn("fwd", g, xc.size, wc.size, total, kind="fwdtile")
            npq = g.N * math.prod(g.out_spatial)
            cfg = K.LaunchConfig((-(-npq // TILE), g.groups * -(-g.Kg // TILE), 1), (256, 1, 1))
            smem = self._tile_smem(g) + 16 * g.taps  # tiles + tap table
            K.launch(rt, fn, cfg, args, shared_mem=smem)
        else:
            fn, _ = self._fn("fwd", g, xc.size, wc.size, total)
            K.launch(rt, fn, K.grid_1d(total, max_blocks=self._max_blocks()), args)
        return y

    def _max_blocks(self):
        """Cap of the grid-stride kernels' 1-D grids.  A runtime may lower it
        (``max_blocks_1d``): the emulator tests set it tiny so that every grid-stride
        loop really runs more than one pass."""
        return getattr(self.rt, "max_blocks_1d", K.MAX_BLOCKS_1D)

    @classmethod
    def _tile_smem(cls, g):
        """Bytes of the A tile (rows padded to TILE + 1) and B tile of the tiled kernels."""
        return (TILE_K * (TILE + 1) + TILE_K * TILE) * cls._acc_size(g)

    @staticmethod
    def _acc_size(g):
        return 8 if np.dtype(g.dtype) == np.float64 else 4

    def input_grad(self, gy, w, g):
        rt = self.rt
        with self._device(gy):
            g2 = dgrad_as_forward(g)
            if g2 is not None and use_tiled(g2):
                return self._forward(gy, flip_weight(self.xp, w, g), None, g2)
            gyc, wc = rt.ascontiguous(gy), rt.ascontiguous(w)
            gx = rt.empty(g.x_shape, g.dtype)
            total = math.prod(g.x_shape)
            fn, _ = self._fn("dgrad", g, gyc.size, wc.size, total)
            K.launch(rt, fn, K.grid_1d(total, max_blocks=self._max_blocks()),
                     (gyc, wc, gx) + _geo_args(g) + dgrad_phases(g))
        return gx

    def weight_grad(self, x, gy, g):
        rt = self.rt
        acc = np.float64 if np.dtype(g.dtype) == np.float64 else np.float32
        welems = math.prod(g.w_shape)
        red = g.N * math.prod(g.out_spatial)
        tiled = use_tiled(g)
        if tiled:
            ntiles = -(-(g.Cg * g.taps) // TILE)
            mtiles = g.groups * -(-g.Kg // TILE)
            splits, chunk = split_reduction(ntiles * mtiles, red, 1024, 256, TILE_K)
            cfg = K.LaunchConfig((ntiles, mtiles, splits), (256, 1, 1))
            smem = self._tile_smem(g)
        else:
            grid_x, splits, chunk = wgrad_plan(welems, red, max_blocks=self._max_blocks())
            cfg = K.LaunchConfig((grid_x, splits, 1), (256, 1, 1))
            smem = (256 // 32) * self._acc_size(g)
        with self._device(x):
            xc, gyc = rt.ascontiguous(x), rt.ascontiguous(gy)
            partial = rt.empty((splits, welems), acc)
            gw = rt.empty(g.w_shape, g.dtype)
            fn, isuf = self._fn("wgrad", g, xc.size, gyc.size, splits * welems,
                                kind="wgradtile" if tiled else None)
            ityp = np.int64 if isuf == "i64" else np.int32
            K.launch(rt, fn, cfg, (xc, gyc, partial) + _geo_args(g) + (ityp(chunk),),
                     shared_mem=smem)
            red_fn = self.modules.function("wgrad", f"gpuconv_wgrad_reduce_{self._suffix(g)}")
            K.launch(rt, red_fn, K.grid_1d(welems, max_blocks=self._max_blocks()),
                     (partial, gw, np.int64(welems),
                                                     np.int32(splits)))
        return gw
