"""The native CPU depthwise kernels (gpuconv/_cpu/dwconv.cpp via gpuconv/_cpu/native.py).

* every pass called directly on NaN-poisoned outputs and scratch, against the float64
  reference, over the depthwise geometries of test_depthwise_cpu (every stride,
  dilation, asymmetric and oversized padding, multipliers, 1-3-D), float32 and float64;
* results bit-identical for any thread count and any split of the work;
* a non-finite input element reaches exactly the outputs the reference says it reaches
  (no vector lane past the end of a row enters a sum);
* the fallbacks: turned off, no compiler, a compiler that fails, a workspace too small,
  non-contiguous operands, half types -- each runs the NumPy passes, still correct;
* the build cache and what `backend_info()` reports.

The tests that need the kernels skip where they cannot be built (no C++ compiler).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import gpuconv
import gpuconv._cpu as nb
from gpuconv import reference as ref
from gpuconv._cpu import depthwise, native
from gpuconv._geometry import conv_geometry

from test_depthwise_cpu import CASES

TOL = {"float32": 2e-6, "float64": 1e-13}


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.delenv("GPUCONV_CPU_NATIVE", raising=False)
    lib = native.library()
    if lib is None:
        pytest.skip(f"native CPU kernels not usable here: {native.status()['reason']}")
    return lib


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = native.call
    monkeypatch.setattr(native, "call", lambda *a, **k: (seen.append(a[0]), real(*a, **k)))
    return seen


def _rel(got, want):
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got)), "non-finite output: an element left unwritten"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def _operands(xs, ws, kw, dtype, seed=0):
    g = conv_geometry("t", xs, ws, dtype=np.dtype(dtype), **kw)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    return g, x, w, b, gy


def _pass(g, workers=1):
    cdt = g.accumulate_dtype
    return nb.Pass(g=g, cdt=cdt, itemsize=cdt.itemsize, workers=workers)


def _direct(g, x, w, b, gy, workers=1):
    """The three passes through the native entry points, outputs poisoned with NaN."""
    p = _pass(g, workers)
    y = np.full(g.y_shape, np.nan, g.dtype)
    assert depthwise.forward_native(p, x, w, b, y)
    gx = np.full(g.x_shape, np.nan, g.dtype)
    assert depthwise.input_grad_native(p, gy, w, gx)
    gw = depthwise.weight_grad_native(p, x, gy)
    assert gw is not None
    return y, gx, gw.reshape(g.w_shape)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_pass_against_reference(name, dtype, lib, calls):
    xs, ws, kw = CASES[name]
    g, x, w, b, gy = _operands(xs, ws, kw, dtype)
    x0, w0, gy0 = x.copy(), w.copy(), gy.copy()
    y, gx, gw = _direct(g, x, w, b, gy, workers=2)
    f = np.float64
    assert _rel(y, ref.conv(x.astype(f), w.astype(f), b.astype(f), **kw)) <= TOL[dtype]
    assert _rel(gx, ref.conv_input_grad(gy.astype(f), w.astype(f), xs, **kw)) <= TOL[dtype]
    assert _rel(gw, ref.conv_weight_grad(x.astype(f), gy.astype(f), ws, **kw)) <= TOL[dtype]
    assert y.dtype == gx.dtype == gw.dtype == np.dtype(dtype)
    assert sorted(set(calls)) == ["forward", "input_grad", "weight_grad"]
    for a, a0 in ((x, x0), (w, w0), (gy, gy0)):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("xs,ws,kw", [
    ((3, 8, 57, 61), (16, 1, 7, 7), dict(groups=8, padding=3)),              # rows of 61: 8 vectors
    ((2, 6, 40, 130), (6, 1, 3, 3), dict(groups=6, padding=1, stride=2)),   # several blocks/row
    ((2, 4, 9, 5, 70), (4, 1, 3, 3, 5), dict(groups=4, padding=(1, 0, 2), stride=(1, 2, 3),
                                             dilation=(2, 1, 2))),
    ((2, 5, 300), (10, 1, 9), dict(groups=5, padding=(8, 1), dilation=3, stride=2)),
])
def test_wide_rows_and_blocks(xs, ws, kw, lib):
    """Rows longer than one register block, every block width, partial last blocks."""
    for dtype in ("float32", "float64"):
        g, x, w, b, gy = _operands(xs, ws, kw, dtype, seed=3)
        y, gx, gw = _direct(g, x, w, b, gy)
        f = np.float64
        assert _rel(y, ref.conv(x.astype(f), w.astype(f), b.astype(f), **kw)) <= TOL[dtype]
        assert _rel(gx, ref.conv_input_grad(gy.astype(f), w.astype(f), xs, **kw)) <= TOL[dtype]
        assert _rel(gw, ref.conv_weight_grad(x.astype(f), gy.astype(f), ws, **kw)) <= TOL[dtype]


def test_bits_do_not_depend_on_threads_or_splits(lib, monkeypatch):
    """Each output element is computed by one call in one order: 1, 2 and 3 workers, and
    work ranges split anywhere, give the same bits."""
    xs, ws, kw = (5, 7, 23, 29), (14, 1, 5, 5), dict(groups=7, padding=2, stride=(1, 2))
    g, x, w, b, gy = _operands(xs, ws, kw, "float32", seed=7)
    base = _direct(g, x, w, b, gy, workers=1)
    for workers in (2, 3):
        for a, a0 in zip(_direct(g, x, w, b, gy, workers=workers), base):
            np.testing.assert_array_equal(a, a0)
    # through the public API with GPUCONV_NUM_THREADS
    outs = []
    for t in ("1", "2"):
        monkeypatch.setenv("GPUCONV_NUM_THREADS", t)
        outs.append((gpuconv.conv(x, w, b, backend="numpy", **kw),
                     gpuconv.conv_input_grad(gy, w, xs, backend="numpy", **kw),
                     gpuconv.conv_weight_grad(x, gy, ws, backend="numpy", **kw)))
    for a, a0 in zip(*outs):
        np.testing.assert_array_equal(a, a0)
    # one range split in two calls
    prm = native.params(g.N, g.C, 1, g.Kg, g.in_spatial, g.out_spatial, g.kernel, g.stride,
                        g.dilation, g.pad_lo)
    s = np.full(native.scratch_elems("forward", np.float32, prm), np.nan, np.float32)
    y = np.full(g.y_shape, np.nan, np.float32)
    wc = np.ascontiguousarray(w)
    for lo, hi in ((0, 11), (11, g.N * g.C)):
        q = prm.copy()
        q[-2:] = (lo, hi)
        native.call("forward", q, x, wc, b, y, scratch=s)
    np.testing.assert_array_equal(y, base[0])


@pytest.mark.parametrize("kw", [dict(padding=1, stride=2), dict(padding=(0, 3)),
                                dict(padding=2, dilation=2), dict(padding=1),
                                dict(padding=((3, 0), (2, 1)), stride=(2, 3))])
def test_non_finite_reaches_what_the_reference_says(kw, lib):
    """An inf / NaN in x, w or gy lands exactly where the float64 reference puts it:
    padding is a multiplied zero in the forward and weight grad (0 * inf = NaN, also on
    whole rows of padding), the input grad forms only real (tap, output) products, and
    nothing leaks through the lanes past the end of a row."""
    xs, ws = (2, 3, 11, 13), (3, 1, 3, 3)
    kw = dict(groups=3, **kw)
    g, x, w, b, gy = _operands(xs, ws, kw, "float64", seed=2)
    x[0, 1, 4, -1] = np.inf      # the last column: not read by every stride
    x[1, 2, -1, 5] = np.nan
    gy[1, 0, 0, -1] = -np.inf    # a corner output: its window meets the padding
    gy[0, 2, -1, 0] = np.nan
    w[1, 0, 0, 0] = np.inf       # a corner tap: meets the padding (forward: 0 * inf)
    w[2, 0, 2, 1] = -np.inf
    f = np.float64
    with np.errstate(invalid="ignore", over="ignore"):
        want = (ref.conv(x, w, b, **kw), ref.conv_input_grad(gy, w, xs, **kw),
                ref.conv_weight_grad(x, gy, ws, **kw))
    p = _pass(g)
    y = np.full(g.y_shape, 7.0, f)
    assert depthwise.forward_native(p, x, w, b, y)
    gx = np.full(g.x_shape, 7.0, f)
    assert depthwise.input_grad_native(p, gy, w, gx)
    gw = depthwise.weight_grad_native(p, x, gy).reshape(ws)
    for got, exp in zip((y, gx, gw), want):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(exp))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exp))
        fin = np.isfinite(exp)
        np.testing.assert_allclose(got[fin], exp[fin], rtol=1e-12, atol=1e-12)


def test_empty_batch_weight_grad_is_zero(lib):
    g, x, w, b, gy = _operands((0, 3, 6, 6), (6, 1, 3, 3), dict(groups=3, padding=1), "float32")
    gw = depthwise.weight_grad_native(_pass(g), x, gy)
    np.testing.assert_array_equal(gw, np.zeros((6, 1, 9), np.float32))


# ----------------------------------------------------------------------------- fallbacks
def _public_ok(dtype="float32", x_view=None, limit_mb=None):
    xs, ws, kw = CASES["mult3"]
    g, x, w, b, gy = _operands(xs, ws, kw, dtype, seed=4)
    if x_view is not None:
        x = x_view(x)
    f = np.float64
    y = gpuconv.conv(x, w, b, backend="numpy", **kw)
    gx = gpuconv.conv_input_grad(gy, w, xs, backend="numpy", **kw)
    gw = gpuconv.conv_weight_grad(x, gy, ws, backend="numpy", **kw)
    tol = 1e-5 if dtype == "float32" else 4e-3
    assert _rel(y, ref.conv(x.astype(f), w.astype(f), b.astype(f), **kw)) <= tol
    assert _rel(gx, ref.conv_input_grad(gy.astype(f), w.astype(f), xs, **kw)) <= tol
    assert _rel(gw, ref.conv_weight_grad(x.astype(f), gy.astype(f), ws, **kw)) <= tol


def test_turned_off(monkeypatch, calls):
    monkeypatch.setenv("GPUCONV_CPU_NATIVE", "0")
    assert native.library() is None
    st = native.status()
    assert not st["usable"] and "GPUCONV_CPU_NATIVE" in st["reason"]
    _public_ok()
    assert calls == []


@pytest.mark.parametrize("cxx,words", [("gpuconv-no-such-compiler", "not found on PATH"),
                                       ("false", "NativeBuildError")])
def test_no_or_failing_compiler(cxx, words, monkeypatch, calls, tmp_path):
    """No compiler / a compiler that fails: the NumPy passes run, status says why."""
    monkeypatch.delenv("GPUCONV_CPU_NATIVE", raising=False)
    monkeypatch.setenv("GPUCONV_CACHE_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("GPUCONV_CXX", cxx)
    try:
        assert native.library() is None
        st = native.status()
        assert not st["usable"] and words in st["reason"], st
        info = gpuconv.backend_info()["backends"]["numpy"]
        assert info["usable"] and info["native_kernels"]["usable"] is False
        _public_ok()
        assert calls == []
    finally:
        monkeypatch.delenv("GPUCONV_CXX")
        monkeypatch.setenv("GPUCONV_CACHE_DIR", os.environ.get("GPUCONV_CACHE_DIR", ""))
        native.library()  # back to the default compiler's (cached) build


def test_workspace_too_small_falls_back(lib, calls):
    old = nb.get_workspace_limit()
    try:
        nb.set_workspace_limit(1 / 1024)  # 1 KiB: no padded plane fits
        _public_ok()
    finally:
        nb.set_workspace_limit(old / (1 << 20))
    assert calls == []


def test_non_contiguous_and_half_fall_back(lib, calls):
    # channels-last x: the forward and weight grad (which read x) take the NumPy passes;
    # the input grad reads the contiguous gy and w: native
    _public_ok(x_view=lambda a: np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1))
    assert calls == ["input_grad"] * len(calls) and calls
    calls.clear()
    _public_ok(dtype="float16")
    assert calls == []
    _public_ok()
    assert calls  # the same geometry, contiguous float32: native


def test_cached_build_and_info(lib):
    st = native.status()
    assert st["usable"] and st["reason"] is None and st["compiler"]
    path = st["library"]
    assert os.path.basename(path).startswith("dwconv-") and path.endswith(".so")
    assert os.path.dirname(path).endswith("native") and os.path.isfile(path)
    assert native.library() is lib  # loaded once
    info = gpuconv.backend_info()["backends"]["numpy"]["native_kernels"]
    assert info["usable"] and info["library"] == path
