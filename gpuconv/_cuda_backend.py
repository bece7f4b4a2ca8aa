"""CUDA backend: the kernels in kernels/*.cu, written once against a device runtime.

The same code drives a real GPU (``CupyRuntime``: CuPy RawModule/NVRTC) and the
CPU emulator (``gpuconv.testing.cudasim.SimRuntime``).  It validates nothing
(the front end did), derives nothing that the geometry already holds, queues
work on the runtime's current stream and never synchronises the host.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from . import _kernels as K


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
               min_per_split: int = 4 * 256):
    """(grid_x, splits, chunk) for the split weight-gradient reduction.

    welems weight elements, each reduced over `red` positions; splits over the
    reduction (grid y, <= 65535) are added until about `target_blocks` blocks
    exist, keeping at least `min_per_split` positions per split.
    """
    grid_x = max(1, min(welems, K.MAX_BLOCKS_1D))
    want = max(1, -(-target_blocks // max(welems, 1)))
    splits = max(1, min(want, red // min_per_split, K.MAX_GRID[1]))
    chunk = max(1, -(-red // splits))
    splits = max(1, -(-red // chunk))
    return grid_x, splits, chunk


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

    def _fn(self, pass_name, g, *sizes):
        isuf = "i64" if K.needs_int64(*sizes) else "i32"
        return self.modules.function(pass_name, f"gpuconv_{pass_name}_{self._suffix(g)}_{isuf}"), isuf

    # ------------------------------------------------------------------ passes
    def forward(self, x, w, bias, g):
        rt = self.rt
        with self._device(x):
            xc, wc = rt.ascontiguous(x), rt.ascontiguous(w)
            bc = rt.ascontiguous(bias) if bias is not None else wc
            y = rt.empty(g.y_shape, g.dtype)
            total = math.prod(g.y_shape)
            fn, _ = self._fn("fwd", g, xc.size, wc.size, total)
            K.launch(rt, fn, K.grid_1d(total),
                     (xc, wc, bc, y) + _geo_args(g) + (np.int32(bias is not None),))
        return y

    def input_grad(self, gy, w, g):
        rt = self.rt
        with self._device(gy):
            gyc, wc = rt.ascontiguous(gy), rt.ascontiguous(w)
            gx = rt.empty(g.x_shape, g.dtype)
            total = math.prod(g.x_shape)
            fn, _ = self._fn("dgrad", g, gyc.size, wc.size, total)
            K.launch(rt, fn, K.grid_1d(total), (gyc, wc, gx) + _geo_args(g) + dgrad_phases(g))
        return gx

    def weight_grad(self, x, gy, g):
        rt = self.rt
        acc = np.float64 if np.dtype(g.dtype) == np.float64 else np.float32
        welems = math.prod(g.w_shape)
        red = g.N * math.prod(g.out_spatial)
        grid_x, splits, chunk = wgrad_plan(welems, red)
        with self._device(x):
            xc, gyc = rt.ascontiguous(x), rt.ascontiguous(gy)
            partial = rt.empty((splits, welems), acc)
            gw = rt.empty(g.w_shape, g.dtype)
            fn, isuf = self._fn("wgrad", g, xc.size, gyc.size, splits * welems)
            ityp = np.int64 if isuf == "i64" else np.int32
            threads = 256
            smem = (threads // 32) * np.dtype(acc).itemsize
            K.launch(rt, fn, K.LaunchConfig((grid_x, splits, 1), (threads, 1, 1)),
                     (xc, gyc, partial) + _geo_args(g) + (ityp(chunk),), shared_mem=smem)
            red_fn = self.modules.function("wgrad", f"gpuconv_wgrad_reduce_{self._suffix(g)}")
            K.launch(rt, red_fn, K.grid_1d(welems), (partial, gw, np.int64(welems),
                                                     np.int32(splits)))
        return gw
