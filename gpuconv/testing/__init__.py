"""Test helpers: finite-difference gradient checks and dtype-aware comparisons.

* :func:`gradcheck` -- central finite differences of ``<conv(x, w, b), grad_out>``
  against ``conv_input_grad`` / ``conv_weight_grad`` / ``conv_bias_grad``.
* :func:`tolerance` and :func:`assert_close` -- compare a result with the float64
  reference (:mod:`gpuconv.reference`) under a per-dtype relative tolerance.
* :func:`to_numpy` and :func:`as_backend_array` -- move test data between host
  numpy arrays and the array type a backend runs on.

* :mod:`gpuconv.testing.selftest` -- the engine of ``python -m gpuconv selftest``.

The CUDA-on-CPU emulator (:mod:`gpuconv._runtimes.cudasim`) is re-exported as
:mod:`gpuconv.testing.cudasim`; it is not imported here.
"""
from __future__ import annotations

import numpy as np

from .._dispatch import array_namespace

__all__ = ["gradcheck", "tolerance", "assert_close", "rel_error", "to_numpy",
           "as_backend_array"]

# Relative tolerances (see tolerance()).  Half types: the backends accumulate in
# float32 and round once (the seed's shared-kernel form included), which costs at
# most eps/2 relative to max|reference|.  Two epsilons keep a 4x margin over that
# and still catch wrong indexing, a missing tap or a bad conversion (errors of
# order 1 / number of terms and more).
_F64_TOL = 1e-12
_F32_TOL = 1e-5
_HALF_EPS_FACTOR = 2.0


def _half_eps(name: str) -> float:
    if name == "float16":
        return float(np.finfo(np.float16).eps)  # 2**-10
    if name == "bfloat16":
        return 2.0 ** -7  # 8 significand bits (ml_dtypes.finfo(bfloat16).eps)
    raise KeyError(name)


def tolerance(dtype) -> float:
    """Relative tolerance for a result of ``dtype`` against the float64 reference.

    The error measure is :func:`rel_error`: ``max|actual - expected| / max|expected|``.

    ===========  ===================================================
    float64      ``1e-12``
    float32      ``1e-5``
    float16      ``2 * 2**-10`` (about 1.95e-3)
    bfloat16     ``2 * 2**-7``  (about 1.56e-2)
    ===========  ===================================================

    Half types are accumulated in float32 and rounded once, so a correct result
    is within ``eps/2`` of the reference (relative to its largest magnitude);
    the factor 2 over ``eps`` is a 4x margin over that.  Calibrated on random geometries: the numpy backend stays below
    ``0.5 * eps``; a missing tap or a wrong index is off by far more.

    >>> tolerance(np.float32)
    1e-05
    >>> tolerance("float16") == 2 * 2.0 ** -10
    True
    """
    name = np.dtype(dtype).name
    if name == "float64":
        return _F64_TOL
    if name == "float32":
        return _F32_TOL
    if name in ("float16", "bfloat16"):
        return _HALF_EPS_FACTOR * _half_eps(name)
    raise TypeError(f"tolerance: no tolerance for dtype {name}")


# ----------------------------------------------------------------------------- array moves
def to_numpy(a):
    """A host numpy array with ``a``'s values (a copy for cupy arrays; ``a`` itself for numpy).

    >>> to_numpy(np.arange(3)).tolist()
    [0, 1, 2]
    """
    if isinstance(a, np.ndarray):
        return a
    try:
        xp = array_namespace("to_numpy", a=a)
    except TypeError:  # not an ndarray at all: numpy's conversion
        return np.asarray(a)
    return xp.asnumpy(a)


def as_backend_array(a, backend: str):
    """``a`` (numpy) as the array type ``backend`` runs on: cupy for 'cupy', numpy otherwise.

    >>> as_backend_array(np.ones(2), "numpy").dtype
    dtype('float64')
    """
    if backend == "cupy":
        import cupy
        return cupy.asarray(a)
    return np.asarray(a)


# ----------------------------------------------------------------------------- comparisons
def rel_error(actual, expected, scale=None) -> float:
    """``max|actual - expected| / max(max|expected|, scale)`` in float64 over the finite entries.

    When the denominator is 0 (all-zero or empty reference, no ``scale``) it is
    replaced by 1, i.e. the error is absolute.  ``actual`` may be any dtype
    (bfloat16 included) and a numpy or cupy array.

    >>> rel_error(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
    0.5
    """
    a = to_numpy(actual).astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if e.size == 0:
        return 0.0
    fin = np.isfinite(e)
    denom = max(float(np.max(np.abs(e[fin]), initial=0.0)), float(scale or 0.0))
    diff = np.abs(a[fin] - e[fin])
    if diff.size and not np.all(np.isfinite(diff)):
        return float("inf")
    err = float(np.max(diff, initial=0.0))
    return err / denom if denom > 0 else err


