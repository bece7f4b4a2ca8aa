"""API-level behaviour: the yardstick itself, gradcheck and the comparison helpers,
keyword rules, padding forms, output shapes, chunking under a small workspace."""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref
from gpuconv import testing as gt


# ----------------------------------------------------------------------------- the reference
def loop_conv(x, w, stride, lo, dilation, out, groups):
    """The definition, one multiply-add at a time (tiny sizes only)."""
    N, C = x.shape[:2]
    K, Cg = w.shape[:2]
    Kg = K // groups
    kernel = w.shape[2:]
    y = np.zeros((N, K) + tuple(out))
    for n, k in itertools.product(range(N), range(K)):
        gi = k // Kg
        for o in itertools.product(*[range(p) for p in out]):
            acc = 0.0
            for c in range(Cg):
                for r in itertools.product(*[range(q) for q in kernel]):
                    i = [o[d] * stride[d] + r[d] * dilation[d] - lo[d] for d in range(len(o))]
                    if all(0 <= i[d] < x.shape[2 + d] for d in range(len(o))):
                        acc += x[(n, gi * Cg + c) + tuple(i)] * w[(k, c) + r]
            y[(n, k) + o] = acc
    return y


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_reference_matches_the_definition(nd):
    rng = np.random.default_rng(nd)
    for _ in range(4):
        groups = int(rng.integers(1, 3))
        Cg, Kg = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        kernel = tuple(int(v) for v in rng.integers(1, 4, nd))
        stride = tuple(int(v) for v in rng.integers(1, 3, nd))
        dil = tuple(int(v) for v in rng.integers(1, 3, nd))
        lo = tuple(int(v) for v in rng.integers(0, 3, nd))
        hi = tuple(int(v) for v in rng.integers(0, 3, nd))
        L = tuple(max(1, d * (k - 1) + 1 - a - b) + int(rng.integers(0, 3))
                  for d, k, a, b in zip(dil, kernel, lo, hi))
        x = rng.standard_normal((2, groups * Cg) + L)
        w = rng.standard_normal((groups * Kg, Cg) + kernel)
        kw = dict(stride=stride, padding=tuple(zip(lo, hi)), dilation=dil, groups=groups)
        y = ref.conv(x, w, **kw)
        out = y.shape[2:]
        np.testing.assert_allclose(y, loop_conv(x, w, stride, lo, dil, out, groups),
                                   rtol=1e-12, atol=1e-12)
        # the reference's gradients are the exact adjoints of its forward pass (basis vectors)
        gy = rng.standard_normal(y.shape)
        gx = ref.conv_input_grad(gy, w, x.shape, **kw)
        gw = ref.conv_weight_grad(x, gy, w.shape, **kw)
        for idx in [tuple(int(rng.integers(0, s)) for s in x.shape) for _ in range(3)]:
            e = np.zeros_like(x)
            e[idx] = 1
            assert gx[idx] == pytest.approx(np.vdot(loop_conv(e, w, stride, lo, dil, out, groups),
                                                    gy), rel=1e-12, abs=1e-12)
        for idx in [tuple(int(rng.integers(0, s)) for s in w.shape) for _ in range(3)]:
            e = np.zeros_like(w)
            e[idx] = 1
            assert gw[idx] == pytest.approx(np.vdot(loop_conv(x, e, stride, lo, dil, out, groups),
                                                    gy), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(ref.conv_bias_grad(gy), gy.sum(axis=(0,) + tuple(range(2, gy.ndim))))


# ----------------------------------------------------------------------------- gradcheck
def test_gradcheck_report(backend, to_backend):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 4, 7)), rng.standard_normal((6, 2, 3)), rng.standard_normal(6)
    rep = gt.gradcheck(to_backend(x), to_backend(w), to_backend(b), stride=2, padding=((2, 1),),
                       dilation=2, groups=2, points=5, rng=1)
    assert rep["x"]["checked"] == 5 and rep["weight"]["checked"] == 5 and rep["bias"]["checked"] == 5
    for k in ("x", "weight", "bias"):
        assert 0 <= rep[k]["max_abs_err"] <= rep["atol"]
    assert rep["seed"] == 1
    rep = gt.gradcheck(to_backend(x), to_backend(w), padding="same", groups=2, points=None, rng=2)
    assert "bias" not in rep and rep["x"]["checked"] == x.size


