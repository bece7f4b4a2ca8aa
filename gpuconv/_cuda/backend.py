"""CUDA backend: the kernels in kernels/*.cu, written once against a device runtime.

The same code drives a real GPU (:class:`gpuconv._runtimes.cupy.CupyRuntime`) and
the CPU emulator (:class:`gpuconv._runtimes.cudasim.SimRuntime`), both
:class:`gpuconv._runtimes.DeviceRuntime`.  It validates nothing (the front end
did), derives nothing that the geometry already holds, queues work on the
runtime's current stream and never synchronises the host.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import _geometry as geo
from . import depthwise as dw
from . import igemm as IG
from . import launch
from .plans import (THREADS, TILE_K, TILE_N, _algo, dgrad_phases, geo_args, m_tiles,
                    split_reduction, tile_smem, use_igemm, use_tiled, wgrad_plan)
from .sources import ModuleCache


class CudaBackend:
    def __init__(self, runtime):
        self.rt = runtime
        self.xp = runtime.xp
        self.name = runtime.name
        self.modules = ModuleCache(runtime)

    def precompile(self):
        self.modules.precompile()

    # ------------------------------------------------------------------ helpers
    def _fn(self, pass_name, g, *sizes, kind=None):
        # GPUCONV_CUDA_INDEX=64 forces the 64-bit variants (tests run them on small data)
        force64 = os.environ.get("GPUCONV_CUDA_INDEX", "") == "64"
        isuf = "i64" if force64 or launch.needs_int64(*sizes) else "i32"
        name = f"gpuconv_{kind or pass_name}_{g.dtype_info.suffix}_{isuf}"
        return self.modules.function(pass_name, name), isuf

    def _grid_1d(self, work_items):
        return launch.grid_1d(work_items, THREADS, max_blocks=self.rt.max_blocks_1d)

    # ------------------------------------------------------------------ passes
    def forward(self, x, w, bias, g):
        with self.rt.device_scope(x):
            return self._forward(x, w, bias, g)

    def _forward(self, x, w, bias, g):
        p = dw.plans(g, _algo())
        if p is not None:
            return dw.forward(self, x, w, bias, g, p[0])
        rt = self.rt
        xc, wc = rt.ascontiguous(x), rt.ascontiguous(w)
        bc = rt.ascontiguous(bias) if bias is not None else wc
        y = rt.empty(g.y_shape, g.dtype)
        if use_igemm(g):
            self._igemm_fp(xc, wc, bc if bias is not None else None, y,
                           [IG.forward_problem(g)], g, tensor_op=IG.tensor_op(g, _algo()))
            return y
        total = math.prod(g.y_shape)
        args = (xc, wc, bc, y) + geo_args(g) + (np.int32(bias is not None),)
        if use_tiled(g):
            fn, _ = self._fn("fwd", g, xc.size, wc.size, total, kind="fwdtile")
            npq = g.N * math.prod(g.out_spatial)
            cfg = launch.LaunchConfig((-(-npq // TILE_N), m_tiles(g), 1), (THREADS, 1, 1))
            smem = tile_smem(g) + 16 * g.taps  # tiles + tap table
            launch.launch(rt, fn, cfg, args, shared_mem=smem)
        else:
            fn, _ = self._fn("fwd", g, xc.size, wc.size, total)
            launch.launch(rt, fn, self._grid_1d(total), args)
        return y

    def input_grad(self, gy, w, g):
        rt = self.rt
        with rt.device_scope(gy):
            p = dw.plans(g, _algo())
            if p is not None:
                return dw.input_grad(self, gy, w, g, p[1])
            if use_igemm(g):
                gyc, wc = rt.ascontiguous(gy), rt.ascontiguous(w)
                gx = rt.empty(g.x_shape, g.dtype)
                self._igemm_fp(gyc, wc, None, gx, IG.dgrad_problems(g), g,
                               tensor_op=IG.tensor_op(g, _algo()))
                return gx
            g2 = geo.dgrad_as_forward(g)
            if g2 is not None and use_tiled(g2):
                return self._forward(gy, geo.flip_weight(w, g), None, g2)
            gyc, wc = rt.ascontiguous(gy), rt.ascontiguous(w)
            gx = rt.empty(g.x_shape, g.dtype)
            total = math.prod(g.x_shape)
            fn, _ = self._fn("dgrad", g, gyc.size, wc.size, total)
            launch.launch(rt, fn, self._grid_1d(total),
                      (gyc, wc, gx) + geo_args(g) + dgrad_phases(g))
        return gx

    def weight_grad(self, x, gy, g):
        rt = self.rt
        p = dw.plans(g, _algo())
        if p is not None:
            with rt.device_scope(x):
                return dw.weight_grad(self, x, gy, g, p[2])
        welems = math.prod(g.w_shape)
        red = g.N * math.prod(g.out_spatial)
        if use_igemm(g):
            with rt.device_scope(x):
                return self._igemm_wg(rt.ascontiguous(x), rt.ascontiguous(gy), g)
        tiled = use_tiled(g)
        if tiled:
            ntiles = -(-(g.Cg * g.taps) // TILE_N)
            mtiles = m_tiles(g)
            splits, chunk = split_reduction(ntiles * mtiles, red, 1024, 256, TILE_K)
            cfg = launch.LaunchConfig((ntiles, mtiles, splits), (THREADS, 1, 1))
            smem = tile_smem(g)
        else:
            grid_x, splits, chunk = wgrad_plan(welems, red, max_blocks=self.rt.max_blocks_1d)
            cfg = launch.LaunchConfig((grid_x, splits, 1), (THREADS, 1, 1))
            smem = (THREADS // 32) * g.accumulate_dtype.itemsize
        with rt.device_scope(x):
            xc, gyc = rt.ascontiguous(x), rt.ascontiguous(gy)
            partial = rt.empty((splits, welems), g.accumulate_dtype)
            gw = rt.empty(g.w_shape, g.dtype)
            fn, isuf = self._fn("wgrad", g, xc.size, gyc.size, splits * welems,
                                kind="wgradtile" if tiled else None)
            ityp = np.int64 if isuf == "i64" else np.int32
            launch.launch(rt, fn, cfg, (xc, gyc, partial) + geo_args(g) + (ityp(chunk),),
                      shared_mem=smem)
            red_fn = self.modules.function(
                "wgrad", f"gpuconv_wgrad_reduce_{g.dtype_info.suffix}")
            launch.launch(rt, red_fn, self._grid_1d(welems),
                      (partial, gw, np.int64(welems), np.int32(splits)))
        return gw

    # ------------------------------------------------------------------ implicit-GEMM engine
    def _igemm_fn(self, kind, g, cfg, *sizes):
        force64 = os.environ.get("GPUCONV_CUDA_INDEX", "") == "64"
        isuf = "i64" if force64 or launch.needs_int64(*sizes) else "i32"
        name = f"gpuconv_igemm_{kind}_{g.dtype_info.suffix}_{cfg}_{isuf}"
        return self.modules.function("igemm", name), isuf

    def _igemm_reduce(self, g, partial, bias, out, splits, inner, channels):
        """out = round(sum over the split slices, in order (+ bias)): the fixed-order
        second pass of every split-K GEMM."""
        total = out.size
        fn = self.modules.function("igemm", f"gpuconv_igemm_reduce_{g.dtype_info.suffix}")
        launch.launch(self.rt, fn, self._grid_1d(total),
                      (partial, bias if bias is not None else out, out, np.int64(total),
                       np.int32(splits), np.int64(inner), np.int32(channels),
                       np.int32(bias is not None)))

    def _igemm_fp(self, src, w, bias, out, problems, g, tensor_op=False):
        """Forward-like GEMMs (the forward, or the stride phases of the input grad) into
        `out`; under split-K every phase writes all `splits` partial slices and one
        fixed-order reduce adds them (and the bias) and rounds once.  tensor_op: a half
        type (or float32 as TF32) on the tensor-op policy (gpuconv_igemm_fptc_*), each
        problem's weight reordered first (gpuconv_igemm_wreorder_*; float32 rounded to
        TF32 there)."""
        rt = self.rt
        cfg, splits = IG.fp_plan(problems, g.groups)
        c = (IG.tc_configs(g.dtype.itemsize) if tensor_op else IG.CONFIGS)[cfg]
        acc = g.accumulate_dtype
        # no split: the kernel never touches `partial` (a 1-element placeholder of its type)
        partial = rt.empty((splits,) + tuple(out.shape) if splits > 1 else (1,), acc)
        fn, _ = self._igemm_fn("fptc" if tensor_op else "fp", g, cfg, src.size, w.size,
                               out.size * splits)
        bias_arg = bias if bias is not None else w
        rfn = (self.modules.function("igemm", f"gpuconv_igemm_wreorder_{g.dtype_info.suffix}")
               if tensor_op else None)
        for p in problems:
            grid = IG.fp_grid(p, cfg, g.groups, splits)
            chunk = IG.kchunk(p.kred, splits, c["BK"])
            params = tuple(np.int32(v) for v in p.params) + (np.int32(chunk),)
            wp = w
            if tensor_op:
                # the weight of this problem with rows contiguous along its reduction:
                # forward [K][taps][C/G]; input-grad phase [G][C/G][phase taps][K/G]
                n = g.groups * p.Ng * p.kred
                wp = rt.empty((max(n, 1),), w.dtype)
                if n:
                    launch.launch(rt, rfn, self._grid_1d(n), (w, wp) + params + (np.int64(n),))
            smem = (IG.tc_smem_bytes(cfg, IG.fp_taps(p), g.dtype.itemsize) if tensor_op
                    else IG.smem_bytes(cfg, acc.itemsize, IG.fp_taps(p)))
            args = ((src, wp, bias_arg, out, partial) + params
                    + (np.int32(bias is not None and splits == 1), np.int32(splits > 1)))
            launch.launch(rt, fn, launch.LaunchConfig(grid, (c["NT"], 1, 1)), args,
                          shared_mem=smem)
        if splits > 1:
            self._igemm_reduce(g, partial, bias, out, splits, math.prod(out.shape[2:]),
                               out.shape[1])

    def _igemm_wg(self, xc, gyc, g):
        """Weight grad: split-K GEMM over N*P*Q into partial slices (tensor-op policy for
        the half types: gpuconv_igemm_wgtc_*), fixed-order reduce."""
        rt = self.rt
        acc = g.accumulate_dtype
        welems = math.prod(g.w_shape)
        # half types (float32 as TF32 under "high"): the transposed GEMM on tensor ops
        tc = IG.tensor_op(g, _algo(), "wg")
        cfg, grid, splits, chunk = IG.wg_plan(g, tc)
        c = (IG.tc_configs(g.dtype.itemsize) if tc else IG.CONFIGS)[cfg]
        partial = rt.empty((splits, welems), acc)
        gw = rt.empty(g.w_shape, g.dtype)
        fn, isuf = self._igemm_fn("wgtc" if tc else "wg", g, cfg, xc.size, gyc.size,
                                  splits * welems)
        ityp = np.int64 if isuf == "i64" else np.int32
        launch.launch(rt, fn, launch.LaunchConfig(grid, (c["NT"], 1, 1)),
                      (xc, gyc, partial) + geo_args(g) + (ityp(chunk),),
                      shared_mem=(IG.tc_wg_smem_bytes(cfg, g.dtype.itemsize) if tc
                                  else IG.smem_bytes(cfg, acc.itemsize)))
        self._igemm_reduce(g, partial, None, gw, splits, 1, 1)
        return gw