def assert_close(actual, expected_f64, dtype, what: str = "result", *, scale=None) -> float:
    """Assert ``actual`` (of ``dtype``) matches the float64 ``expected_f64``.

    Checks, in order: the shapes are equal; non-finite reference entries (NaN,
    +-inf) are matched exactly by ``actual``; and over the finite entries

        ``max|actual - expected| / max(max|expected|, scale)  <=  tolerance(dtype)``

    (denominator 1 when it would be 0).  Any NaN or inf in ``actual`` where the
    reference is finite fails.  Returns the relative error.  ``what`` names the
    result in the failure message.

    ``scale`` (optional) floors the denominator with the magnitude of the terms
    that were summed -- e.g. ``max|reference(|x|, |w|)|`` -- so that a result
    which cancels to nearly zero (a bias gradient of a few values, a 1x1
    output) is judged by the rounding its summation can really incur.

    >>> assert_close(np.float32([1, 2]), np.array([1.0, 2.0 + 1e-7]), np.float32, "y") < 1e-5
    True
    """
    a = to_numpy(actual)
    e = np.asarray(expected_f64, dtype=np.float64)
    if tuple(a.shape) != tuple(e.shape):
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    a64 = a.astype(np.float64)
    nonfinite = ~np.isfinite(e)
    if nonfinite.any():
        bad = ~((np.isnan(e) & np.isnan(a64)) | (a64 == e)) & nonfinite
        if bad.any():
            i = tuple(int(v) for v in np.argwhere(bad)[0])
            raise AssertionError(f"{what}: at {i} the reference is {e[i]} but got {a64[i]}")
    tol = tolerance(dtype)
    err = rel_error(a64, e, scale)
    if not err <= tol:
        fin = np.isfinite(e)
        diff = np.where(fin, np.abs(a64 - np.where(fin, e, 0)), 0)
        diff = np.where(np.isnan(diff), np.inf, diff)
        i = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        i = tuple(int(v) for v in i)
        raise AssertionError(
            f"{what} ({np.dtype(dtype).name}): relative error {err:.3e} > tolerance {tol:.1e} "
            f"(max|actual - ref| / max(max|ref|, scale), max|ref| = "
            f"{np.max(np.abs(e[fin]), initial=0):.6g}, scale = {scale}); "
            f"worst at index {i}: got {a64[i] if i or a64.ndim == 0 else None}, "
            f"reference {e[i] if i or e.ndim == 0 else None}")
    return err


# ----------------------------------------------------------------------------- gradcheck
def _pick(rng, shape, points):
    """Flat indices to check: all of them when points is None or covers the array."""
    size = int(np.prod(shape, dtype=np.int64))
    if points is None or points >= size:
        return list(range(size))
    return sorted(int(i) for i in rng.choice(size, size=int(points), replace=False))