def test_gradcheck_leaves_inputs_alone():
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal((1, 2, 5, 4)).astype(np.float32),
               rng.standard_normal((3, 2, 2, 2)).astype(np.float32), rng.standard_normal(3))
    copies = [a.copy() for a in (x, w, b)]
    gt.gradcheck(x, w, b.astype(np.float32), points=3, rng=0)
    for a, c in zip((x, w, b), copies):
        assert np.array_equal(a, c)


def test_gradcheck_default_grad_out_is_random(monkeypatch):
    seen = []
    real = gpuconv.conv_input_grad

    def spy(gy, *a, **k):
        seen.append(np.array(gy))
        return real(gy, *a, **k)

    monkeypatch.setattr(gpuconv, "conv_input_grad", spy)
    rng = np.random.default_rng(2)
    rep = gt.gradcheck(rng.standard_normal((1, 1, 4)), rng.standard_normal((1, 1, 2)), points=2)
    assert isinstance(rep["seed"], int)
    gy = seen[0]
    assert np.unique(gy).size == gy.size > 1


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_gradcheck_fails_on_a_wrong_gradient(monkeypatch, which):
    name = {"x": "conv_input_grad", "weight": "conv_weight_grad", "bias": "conv_bias_grad"}[which]
    real = getattr(gpuconv, name)

    def wrong(*a, **k):
        g = np.array(real(*a, **k))
        g.reshape(-1)[-1] += 1e-3  # one element off by a little
        return g

    monkeypatch.setattr(gpuconv, name, wrong)
    rng = np.random.default_rng(3)
    with pytest.raises(AssertionError, match=rf"d f / d {which}\[.*analytic .* numeric"):
        gt.gradcheck(rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((2, 2, 2, 2)),
                     rng.standard_normal(2), padding=1, points=None, rng=0)


def test_gradcheck_grad_out_shape_checked():
    with pytest.raises(ValueError, match="grad_out.shape"):
        gt.gradcheck(np.ones((1, 1, 4)), np.ones((1, 1, 2)), grad_out=np.ones((1, 1, 4)))


# ----------------------------------------------------------------------------- tolerance helpers
def test_tolerance_values():
    assert gt.tolerance(np.float64) == 1e-12
    assert gt.tolerance(np.float32) == 1e-5
    assert gt.tolerance(np.float16) == pytest.approx(2 * float(np.finfo(np.float16).eps))
    assert gt.tolerance(ml_dtypes.bfloat16) == pytest.approx(2 * float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps))
    with pytest.raises(TypeError):
        gt.tolerance(np.int32)


def test_assert_close_behaviour():
    e = np.array([[1.0, -2.0], [4.0, 0.5]])
    assert gt.assert_close(e.astype(np.float32), e, np.float32) <= 1e-7
    assert gt.rel_error(e + np.array([[0, 0], [0, 0.04]]), e) == pytest.approx(0.01)
    with pytest.raises(AssertionError, match=r"relative error .* > tolerance.*index \(1, 1\)"):
        gt.assert_close(e + np.array([[0, 0], [0, 0.04]]), e, np.float32, "y")
    with pytest.raises(AssertionError, match="shape"):
        gt.assert_close(e[0], e, np.float64)
    bad = e.copy()
    bad[0, 0] = np.nan
    with pytest.raises(AssertionError):
        gt.assert_close(bad, e, np.float64)
    # NaN / inf in the reference must be matched exactly
    e2 = e.copy()
    e2[0, 1] = np.inf
    gt.assert_close(e2, e2, np.float64)
    with pytest.raises(AssertionError, match="reference is inf"):
        gt.assert_close(e, e2, np.float64)
    # all-zero reference: the error is absolute
    gt.assert_close(np.full(3, 1e-13), np.zeros(3), np.float64)
    with pytest.raises(AssertionError):
        gt.assert_close(np.full(3, 1e-3), np.zeros(3), np.float64)
    # empty arrays compare by shape only
    assert gt.assert_close(np.empty((0, 2)), np.empty((0, 2)), np.float16) == 0.0


def test_half_tolerance_catches_a_missing_tap():
    """The half tolerance is loose, but not loose enough to pass an indexing bug."""
    rng = np.random.default_rng(4)
    for dt in (np.float16, ml_dtypes.bfloat16):
        x = rng.standard_normal((2, 3, 8, 8)).astype(dt)
        w = rng.standard_normal((4, 3, 3, 3)).astype(dt)
        good = gpuconv.conv(x, w, padding=1)
        gt.assert_close(good, ref.conv(x, w, padding=1), dt)
        w_missing = w.copy()
        w_missing[:, :, 2, 2] = 0
        bad = gpuconv.conv(x, w_missing, padding=1)
        with pytest.raises(AssertionError):
            gt.assert_close(bad, ref.conv(x, w, padding=1), dt)


