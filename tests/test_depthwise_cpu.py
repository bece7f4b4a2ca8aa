"""The CPU depthwise passes -- the native compiled kernels (gpuconv/_cpu/dwconv.cpp) and the
NumPy banded-GEMM / tap-loop passes they fall back to -- against the float64 reference: the depthwise geometries of test_numpy_backend plus the
band's own edge cases (partial tiles, chunks split over images / channels / tiles, rows
or columns that read only padding, kh = 1, multipliers, 1-3-D), four dtypes, hypothesis,
the workspace limit (peak temporaries), non-contiguous inputs, inputs unchanged,
fresh NaN-poisoned workspaces, and run-to-run determinism for a given thread count.

Timings are never asserted here (benchmarks/dw_cpu.py measures speed).
"""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuconv
import gpuconv._cpu as nb
from gpuconv import reference as ref
from gpuconv._cpu import depthwise, native, workspace
from gpuconv._geometry import conv_geometry

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if BF16 is not None else [])


@pytest.fixture(autouse=True)
def _restore_workspace():
    old = nb.get_workspace_limit()
    yield
    nb.set_workspace_limit(old / (1 << 20))


@pytest.fixture(autouse=True)
def _poisoned_arenas(monkeypatch):
    """Every workspace arena handed out is full of NaN (0xFF bytes), as a GPU ``empty``
    that poisons would be: an element the band reads without writing it shows up."""
    real = workspace.acquire

    def acquire(nbytes):
        a = real(nbytes)
        a.buf[...] = 0xFF
        return a

    monkeypatch.setattr(workspace, "acquire", acquire)
    monkeypatch.setattr(depthwise, "_acquire", acquire)


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    """Run the test on the native kernels (skipped where they cannot be built: no C++
    compiler) and on the NumPy passes; with "native", the test's calls must reach them."""
    calls = []
    if request.param == "native":
        monkeypatch.setenv("GPUCONV_CPU_NATIVE", "1")
        if native.library() is None:
            pytest.skip(f"native CPU kernels not usable here: {native.status()['reason']}")
        real = native.call
        monkeypatch.setattr(native, "call", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    else:
        monkeypatch.setenv("GPUCONV_CPU_NATIVE", "0")
    yield request.param
    if request.param == "native" and _EXPECT_NATIVE.get(request.node.nodeid, True):
        assert calls, "the native kernels were never called"


_EXPECT_NATIVE = {}  # node id -> False where a test's calls may all fall back


@pytest.fixture
def numpy_path(monkeypatch):
    """The NumPy passes (band / tap loops), not the native kernels."""
    monkeypatch.setenv("GPUCONV_CPU_NATIVE", "0")


@pytest.fixture(params=["1", "2"], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setenv("GPUCONV_NUM_THREADS", request.param)
    return int(request.param)


def _dt(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (an element left unwritten?)"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _check(xs, ws, kw, dtype="float32", bias=True, seed=0):
    """Forward (with bias) and input grad of the numpy backend vs the float64 reference."""
    rng = np.random.default_rng(seed)
    dt = _dt(dtype)
    x = rng.standard_normal(xs).astype(dt)
    w = rng.standard_normal(ws).astype(dt)
    b = rng.standard_normal(ws[0]).astype(dt) if bias else None
    f64 = (lambda a: None if a is None else np.asarray(a, dtype=np.float64))
    tol = TOL[np.dtype(dt).name]
    copies = [a.copy() for a in (x, w) + ((b,) if bias else ())]
    y = gpuconv.conv(x, w, b, backend="numpy", **kw)
    y_ref = ref.conv(f64(x), f64(w), f64(b), **kw)
    assert y.shape == y_ref.shape and y.dtype == dt
    e = _rel_err(y, y_ref)
    assert e <= tol, ("forward", e)
    gy = rng.standard_normal(y_ref.shape).astype(dt)
    gy0 = gy.copy()
    gx = gpuconv.conv_input_grad(gy, w, xs, backend="numpy", **kw)
    gx_ref = ref.conv_input_grad(f64(gy), f64(w), xs, **kw)
    assert gx.shape == tuple(xs) and gx.dtype == dt
    e = _rel_err(gx, gx_ref)
    assert e <= tol, ("input_grad", e)
    for a, a0 in zip([x, w] + ([b] if bias else []) + [gy], copies + [gy0]):
        np.testing.assert_array_equal(a, a0)  # inputs never modified


# the depthwise geometries of tests/test_numpy_backend.py, and the band's edge cases
CASES = {
    "depthwise": ((2, 5, 9, 8), (5, 1, 3, 3), dict(groups=5, padding=1)),
    "mult2": ((2, 4, 9, 8), (8, 1, 3, 3), dict(groups=4, padding=1)),
    "strided": ((2, 4, 11, 12), (4, 1, 3, 3), dict(groups=4, padding=1, stride=2)),
    "7x7": ((2, 3, 10, 9), (3, 1, 7, 7), dict(groups=3, padding=3)),
    "dil_asym": ((2, 3, 10, 9), (6, 1, 3, 2), dict(groups=3, padding=((2, 0), (1, 2)), dilation=2)),
    "nopad": ((2, 3, 8, 9), (3, 1, 3, 3), dict(groups=3)),
    "mixed_stride": ((2, 3, 9, 10), (6, 1, 3, 3), dict(groups=3, padding=1, stride=(2, 1))),
    "s3_dil2": ((2, 3, 13, 12), (3, 1, 3, 3), dict(groups=3, padding=2, stride=3, dilation=2)),
    "kernel_lt_stride": ((2, 3, 10, 9), (6, 1, 2, 2), dict(groups=3, stride=3)),
    "big_pad": ((2, 2, 5, 4), (2, 1, 3, 3), dict(groups=2, padding=4)),
    "conv1d": ((2, 4, 17), (4, 1, 3), dict(groups=4, padding=1, dilation=2)),
    "conv1d_strided": ((2, 4, 17), (8, 1, 4), dict(groups=4, padding=2, stride=3)),
    "conv3d": ((2, 3, 5, 6, 5), (6, 1, 3, 3, 3), dict(groups=3, padding=1)),
    "conv3d_strided": ((2, 3, 7, 6, 5), (3, 1, 3, 2, 3), dict(groups=3, padding=1, stride=2)),
    "conv3d_mixed": ((1, 2, 6, 7, 5), (4, 1, 3, 2, 3), dict(groups=2, padding=(1, 0, 2),
                                                              stride=(1, 2, 1), dilation=(2, 1, 1))),
    # band specific: kh = 1, a partial last tile, one output row, rows of padding only,
    # a kernel taller than the input, a wide multiplier, asymmetric pads larger than the kernel
    "kh1": ((2, 3, 6, 9), (3, 1, 1, 5), dict(groups=3, padding=(0, 2))),
    "kw1": ((2, 3, 9, 6), (6, 1, 5, 1), dict(groups=3, padding=(2, 0))),
    "partial_tile": ((2, 3, 11, 7), (3, 1, 3, 3), dict(groups=3, padding=1)),
    "one_row": ((2, 3, 3, 8), (3, 1, 3, 3), dict(groups=3)),
    "pad_rows": ((1, 2, 3, 4), (2, 1, 3, 3), dict(groups=2, padding=((6, 5), (1, 1)))),
    "tall_kernel": ((2, 2, 3, 9), (2, 1, 5, 3), dict(groups=2, padding=(2, 1))),
    "mult3": ((2, 2, 8, 7), (6, 1, 3, 3), dict(groups=2, padding=1, dilation=(1, 2))),
    "huge_pad_cols": ((1, 2, 5, 3), (2, 1, 3, 3), dict(groups=2, padding=((1, 1), (5, 6)))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_against_reference(name, threads, impl):
    xs, ws, kw = CASES[name]
    _check(xs, ws, kw)


@pytest.mark.parametrize("name", ["depthwise", "mult2", "7x7", "dil_asym", "conv1d", "conv3d",
                                  "strided", "partial_tile", "pad_rows"])
@pytest.mark.parametrize("kib", [1, 6, 40])
def test_small_workspace_chunking(name, kib, threads, numpy_path):
    """Small workspaces split the chunks over channels, tiles and images."""
    nb.set_workspace_limit(kib / 1024)
    xs, ws, kw = CASES[name]
    _check((3,) + xs[1:], ws, kw, seed=1)


@pytest.mark.parametrize("kw", [dict(padding=3), dict(padding=(2, 4), stride=(1, 2)),
                                dict(padding=(4, 1), dilation=(1, 2))])
def test_chunks_of_different_shapes(kw, threads, monkeypatch, numpy_path):
    """Budgets that split the images (and channels, tiles) unevenly: chunks of several
    shapes run in one worker, each with its own zero columns."""
    seen = []
    real = depthwise._run_parallel

    def spy(chunks, *a, **k):
        seen.append(chunks)
        return real(chunks, *a, **k)

    monkeypatch.setattr(depthwise, "_run_parallel", spy)
    uneven = [0, 0]  # forward, input grad
    for extra_kib in range(2, 122, 8):
        nb.set_workspace_limit(threads * (workspace._UFUNC_RESERVE + extra_kib * 1024) / 2 ** 20)
        seen.clear()
        _check((5, 3, 23, 37), (6, 1, 7, 7), dict(groups=3, **kw), seed=extra_kib)
        assert len(seen) == 2
        for i, chunks in enumerate(seen):
            uneven[i] += len({c[1] - c[0] for c in chunks}) > 1
    assert min(uneven) >= 1  # the images were split unevenly in some of these budgets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mult2", "7x7", "strided", "conv3d", "conv1d"])
def test_dtypes(name, dtype, request, impl):
    if dtype not in ("float32", "float64"):  # half types take the NumPy passes
        _EXPECT_NATIVE[request.node.nodeid] = False
    xs, ws, kw = CASES[name]
    _check(xs, ws, kw, dtype=dtype)


def test_half_rounded_once(impl, request):
    _EXPECT_NATIVE[request.node.nodeid] = False
    """float16 forward = the float32 result of the float16 inputs rounded once."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 12, 11)).astype(np.float16)
    w = rng.standard_normal((4, 1, 5, 5)).astype(np.float16)
    y = gpuconv.conv(x, w, groups=4, padding=2, backend="numpy")
    want = ref.conv(x.astype(np.float64), w.astype(np.float64), groups=4, padding=2)
    once = want.astype(np.float16)  # the exact result rounded once to float16
    ulp = np.spacing(np.abs(once)).astype(np.float64)
    diff = np.abs(y.astype(np.float64) - once.astype(np.float64))
    assert np.all(diff <= ulp)  # float32 accumulation may flip a rounding, never more
    assert np.mean(diff == 0) > 0.99


def _views(rng, shape, kind):
    """A non-contiguous array with the values of a fresh random array of `shape`."""
    a = rng.standard_normal(shape).astype(np.float32)
    if kind == "transposed":  # channels-last storage
        buf = np.ascontiguousarray(np.moveaxis(a, 1, -1))
        return np.moveaxis(buf, -1, 1), a
    if kind == "strided":
        big = np.full(tuple(2 * s for s in shape), np.nan, np.float32)
        v = big[tuple(slice(None, None, 2) for _ in shape)]
        v[...] = a
        return v, a
    if kind == "reversed":
        buf = np.ascontiguousarray(a[..., ::-1])
        return buf[..., ::-1], a
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["transposed", "strided", "reversed"])
@pytest.mark.parametrize("name", ["mult2", "7x7", "strided", "conv3d"])
def test_non_contiguous_inputs(name, kind, threads, numpy_path):
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(5)
    x, x0 = _views(rng, xs, kind)
    w, w0 = _views(rng, ws, kind)
    y = gpuconv.conv(x, w, backend="numpy", **kw)
    y_ref = ref.conv(x0.astype(np.float64), w0.astype(np.float64), **kw)
    assert _rel_err(y, y_ref) <= 1e-5
    gy, gy0 = _views(rng, y_ref.shape, kind)
    gx = gpuconv.conv_input_grad(gy, w, xs, backend="numpy", **kw)
    gx_ref = ref.conv_input_grad(gy0.astype(np.float64), w0.astype(np.float64), xs, **kw)
    assert _rel_err(gx, gx_ref) <= 1e-5
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(gy, gy0)


def test_fresh_outputs(threads, impl):
    """Results never alias the workspace."""
    xs, ws, kw = CASES["dil_asym"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    y1 = gpuconv.conv(x, w, backend="numpy", **kw)
    y2 = gpuconv.conv(x, w, backend="numpy", **kw)
    np.testing.assert_array_equal(y1, y2)
    y1[...] = np.nan
    assert np.all(np.isfinite(y2))


@pytest.mark.parametrize("threads_n", ["1", "2"])
def test_deterministic(threads_n, monkeypatch, impl):
    """The same call gives bitwise the same result, every time, for a given thread count."""
    monkeypatch.setenv("GPUCONV_NUM_THREADS", threads_n)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 16, 20, 19)).astype(np.float32)
    w = rng.standard_normal((32, 1, 5, 5)).astype(np.float32)
    kw = dict(groups=16, padding=2)
    y0 = gpuconv.conv(x, w, backend="numpy", **kw)
    gy = rng.standard_normal(y0.shape).astype(np.float32)
    g0 = gpuconv.conv_input_grad(gy, w, x.shape, backend="numpy", **kw)
    for _ in range(4):
        np.testing.assert_array_equal(gpuconv.conv(x, w, backend="numpy", **kw), y0)
        np.testing.assert_array_equal(gpuconv.conv_input_grad(gy, w, x.shape, backend="numpy",
                                                              **kw), g0)


# ----------------------------------------------------------------------------- memory
def _peak_extra(fn):
    nb.clear_workspace_cache()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, out


@pytest.mark.parametrize("xs,ws,kw", [
    ((4, 32, 40, 40), (32, 1, 7, 7), dict(padding=3, groups=32)),
    ((3, 24, 41, 39), (48, 1, 3, 3), dict(padding=1, groups=24)),
    ((4, 16, 48, 48), (16, 1, 3, 3), dict(padding=1, stride=2, groups=16)),
    ((2, 8, 12, 14, 13), (8, 1, 3, 3, 3), dict(padding=1, groups=8)),
    ((4, 32, 700), (32, 1, 9), dict(padding=4, groups=32)),
])
@pytest.mark.parametrize("limit_mb", [0.25, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_bound(xs, ws, kw, limit_mb, dtype, threads, impl, request):
    _EXPECT_NATIVE[request.node.nodeid] = False  # small limits may fall back
    """Peak temporaries <= workspace + output (+ a cast copy of the weight, small slack)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    g = conv_geometry("t", xs, ws, dtype=np.dtype(dtype), **kw)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    nb.set_workspace_limit(limit_mb)
    be = nb.NumpyBackend()
    limit = nb.get_workspace_limit()
    slack = 4 * math.prod(ws) * 3 + 64 * 1024
    it = np.dtype(dtype).itemsize
    cases = [(lambda: be.forward(x, w, None, g), g.y_shape)]
    if all(s == 1 for s in g.stride):
        cases.append((lambda: be.input_grad(gy, w, g), g.x_shape))
    for fn, out_shape in cases:
        peak, out = _peak_extra(fn)
        assert peak <= limit + math.prod(out_shape) * it + slack, (peak, limit)
        assert np.all(np.isfinite(out))


def test_band_is_used(monkeypatch, numpy_path):
    """Depthwise forward (any stride) and stride-1 input grad run the banded GEMM."""
    calls = []
    real = depthwise._band_pass
    monkeypatch.setattr(depthwise, "_band_pass", lambda *a, **k: (calls.append(1), real(*a, **k)))
    x = np.ones((1, 2, 6, 6), np.float32)
    w = np.ones((2, 1, 3, 3), np.float32)
    gpuconv.conv(x, w, groups=2, stride=2, backend="numpy")
    gpuconv.conv_input_grad(np.ones((1, 2, 4, 4), np.float32), w, x.shape, groups=2,
                            backend="numpy")
    assert len(calls) == 2


# ----------------------------------------------------------------------------- hypothesis
@st.composite
def _dw_case(draw):
    nd = draw(st.integers(1, 3))
    C = draw(st.integers(1, 4))
    m = draw(st.sampled_from((1, 2, 3)))
    N = draw(st.integers(0, 3))
    k = tuple(draw(st.integers(1, 5 if nd < 3 else 3)) for _ in range(nd))
    s = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    d = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pad = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(nd))
    eff = [(kk - 1) * dd + 1 for kk, dd in zip(k, d)]
    sp = tuple(draw(st.integers(max(1, e - lo - hi), max(1, e - lo - hi) + (9 if nd < 3 else 4)))
               for e, (lo, hi) in zip(eff, pad))
    dtype = draw(st.sampled_from(DTYPES))
    kib = draw(st.sampled_from((None, 2, 16)))
    return (N, C) + sp, (C * m, 1) + k, dict(groups=C, stride=s, dilation=d, padding=pad), \
        dtype, kib


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_dw_case())
def test_hypothesis_depthwise(impl, request, case):
    _EXPECT_NATIVE[request.node.nodeid] = False  # half types and small limits fall back
    xs, ws, kw, dtype, kib = case
    old = nb.get_workspace_limit()
    try:
        if kib:
            nb.set_workspace_limit(kib / 1024)
        _check(xs, ws, kw, dtype=dtype)
    finally:
        nb.set_workspace_limit(old / (1 << 20))
