"""The selftest engine: a randomized sweep of every pass against the float64 reference.

``python -m gpuconv selftest`` runs :func:`run` and prints what it returns
(the CLI only formats).  Sizes come from :mod:`gpuconv._geometry`; expected
values from :mod:`gpuconv.reference` (which checks every shape it is given).
"""
from __future__ import annotations

import time

import numpy as np

from .._geometry import available_dtypes, effective_kernel, transposed_output_size
from . import rel_error, tolerance

PASSES = ("forward", "input_grad", "weight_grad", "bias_grad", "transpose")


class CaseError(Exception):
    """A case whose result has the wrong shape."""


def _rel_err(a, ref):
    """max|a - ref| / max|ref| (testing.rel_error), after checking the shape."""
    if tuple(a.shape) != tuple(ref.shape):
        raise CaseError(f"shape {tuple(a.shape)}, expected {ref.shape}")
    return rel_error(a, ref)


def geometry_case(rng, nd, small, transpose=False):
    """Random (x_shape, w_shape, kwargs, pads, out) for a forward convolution (or a
    transposed one: then ``pads`` are its (lo, hi) pairs and ``out`` its output size)."""
    groups = int(rng.choice([1, 1, 2]))
    cmax = 2 if small else 3
    C = groups * int(rng.integers(1, cmax + 1))
    K = groups * int(rng.integers(1, cmax + 1))
    N = 1 if small else int(rng.integers(1, 3))
    kmax = 3
    kernel = tuple(int(rng.integers(1, kmax + 1)) for _ in range(nd))
    stride = tuple(int(rng.integers(1, 3)) for _ in range(nd))
    dilation = tuple(int(rng.integers(1, 3)) for _ in range(nd))
    span = [effective_kernel(k, d) for d, k in zip(dilation, kernel)]
    lmax = {1: 12, 2: 7, 3: 5}[nd] if small else {1: 24, 2: 11, 3: 6}[nd]
    if transpose:
        L = tuple(int(rng.integers(1, max(2, lmax // 2) + 1)) for _ in range(nd))
        opad = tuple(int(rng.integers(0, s)) for s in stride)
        if rng.integers(0, 2):   # per-dim ints
            padding = tuple(int(rng.integers(0, 2)) for _ in range(nd))
            pads = tuple((p, p) for p in padding)
        else:                    # per-dim (lo, hi) pairs
            pads = tuple((int(rng.integers(0, 2)), int(rng.integers(0, 2))) for _ in range(nd))
            padding = pads

        def out_size(pads):
            return tuple(transposed_output_size(l, k, s, d, a, b, o) for l, k, s, d, (a, b), o
                         in zip(L, kernel, stride, dilation, pads, opad))
        if min(out_size(pads)) < 1:         # no padding always gives a positive size
            padding, pads = (0,) * nd, ((0, 0),) * nd
        return (N, C) + L, (C, K // groups) + kernel, dict(
            stride=stride, padding=padding, dilation=dilation, groups=groups,
            output_padding=opad), pads, out_size(pads)
    L = tuple(int(rng.integers(sp, max(sp, lmax) + 1)) for sp in span)
    form = int(rng.integers(0, 4))
    if form == 0:
        padding = int(rng.integers(0, 3))
    elif form == 1:
        padding = "same"
    elif form == 2:
        padding = "valid"
    else:
        padding = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd))
    return (N, C) + L, (K, C // groups) + kernel, dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups), None, None


def _rand(rng, shape, dt):
    """Random data of dtype dt and its exact float64 value (never all zero)."""
    a = rng.standard_normal(shape).astype(dt)
    return a, a.astype(np.float64)


def _movers(backend):
    if backend == "cupy":
        import cupy
        return (lambda a: cupy.asarray(a)), (lambda a: cupy.asnumpy(a))
    return (lambda a: a), (lambda a: a)


def run_case(pass_name, nd, dt, rng, backend, small):
    """One random case: relative error of `backend` against the reference."""
    import gpuconv
    from gpuconv import reference as ref
    to_dev, to_host = _movers(backend)
    transpose = pass_name == "transpose"
    xs, ws, kw, pads, out = geometry_case(rng, nd, small, transpose)
    if transpose:
        x, x64 = _rand(rng, xs, dt)
        w, w64 = _rand(rng, ws, dt)
        b, b64 = _rand(rng, (ws[1] * kw["groups"],), dt)
        yshape = (xs[0], ws[1] * kw["groups"]) + out
        expect = ref.conv_input_grad(x64, w64, yshape, stride=kw["stride"], padding=pads,
                                     dilation=kw["dilation"], groups=kw["groups"])
        expect = expect + b64.reshape((1, -1) + (1,) * nd)
        got = gpuconv.conv_transpose(to_dev(x), to_dev(w), to_dev(b), backend=backend, **kw)
        return _rel_err(to_host(got), expect)
    x, x64 = _rand(rng, xs, dt)
    w, w64 = _rand(rng, ws, dt)
    yshape = ref.geometry(xs, ws, **kw).y_shape
    gy, gy64 = _rand(rng, yshape, dt)
    if pass_name == "forward":
        b, b64 = _rand(rng, (ws[0],), dt)
        expect = ref.conv(x64, w64, b64, **kw)
        got = gpuconv.conv(to_dev(x), to_dev(w), to_dev(b), backend=backend, **kw)
    elif pass_name == "input_grad":
        expect = ref.conv_input_grad(gy64, w64, xs, **kw)
        got = gpuconv.conv_input_grad(to_dev(gy), to_dev(w), xs, backend=backend, **kw)
    elif pass_name == "weight_grad":
        expect = ref.conv_weight_grad(x64, gy64, ws, **kw)
        got = gpuconv.conv_weight_grad(to_dev(x), to_dev(gy), ws, backend=backend, **kw)
    elif pass_name == "bias_grad":
        expect = ref.conv_bias_grad(gy64)
        got = gpuconv.conv_bias_grad(to_dev(gy))
    else:
        raise ValueError(pass_name)
    return _rel_err(to_host(got), expect)


def run(backends, seed, cases=None):
    """Run the sweep.  Returns ``(rows, errors, seconds)``:

    rows: ``(backend, pass, dtype name, {rank: worst relative error (NaN: a crash)},
    tolerance, failed)``; errors: ``{(backend, pass, dtype name): [first message, count]}``.
    """
    rows = []
    errors = {}
    t0 = time.perf_counter()
    for backend in backends:
        small = backend == "cudasim"
        ncases = cases if cases is not None else (4 if small else 8)
        for pass_name in PASSES:
            for dname, dt in available_dtypes():
                errs = {}
                failed = False
                for nd in (1, 2, 3):
                    rng = np.random.default_rng([seed, PASSES.index(pass_name), nd,
                                                 len(dname), ord(dname[-1]), ncases])
                    worst = 0.0
                    for _ in range(ncases):
                        try:
                            e = run_case(pass_name, nd, dt, rng, backend, small)
                        except Exception as ex:  # a crash is a failure, reported below
                            key = (backend, pass_name, dname)
                            if key in errors:
                                errors[key][1] += 1
                            else:
                                errors[key] = [f"{nd}-d: {type(ex).__name__}: {ex}", 1]
                            e = float("nan")
                        # NaN (a crash or a NaN result) sticks: the row fails
                        worst = worst if np.isnan(worst) else (e if np.isnan(e) else max(worst, e))
                    errs[nd] = worst
                    if not worst <= tolerance(dname):
                        failed = True
                rows.append((backend, pass_name, dname, errs, tolerance(dname), failed))
    return rows, errors, time.perf_counter() - t0