# ----------------------------------------------------------------------------- API rules
def test_keyword_only_arguments():
    x, w = np.ones((1, 1, 5)), np.ones((1, 1, 3))
    with pytest.raises(TypeError):
        gpuconv.conv(x, w, None, 1)
    with pytest.raises(TypeError):
        gpuconv.conv_input_grad(np.ones((1, 1, 3)), w, x.shape, 1)
    with pytest.raises(TypeError):
        gpuconv.conv_transpose(x, w, None, 2)


def test_public_names():
    for name in gpuconv.__all__:
        assert hasattr(gpuconv, name), name
    for name in ("conv", "conv_input_grad", "conv_weight_grad", "conv_bias_grad", "conv_transpose",
                 "conv1d", "conv2d", "conv3d", "conv2d_input_grad", "conv2d_weight_grad",
                 "use_backend", "backend_info", "available_backends"):
        assert name in gpuconv.__all__, name


@pytest.mark.parametrize("L,k,s,d", [(7, 3, 1, 1), (7, 4, 1, 1), (8, 2, 3, 1), (9, 3, 2, 2),
                                     (1, 5, 1, 1), (5, 1, 4, 1), (6, 3, 2, 3)])
def test_same_padding_sizes(L, k, s, d):
    rng = np.random.default_rng(L * k)
    x, w = rng.standard_normal((1, 2, L)), rng.standard_normal((3, 2, k))
    y = gpuconv.conv(x, w, stride=s, dilation=d, padding="same")
    assert y.shape == (1, 3, -(-L // s))
    total = max((y.shape[2] - 1) * s + d * (k - 1) + 1 - L, 0)
    expected = ref.conv(x, w, stride=s, dilation=d, padding=((total // 2, total - total // 2),))
    gt.assert_close(y, expected, np.float64, "same")


def test_padding_forms_agree():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 2))
    expected = ref.conv(x, w, padding=((1, 1), (2, 2)))
    for p in [(1, 2), ((1, 1), (2, 2)), [1, [2, 2]]]:
        gt.assert_close(gpuconv.conv(x, w, padding=p), expected, np.float64, f"padding={p!r}")
    gt.assert_close(gpuconv.conv(x, w, padding=1), ref.conv(x, w, padding=((1, 1), (1, 1))),
                    np.float64, "int")
    gt.assert_close(gpuconv.conv(x, w, padding="valid"), ref.conv(x, w), np.float64, "valid")
    gt.assert_close(gpuconv.conv(x, w, padding="VALID"), ref.conv(x, w), np.float64, "VALID")


def test_one_d_plain_pair_is_lo_hi():
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((1, 1, 6)), rng.standard_normal((1, 1, 3))
    y = gpuconv.conv(x, w, padding=(2, 0))
    gt.assert_close(y, ref.conv(x, w, padding=((2, 0),)), np.float64, "1-d pair")
    assert y.shape == (1, 1, 6)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=(2, 1), groups=2),
                                dict(padding="same", stride=(1, 3))])
def test_conv_output_shape(kw):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((3, 4, 9, 8)), rng.standard_normal((6, 4 // kw.get("groups", 1), 3, 2))
    assert gpuconv.conv_output_shape(x.shape, w.shape, **kw) == gpuconv.conv(x, w, **kw).shape


def test_conv_transpose_is_the_input_gradient():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 3, 3, 2))           # conv: 3 -> 4 channels
    x_shape = (2, 3, 9, 8)
    kw = dict(stride=(2, 3), padding=((1, 0), (0, 1)), dilation=(1, 2))
    y_shape = gpuconv.conv_output_shape(x_shape, w.shape, **kw)
    gy = rng.standard_normal(y_shape)
    expected = ref.conv_input_grad(gy, w, x_shape, **kw)
    op = tuple(L - ((p - 1) * s - a - b + d * (k - 1) + 1)
               for L, p, s, (a, b), d, k in zip(x_shape[2:], y_shape[2:], kw["stride"],
                                                kw["padding"], kw["dilation"], w.shape[2:]))
    y = gpuconv.conv_transpose(gy, w, output_padding=op, **kw)
    gt.assert_close(y, expected, np.float64, "conv_transpose")


def test_results_are_deterministic():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 10, 9)).astype(np.float32)
    gy = rng.standard_normal((3, 6, 8, 7)).astype(np.float32)
    a = gpuconv.conv_weight_grad(x, gy, (6, 4, 3, 3))
    b = gpuconv.conv_weight_grad(x, gy, (6, 4, 3, 3))
    assert a.tobytes() == b.tobytes()


