"""CPU backend (NumPy): chunked im2col + BLAS GEMM, banded GEMMs for depthwise.

* :mod:`.workspace` -- the memory bound: per-thread arenas under the workspace limit;
* :mod:`.parallel` -- the one scheduler (static chunk assignment, fixed-order sums)
  and BLAS thread control;
* :mod:`.dense` -- dense and grouped passes (and the slab/chunk helpers);
* :mod:`.depthwise` -- depthwise passes;
* this module -- the facade the dispatcher instantiates: it picks the passes.

float16 / bfloat16 are computed in float32 and rounded once at the end;
float32 in float32; float64 in float64 (the geometry's accumulate dtype).
Inputs are never written to; every result is a fresh array.  The peak extra
memory of a call is at most the workspace plus the output (and one cast copy of
the weight): where one output row of the first spatial dimension with the whole
reduction does not fit, the dense passes split the reduction into blocks of input
channels x first- and second-dim kernel taps (summed in a fixed order).  The
stride-1 input gradient runs as the forward convolution of grad_out with the
flipped weight (the forward's speed for large kernels).
"""
from __future__ import annotations

import numpy as np

from . import dense, depthwise
from .dense import Pass
from .parallel import get_num_threads
from .workspace import clear_workspace_cache, get_workspace_limit, set_workspace_limit

__all__ = ["NumpyBackend", "get_workspace_limit", "set_workspace_limit", "clear_workspace_cache",
           "get_num_threads"]


def _pass(g) -> Pass:
    cdt = g.accumulate_dtype
    return Pass(g=g, cdt=cdt, itemsize=cdt.itemsize, workers=get_num_threads())


class NumpyBackend:
    name = "numpy"
    xp = np

    def forward(self, x, w, bias, g):
        p = _pass(g)
        y = np.empty(g.y_shape, dtype=g.dtype)
        b = None if bias is None else np.ascontiguousarray(bias, dtype=p.cdt)
        if g.depthwise:
            if not depthwise.forward_native(p, x, w, b, y):
                depthwise.forward_band(p, x, w, b, y)
        else:
            dense.forward(p, x, w, b, y)
        return y

    def input_grad(self, gy, w, g):
        p = _pass(g)
        gx = np.empty(g.x_shape, dtype=g.dtype)
        if g.depthwise:
            if depthwise.input_grad_native(p, gy, w, gx):
                pass
            elif all(st == 1 for st in g.stride):
                depthwise.input_grad_band(p, gy, w, gx)
            else:
                depthwise.input_grad(p, gy, w, gx)
        else:
            dense.input_grad(p, gy, w, gx)
        return gx

    def weight_grad(self, x, gy, g):
        p = _pass(g)
        if g.depthwise:
            gw = depthwise.weight_grad_native(p, x, gy)
            if gw is not None:
                pass
            elif depthwise._flat_ok(g):
                gw = depthwise.weight_grad_flat(p, x, gy)
            else:
                gw = depthwise.weight_grad(p, x, gy)
        else:
            gw = dense.weight_grad(p, x, gy)
        return gw.reshape(g.w_shape).astype(g.dtype, copy=False)