def gradcheck(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, grad_out=None,
              points=8, eps=1e-6, rtol=1e-6, atol=None, rng=None, backend=None) -> dict:
    """Check conv's gradients against central finite differences, in float64.

    The scalar checked is ``f(x, w, b) = sum(conv(x, w, b) * grad_out)``; its
    exact gradients are ``conv_input_grad(grad_out, w, x.shape)``,
    ``conv_weight_grad(x, grad_out, w.shape)`` and ``conv_bias_grad(grad_out)``
    (with the same ``stride`` / ``padding`` / ``dilation`` / ``groups``).  At
    ``points`` random elements of x, of the weight and of the bias (every
    element when ``points`` is None or exceeds the size) the numeric derivative
    ``(f(a + eps) - f(a - eps)) / (2 eps)`` is compared with the analytic one:

        ``|analytic - numeric| <= atol + rtol * |numeric|``

    Arrays are cast to float64 in their own namespace (numpy or cupy) first, so
    this checks the float64 path of the backend that runs them (``backend``
    forces one, as in :func:`gpuconv.conv`).  Because ``f`` is linear in each
    argument the central difference is exact up to rounding, about
    ``|f|-scale * 1e-16 / eps``; the default ``atol`` is
    ``1e-14 / eps * S`` with ``S = sum(|conv(x, w, b)| * |grad_out|)`` (1e-8 * S
    for ``eps = 1e-6``).

    ``grad_out`` defaults to standard-normal values (never all ones: with an
    all-ones output gradient some wrong weight-gradient formulas still pass).
    ``rng``: None (fresh entropy; the seed is reported), an int seed or a
    ``numpy.random.Generator``.

    Raises AssertionError naming the argument, the index, the analytic and the
    numeric value on the first mismatch.  Returns a report::

        {"x": {"checked": n, "max_abs_err": ..., "max_rel_err": ...},
         "weight": {...}, "bias": {...} (if given), "atol": ..., "seed": ...}

    where ``max_rel_err`` is ``max_abs_err`` over the largest ``|numeric|`` checked.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, w, b = rng.random((2, 3, 6, 5)), rng.random((4, 3, 3, 2)), rng.random(4)
    >>> r = gradcheck(x, w, b, stride=(2, 1), padding="same", rng=1)
    >>> r["x"]["checked"], r["weight"]["checked"], r["bias"]["checked"]
    (8, 8, 4)
    >>> r["weight"]["max_abs_err"] < 1e-8
    True
    """
    import gpuconv

    seed = None
    if rng is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(seed)
    elif not isinstance(rng, np.random.Generator):
        seed = int(rng)
        rng = np.random.default_rng(seed)
    xp = array_namespace("gradcheck", x=x, weight=weight, bias=bias, grad_out=grad_out)
    x = x.astype(np.float64)          # copies: the caller's arrays are never touched
    weight = weight.astype(np.float64)
    bias = None if bias is None else bias.astype(np.float64)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    y = gpuconv.conv(x, weight, bias, backend=backend, **kw)
    if grad_out is None:
        grad_out = xp.asarray(rng.standard_normal(y.shape))
    else:
        grad_out = grad_out.astype(np.float64)
        if tuple(grad_out.shape) != tuple(y.shape):
            raise ValueError(f"gradcheck: grad_out.shape={tuple(grad_out.shape)} must be the "
                             f"output shape {tuple(y.shape)}")
    scale = float(xp.sum(xp.abs(y) * xp.abs(grad_out)))
    if atol is None:
        atol = 1e-14 / eps * scale

    def f(xx, ww, bb):
        return float(xp.sum(gpuconv.conv(xx, ww, bb, backend=backend, **kw) * grad_out))

    analytic = {
        "x": gpuconv.conv_input_grad(grad_out, weight, x.shape, backend=backend, **kw),
        "weight": gpuconv.conv_weight_grad(x, grad_out, weight.shape, backend=backend, **kw),
    }
    args = {"x": x, "weight": weight}
    if bias is not None:
        analytic["bias"] = gpuconv.conv_bias_grad(grad_out)
        args["bias"] = bias

    report = {"atol": atol, "seed": seed}
    for name, a in args.items():
        ga = analytic[name]
        if tuple(ga.shape) != tuple(a.shape):
            raise AssertionError(f"gradcheck: gradient of {name} has shape {tuple(ga.shape)}, "
                                 f"expected {tuple(a.shape)}")
        max_abs = max_num = 0.0
        flat_idx = _pick(rng, a.shape, points)
        for flat in flat_idx:
            idx = tuple(int(v) for v in np.unravel_index(flat, a.shape))
            orig = float(a[idx])
            vals = []
            for sign in (1.0, -1.0):
                a[idx] = orig + sign * eps
                vals.append(f(args["x"], args["weight"], args.get("bias")))
            a[idx] = orig
            numeric = (vals[0] - vals[1]) / (2 * eps)
            got = float(ga[idx])
            err = abs(got - numeric)
            max_abs = max(max_abs, err)
            max_num = max(max_num, abs(numeric))
            if not err <= atol + rtol * abs(numeric):
                raise AssertionError(
                    f"gradcheck: d f / d {name}{list(idx)}: analytic {got!r} != numeric "
                    f"{numeric!r} (|diff| {err:.3e} > atol {atol:.3e} + rtol {rtol:.1e} * "
                    f"|numeric|); stride={stride!r}, padding={padding!r}, dilation={dilation!r}, "
                    f"groups={groups!r}, {name}.shape={tuple(a.shape)}, seed={seed}")
        report[name] = {"checked": len(flat_idx), "max_abs_err": max_abs,
                        "max_rel_err": max_abs / max_num if max_num > 0 else max_abs}
    return report