@pytest.fixture
def tiny_workspace():
    old = gpuconv.get_workspace_limit()
    gpuconv.set_workspace_limit(0.002)  # ~2 KiB: forces chunking over images and rows
    try:
        yield
    finally:
        gpuconv.set_workspace_limit(old / (1 << 20))


@pytest.mark.parametrize("groups,Cg,Kg", [(1, 3, 4), (3, 1, 2), (2, 2, 1)])
def test_chunked_cpu_backend_matches_reference(tiny_workspace, groups, Cg, Kg):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, groups * Cg, 11, 9))
    w = rng.standard_normal((groups * Kg, Cg, 3, 2))
    kw = dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), groups=groups)
    y = gpuconv.conv(x, w, backend="numpy", **kw)
    gt.assert_close(y, ref.conv(x, w, **kw), np.float64, "chunked conv")
    gy = rng.standard_normal(y.shape)
    gt.assert_close(gpuconv.conv_input_grad(gy, w, x.shape, backend="numpy", **kw),
                    ref.conv_input_grad(gy, w, x.shape, **kw), np.float64, "chunked input grad")
    gt.assert_close(gpuconv.conv_weight_grad(x, gy, w.shape, backend="numpy", **kw),
                    ref.conv_weight_grad(x, gy, w.shape, **kw), np.float64, "chunked weight grad")


def test_workspace_limit_validation():
    with pytest.raises(ValueError, match="megabytes"):
        gpuconv.set_workspace_limit(0)


# ----------------------------------------------------------------------------- byte order
@pytest.mark.parametrize("dt", [">f8", ">f4", ">f2"])
def test_big_endian_arrays_in_their_precision(backend, dt):
    """FITS data is big-endian: every pass gives the array's precision (converted to
    native byte order once), and the inputs stay as they were."""
    if backend == "cupy":
        pytest.skip("CuPy arrays are always in native byte order")
    rng = np.random.default_rng(7)
    kw = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    x = rng.standard_normal((2, 3, 7, 8)).astype(dt)
    w = rng.standard_normal((4, 3, 3, 2)).astype(dt)
    b = rng.standard_normal(4).astype(dt)
    copies = [a.copy() for a in (x, w, b)]
    native = np.dtype(dt).newbyteorder("=")
    y = gpuconv.conv(x, w, b, **kw)
    assert y.dtype == native and y.dtype.isnative
    gt.assert_close(y, ref.conv(x, w, b, **kw), native, f"conv {dt}")
    gy = rng.standard_normal(y.shape).astype(dt)
    gt.assert_close(gpuconv.conv_input_grad(gy, w, x.shape, **kw),
                    ref.conv_input_grad(gy, w, x.shape, **kw), native, f"input grad {dt}")
    gt.assert_close(gpuconv.conv_weight_grad(x, gy, w.shape, **kw),
                    ref.conv_weight_grad(x, gy, w.shape, **kw), native, f"weight grad {dt}")
    gt.assert_close(gpuconv.conv_bias_grad(gy), ref.conv_bias_grad(gy), native, f"bias grad {dt}",
                    scale=np.abs(gy.astype(np.float64)).sum(axis=(0, 2, 3)).max())
    wt = rng.standard_normal((4, 3, 3, 2)).astype(dt)  # (C_in, C_out, *k)
    gt.assert_close(gpuconv.conv_transpose(gy, wt, stride=(2, 1), padding=1),
                    ref.conv_input_grad(gy, wt, (2, 3, 7, 7), stride=(2, 1), padding=1),
                    native, f"conv_transpose {dt}")
    gt.assert_close(gpuconv.conv2d(x[0], w), ref.conv(x[:1], w)[0], native, f"conv2d {dt}")
    for a, c in zip((x, w, b), copies):
        assert a.dtype == np.dtype(dt)
        np.testing.assert_array_equal(a, c)


def test_mixed_byte_orders_are_named():
    x = np.ones((1, 2, 5, 5), ">f8")
    w = np.ones((3, 2, 3, 3), "<f8")
    with pytest.raises(TypeError, match=r"byte order.*x is big-endian float64.*weight is "
                                        r"little-endian float64"):
        gpuconv.conv(x, w)
    with pytest.raises(TypeError, match=r"x=big-endian float64 \('>f8'\), weight=float32"):
        gpuconv.conv(x, w.astype(np.float32))
