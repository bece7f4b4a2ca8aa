"""One test per error: the exception type and a message that names the argument,
the value received and the sizes involved.  Also: NaN/Inf propagation and N = 0.
"""
from __future__ import annotations

import re
import sys
import types

import ml_dtypes
import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref
from gpuconv import testing as gt

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 5, 5))
W = RNG.standard_normal((6, 4, 3, 3))
GY = RNG.standard_normal((2, 6, 3, 3))


def raises(exc, *fragments):
    """pytest.raises matching every fragment (literally) in the message."""
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc, match=re.compile(pattern, re.S))


# ----------------------------------------------------------------------------- ranks
def test_x_wrong_rank():
    with raises(ValueError, "conv:", "x must have shape", "x.shape=(4, 5, 5)", "2 spatial dims"):
        gpuconv.conv(X[0], W)


def test_weight_wrong_rank():
    with raises(ValueError, "conv:", "weight", "weight.shape=(6, 4, 3, 3, 1, 1)", "6 dims"):
        gpuconv.conv(X, W[..., None, None])


def test_rank_specific_x_wrong_rank():
    with raises(ValueError, "conv2d:", "x must have 3 or 4 dims", "x.shape=(5, 5)"):
        gpuconv.conv2d(X[0, 0], W)


def test_rank_specific_weight_wrong_rank():
    with raises(ValueError, "conv3d:", "weight must have 4 or 5 dims", "weight.shape=(6, 4, 3)"):
        gpuconv.conv3d(X[..., None], W[..., 0])


# ----------------------------------------------------------------------------- channels / groups
def test_channel_mismatch():
    with raises(ValueError, "channel mismatch", "C=4", "C/groups=4", "weight.shape=(6, 3, 3, 3)"):
        gpuconv.conv(X, W[:, :3])


def test_groups_not_dividing_C():
    with raises(ValueError, "groups=3", "does not divide input channels C=4", "x.shape=(2, 4, 5, 5)"):
        gpuconv.conv(X, W[:, :1], groups=3)


def test_groups_not_dividing_K():
    x = RNG.standard_normal((2, 6, 5, 5))
    with raises(ValueError, "groups=3", "does not divide output channels K=4",
                "weight.shape=(4, 2, 3, 3)"):
        gpuconv.conv(x, RNG.standard_normal((4, 2, 3, 3)), groups=3)


def test_groups_below_one():
    with raises(ValueError, "groups=0", ">= 1"):
        gpuconv.conv(X, W, groups=0)


def test_groups_not_an_int():
    with raises(TypeError, "groups must be an integer", "True"):
        gpuconv.conv(X, W, groups=True)


# ----------------------------------------------------------------------------- stride / dilation / padding
@pytest.mark.parametrize("value", [0, -1, (1, 0)])
def test_stride_below_one(value):
    with raises(ValueError, f"stride={value!r}", "must be >= 1"):
        gpuconv.conv(X, W, stride=value)


@pytest.mark.parametrize("value", [0, (0, 1)])
def test_dilation_below_one(value):
    with raises(ValueError, f"dilation={value!r}", "must be >= 1"):
        gpuconv.conv(X, W, dilation=value)


@pytest.mark.parametrize("value", [-1, (0, -2), ((0, 0), (1, -1))])
def test_negative_padding(value):
    with raises(ValueError, f"padding={value!r}", "must not be negative"):
        gpuconv.conv(X, W, padding=value)


def test_wrong_number_of_per_dim_entries():
    with raises(ValueError, "stride=(1, 2, 3)", "3 entries", "expected 1 int or 2"):
        gpuconv.conv(X, W, stride=(1, 2, 3))
    with raises(ValueError, "padding=(1, 1, 1)", "3 entries"):
        gpuconv.conv(X, W, padding=(1, 1, 1))


def test_bad_padding_pair():
    with raises(ValueError, "each pair must be (lo, hi)", "(1, 2, 3)"):
        gpuconv.conv(X, W, padding=((1, 2, 3), (0, 0)))


def test_float_stride():
    with raises(TypeError, "stride must be an integer", "1.5"):
        gpuconv.conv(X, W, stride=1.5)


def test_memoized_geometry_keeps_every_check():
    """A geometry already parsed from plain ints is reused (the same object), but values
    equal to those ints that are not ints are still checked: True == 1 and 2.0 == 2."""
    from gpuconv import _geometry as geo
    g = geo.conv_geometry("conv", X.shape, W.shape, stride=1, groups=1, padding=(1, 1))
    assert geo.conv_geometry("conv", X.shape, W.shape, stride=1, groups=1, padding=(1, 1)) is g
    assert geo.conv_geometry("conv", list(X.shape), W.shape, stride=[1, 1], padding=[1, 1]) == g
    gpuconv.conv(X, W, stride=1, groups=1)
    with raises(TypeError, "groups must be an integer", "True"):
        gpuconv.conv(X, W, groups=True)
    with raises(TypeError, "stride must be an integer", "True"):
        gpuconv.conv(X, W, stride=True)
    gpuconv.conv(X, W, stride=2)
    with raises(TypeError, "stride must be an integer", "2.0"):
        gpuconv.conv(X, W, stride=2.0)
    with raises(TypeError, "stride must be an integer", "2.0"):
        gpuconv.conv(X, W, stride=(2, 2.0))


def test_unknown_padding_string():
    with raises(ValueError, "unknown padding='full'", "'valid'", "'same'"):
        gpuconv.conv(X, W, padding="full")


def test_kernel_larger_than_padded_input():
    with raises(ValueError, "effective kernel size 7", "kernel 7", "padded input size 5",
                "output size would be -1", "weight.shape=(6, 4, 7, 3)"):
        gpuconv.conv(X, RNG.standard_normal((6, 4, 7, 3)))


def test_dilated_kernel_larger_than_padded_input():
    with raises(ValueError, "effective kernel size 9", "dilation 4", "padded input size 7",
                "padding (1, 1)", "spatial dim 1"):
        gpuconv.conv(X, W, dilation=(1, 4), padding=1)


# ----------------------------------------------------------------------------- gradient shapes
def test_input_grad_wrong_input_shape_rank():
    with raises(ValueError, "conv_input_grad", "input_shape=(2, 4, 5)", "2 spatial dims"):
        gpuconv.conv_input_grad(GY, W, (2, 4, 5))


def test_input_grad_input_shape_channels():
    with raises(ValueError, "conv_input_grad", "channel mismatch", "C=3", "weight.shape=(6, 4, 3, 3)"):
        gpuconv.conv_input_grad(GY, W, (2, 3, 5, 5))


def test_input_grad_input_shape_not_ints():
    with raises(TypeError, "conv_input_grad", "input_shape must be a sequence of ints", "'5'"):
        gpuconv.conv_input_grad(GY, W, (2, 4, 5, "5"))


def test_input_grad_grad_out_shape():
    with raises(ValueError, "conv_input_grad", "grad_out has shape (2, 6, 4, 3)",
                "expected (2, 6, 3, 3)", "forward output shape"):
        gpuconv.conv_input_grad(RNG.standard_normal((2, 6, 4, 3)), W, X.shape)


def test_weight_grad_wrong_weight_shape_rank():
    with raises(ValueError, "conv_weight_grad", "weight_shape=(6, 4, 3)", "x.shape=(2, 4, 5, 5)"):
        gpuconv.conv_weight_grad(X, GY, (6, 4, 3))


def test_weight_grad_weight_shape_channels():
    with raises(ValueError, "conv_weight_grad", "channel mismatch", "weight_shape=(6, 3, 3, 3)"):
        gpuconv.conv_weight_grad(X, GY, (6, 3, 3, 3))


def test_weight_grad_grad_out_shape():
    with raises(ValueError, "conv_weight_grad", "grad_out has shape (2, 5, 3, 3)",
                "expected (2, 6, 3, 3)"):
        gpuconv.conv_weight_grad(X, GY[:, :5], W.shape)


def test_grad_out_batch_mismatch():
    with raises(ValueError, "grad_out has shape (1, 6, 3, 3)", "expected (2, 6, 3, 3)"):
        gpuconv.conv_weight_grad(X, GY[:1], W.shape)


def test_rank_specific_grad_shapes():
    with raises(ValueError, "conv2d_input_grad", "input_shape=(4, 5, 5, 1, 1)", "3 (unbatched) or 4"):
        gpuconv.conv2d_input_grad(GY, W, (4, 5, 5, 1, 1))
    with raises(ValueError, "conv2d_weight_grad", "weight_shape=(6, 4)", "3 (shared kernel"):
        gpuconv.conv2d_weight_grad(X, GY, (6, 4))
    with raises(ValueError, "conv2d_input_grad", "grad_out has shape (6, 3, 3)", "expected (2, 6, 3, 3)"):
        gpuconv.conv2d_input_grad(GY[0], W, X.shape)


def test_bias_grad_needs_spatial_dims():
    with raises(ValueError, "conv_bias_grad", "grad_out.shape=(2, 6)"):
        gpuconv.conv_bias_grad(GY[:, :, 0, 0])


# ----------------------------------------------------------------------------- bias
@pytest.mark.parametrize("shape", [(5,), (6, 1), ()])
def test_bias_wrong_shape(shape):
    b = RNG.standard_normal(shape)
    with raises(ValueError, "bias must have shape (6,)", "K=6", "bias.shape="):
        gpuconv.conv(X, W, b)


# ----------------------------------------------------------------------------- conv_transpose
def test_transpose_output_padding_too_large():
    with raises(ValueError, "conv_transpose", "output_padding=2", "stride=(2, 2)", "dilation=(1, 1)"):
        gpuconv.conv_transpose(X, RNG.standard_normal((4, 3, 3, 3)), stride=2, output_padding=2)


def test_transpose_output_padding_equal_stride_and_dilation():
    with raises(ValueError, "output_padding=(0, 1)", "smaller than stride"):
        gpuconv.conv_transpose(X, RNG.standard_normal((4, 3, 3, 3)), output_padding=(0, 1))


def test_transpose_output_padding_below_dilation_is_allowed():
    w = RNG.standard_normal((4, 3, 3, 3))
    y = gpuconv.conv_transpose(X, w, stride=2, dilation=3, output_padding=2)
    assert y.shape == (2, 3, 4 * 2 + 6 + 2 + 1, 4 * 2 + 6 + 2 + 1)


def test_transpose_channel_mismatch():
    with raises(ValueError, "conv_transpose", "C_in=4", "weight.shape[0]=5"):
        gpuconv.conv_transpose(X, RNG.standard_normal((5, 3, 3, 3)))


def test_transpose_groups():
    with raises(ValueError, "conv_transpose", "groups=3", "C_in=4"):
        gpuconv.conv_transpose(X, W[:4, :1], groups=3)


def test_transpose_string_padding():
    with raises(ValueError, "conv_transpose", "padding='same'", "not supported"):
        gpuconv.conv_transpose(X, RNG.standard_normal((4, 3, 3, 3)), padding="same")


def test_transpose_bias_length():
    with raises(ValueError, "conv_transpose", "bias must have shape (3,)", "bias.shape=(4,)"):
        gpuconv.conv_transpose(X, RNG.standard_normal((4, 3, 3, 3)), RNG.standard_normal(4))


def test_transpose_nonpositive_output():
    with raises(ValueError, "conv_transpose", "output size", "not positive", "padding=3"):
        gpuconv.conv_transpose(X[:, :, :1, :1], RNG.standard_normal((4, 3, 2, 2)), padding=3)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                                   np.complex128, object, ml_dtypes.float8_e4m3fn])
def test_unsupported_dtype(dtype):
    name = np.dtype(dtype).name
    with raises(TypeError, "conv:", f"x has dtype {name}", "float16", "bfloat16", "float32", "float64"):
        gpuconv.conv(X.astype(dtype), W.astype(dtype))


def test_unsupported_dtype_names_the_argument():
    with raises(TypeError, "conv_weight_grad", "grad_out has dtype int64"):
        gpuconv.conv_weight_grad(X, GY.astype(np.int64), W.shape)


@pytest.mark.parametrize("fn, args, names", [
    (gpuconv.conv, (X.astype(np.float32), W), ("x=float32", "weight=float64")),
    (gpuconv.conv, (X, W, np.ones(6, np.float16)), ("bias=float16",)),
    (gpuconv.conv_input_grad, (GY, W.astype(ml_dtypes.bfloat16), X.shape),
     ("grad_out=float64", "weight=bfloat16")),
    (gpuconv.conv_weight_grad, (X.astype(np.float16), GY, W.shape), ("x=float16", "grad_out=float64")),
])
def test_mismatched_dtypes(fn, args, names):
    with raises(TypeError, "all arrays must share one dtype", *names):
        fn(*args)


# ----------------------------------------------------------------------------- array types
@pytest.mark.parametrize("fn, args, name", [
    (gpuconv.conv, (X.tolist(), W), "x"),
    (gpuconv.conv, (X, W.tolist()), "weight"),
    (gpuconv.conv, (X, W, [0.0] * 6), "bias"),
    (gpuconv.conv2d, (X[0].tolist(), W), "x"),
    (gpuconv.conv_input_grad, (GY.tolist(), W, X.shape), "grad_out"),
    (gpuconv.conv_weight_grad, (X, 1.0, W.shape), "grad_out"),
    (gpuconv.conv_transpose, (X.tolist(), W[:4]), "x"),
])
def test_non_array_inputs(fn, args, name):
    with raises(TypeError, f"{name} must be a numpy.ndarray or cupy.ndarray", "got builtins."):
        fn(*args)


def _fake_cupy_array(shape, dtype):
    """A real ``cupy.ndarray`` object made without a CUDA device: it points at device
    address 0 through UnownedMemory, so it must never be read -- gpuconv rejects
    the call before any data is touched.  None where cupy cannot build one."""
    try:
        import cupy
        mem = cupy.cuda.UnownedMemory(0, int(np.prod(shape)) * np.dtype(dtype).itemsize, None, 0)
        return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
    except Exception:
        return None


@pytest.fixture
def cupy_like():
    """(make(shape, dtype) -> a 'cupy' array, description).

    A genuine cupy.ndarray when cupy imports (no device needed, see
    _fake_cupy_array); otherwise a stand-in 'cupy' module registered through
    sys.modules, whose ndarray subclass numpy.ndarray's interface but not its
    type: gpuconv recognises cupy arrays through sys.modules, so the namespace
    check is exercised all the same.
    """
    if _fake_cupy_array((1,), np.float64) is not None:
        yield _fake_cupy_array, "real cupy.ndarray"
        return

    class _Device:  # mimics cupy.cuda.Device: the namespace check reads .device.id
        id = 0

    class ndarray:  # noqa: N801 -- mimics cupy.ndarray
        device = _Device()

        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    fake = types.ModuleType("cupy")
    fake.ndarray = ndarray
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake
    try:
        yield ndarray, "sys.modules stand-in"
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved


@pytest.mark.parametrize("fn, argnames", [
    (gpuconv.conv, ("x", "weight")),
    (gpuconv.conv_input_grad, ("grad_out", "weight")),
    (gpuconv.conv_weight_grad, ("x", "grad_out")),
    (gpuconv.conv_transpose, ("x", "weight")),
    (gpuconv.conv2d, ("x", "weight")),
])
def test_numpy_mixed_with_cupy(cupy_like, fn, argnames):
    make, _ = cupy_like
    shapes = {"x": X.shape, "weight": W.shape if fn is not gpuconv.conv_transpose else (4, 3, 3, 3),
              "grad_out": GY.shape}
    host = {"x": X, "weight": W if fn is not gpuconv.conv_transpose else W[:4, :3],
            "grad_out": GY}
    extra = {gpuconv.conv_input_grad: (X.shape,), gpuconv.conv_weight_grad: (W.shape,)}.get(fn, ())
    a, b = argnames
    args = (make(shapes[a], np.float64), host[b]) + extra
    with raises(TypeError, "numpy and cupy arrays mixed", f"{a} is cupy", f"{b} is numpy",
                "never copies"):
        fn(*args)


def test_bias_on_other_device(cupy_like):
    make, _ = cupy_like
    with raises(TypeError, "mixed", "bias is cupy"):
        gpuconv.conv(X, W, make((6,), np.float64))


def test_cupy_arrays_on_a_host_backend(cupy_like):
    make, _ = cupy_like
    x, w = make(X.shape, np.float64), make(W.shape, np.float64)
    with raises(TypeError, "backend 'numpy' runs on host (numpy) arrays", "cupy arrays"):
        gpuconv.conv(x, w, backend="numpy")


def test_cupy_arrays_without_a_device(cupy_like):
    make, kind = cupy_like
    if gpuconv.backend_info()["backends"]["cupy"]["usable"]:
        pytest.skip("a CUDA device works here")
    if kind != "real cupy.ndarray":
        pytest.skip("needs cupy installed")
    with raises(gpuconv.BackendUnavailableError, "'cupy' cannot run here"):
        gpuconv.conv(make(X.shape, np.float64), make(W.shape, np.float64))


# ----------------------------------------------------------------------------- backend names
def test_unknown_backend_argument():
    with raises(ValueError, "unknown backend 'gpu'", "numpy", "cupy", "cudasim"):
        gpuconv.conv(X, W, backend="gpu")


def test_unknown_backend_context():
    with raises(ValueError, "use_backend", "unknown backend 'bogus'"):
        with gpuconv.use_backend("bogus"):
            pass


# ----------------------------------------------------------------------------- seed forms
def test_shared_kernel_with_groups():
    with raises(ValueError, "conv2d", "shared kernel", "groups must be 1", "groups=2"):
        gpuconv.conv2d(X, W[:, 0], groups=2)
    with raises(ValueError, "conv2d_weight_grad", "groups must be 1", "groups=2"):
        gpuconv.conv2d_weight_grad(X, GY, (6, 3, 3), groups=2)
    with raises(ValueError, "conv2d_input_grad", "groups must be 1", "groups=2"):
        gpuconv.conv2d_input_grad(GY, W[:, 0], X.shape, groups=2)


def test_generic_conv_rejects_seed_forms():
    with raises(ValueError, "conv:", "x.shape=(4, 5, 5)"):
        gpuconv.conv(X[0], W)
    with raises(ValueError, "conv:", "weight.shape=(6, 3, 3)"):
        gpuconv.conv(X, W[:, 0])


# ----------------------------------------------------------------------------- NaN / Inf, N = 0
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_nan_and_inf_propagate(backend, to_backend, dtype):
    x = RNG.standard_normal((1, 2, 6, 6)).astype(dtype)
    w = RNG.standard_normal((3, 2, 3, 3)).astype(dtype)
    x[0, 0, 0, 0] = np.nan     # corner: with padding, read only by outputs (0..1, 0..1)
    x[0, 1, 4, 4] = np.inf
    y = gpuconv.conv(to_backend(x), to_backend(w), padding=1)
    expected = ref.conv(x.astype(np.float64), w.astype(np.float64), padding=1)
    nan = np.zeros((6, 6), bool)
    nan[:2, :2] = True
    assert (np.isnan(expected[0]) == nan).all()          # the reference itself masks padding
    assert np.isinf(expected[0, :, 3:6, 3:6]).all()
    gt.assert_close(y, expected, dtype, "conv with NaN/Inf")  # same NaN/Inf pattern, rest close
    # The NaN in grad_out sits at an interior output position: every tap of its
    # window reads real input.  (At a border position some weight-gradient terms
    # would be NaN * padding; whether those are NaN (im2col multiplies the zero)
    # or absent (kernels skip the padding) is implementation-defined, so it is
    # not pinned here.)
    gy = RNG.standard_normal(expected.shape).astype(dtype)
    gy[0, 1, 2, 2] = np.nan
    gx = gpuconv.conv_input_grad(to_backend(gy), to_backend(w), x.shape, padding=1)
    gx_ref = ref.conv_input_grad(gy.astype(np.float64), w.astype(np.float64), x.shape, padding=1)
    nan = np.zeros((6, 6), bool)
    nan[1:4, 1:4] = True
    assert (np.isnan(gx_ref[0]) == nan).all()
    gt.assert_close(gx, gx_ref, dtype, "input grad with NaN")
    gw = gpuconv.conv_weight_grad(to_backend(x), to_backend(gy), w.shape, padding=1)
    gw_ref = ref.conv_weight_grad(x.astype(np.float64), gy.astype(np.float64), w.shape, padding=1)
    assert np.isnan(gw_ref[1]).all()  # grad_out channel 1 holds a NaN read by every tap
    assert np.isfinite(gw_ref[0, 0, 2, 2])  # x[0,0,0,0] is never read by tap (2,2)
    gt.assert_close(gw, gw_ref, dtype, "weight grad with NaN/Inf")


def test_empty_batch(backend, to_backend, array_type):
    x = to_backend(np.empty((0, 4, 5, 5)))
    w = to_backend(W)
    b = to_backend(RNG.standard_normal(6))
    gy = to_backend(np.empty((0, 6, 2, 3)))
    kw = dict(stride=(2, 1), padding=((0, 0), (0, 0)), dilation=(1, 2))
    y = gpuconv.conv(x, w, b, **kw)
    assert isinstance(y, array_type) and y.shape == (0, 6, 2, 1) and y.dtype == np.float64
    kw = dict(stride=(2, 1), padding=((0, 0), (0, 0)))
    gx = gpuconv.conv_input_grad(gy, w, (0, 4, 5, 5), **kw)
    assert gx.shape == (0, 4, 5, 5) and isinstance(gx, array_type)
    gw = gpuconv.conv_weight_grad(x, gy, W.shape, **kw)
    assert gw.shape == W.shape and gw.dtype == np.float64
    assert np.array_equal(gt.to_numpy(gw), np.zeros(W.shape))
    gb = gpuconv.conv_bias_grad(gy)
    assert gb.shape == (6,) and np.array_equal(gt.to_numpy(gb), np.zeros(6))
    yt = gpuconv.conv_transpose(to_backend(np.empty((0, 6, 2, 3))), w, stride=2)
    assert yt.shape == (0, 4, 5, 7)
    # seed forms
    gk = gpuconv.conv2d_weight_grad(x, gy, (6, 3, 3), **kw)
    assert gk.shape == (6, 3, 3) and np.array_equal(gt.to_numpy(gk), np.zeros((6, 3, 3)))


def test_masked_arrays_are_refused_not_silently_unmasked():
    x = np.ma.masked_array(np.ones((1, 2, 5, 5)), mask=False)
    with pytest.raises(TypeError, match=r"conv: x is a numpy.ma.MaskedArray"):
        gpuconv.conv(x, np.ones((3, 2, 3, 3)))


# ----------------------------------------------------------------------------- issue 9
@pytest.mark.parametrize("xs, ws", [((-1, 4, 7, 7), (6, 4, 3, 3)), ((1, 4, 7, 7), (-6, 4, 3, 3)),
                                    ((1, -4, 7, 7), (6, -4, 3, 3)), ((1, 4, -7, 7), (6, 4, 3, 3)),
                                    ((1, 4, 7, 7), (6, 4, 3, -3))])
def test_negative_sizes_in_conv_output_shape(xs, ws):
    with raises(ValueError, "conv_output_shape", "negative size"):
        gpuconv.conv_output_shape(xs, ws)


@pytest.mark.parametrize("xs, ws", [((-1, 4, 5, 5), (4, 2, 3, 3)), ((1, 4, 5, 5), (4, -2, 3, 3)),
                                    ((1, -4, 5, 5), (-4, 2, 3, 3))])
def test_negative_sizes_in_conv_transpose_output_shape(xs, ws):
    with raises(ValueError, "conv_transpose_output_shape", "negative size"):
        gpuconv.conv_transpose_output_shape(xs, ws)


def test_negative_input_shape_in_a_gradient():
    with raises(ValueError, "conv_input_grad", "input_shape", "negative size"):
        gpuconv.conv_input_grad(GY, W, (-2, 4, 5, 5))


_GX_SHAPE = X.shape
_NONE_CALLS = [
    ("conv", "x", lambda: gpuconv.conv(None, W)),
    ("conv", "weight", lambda: gpuconv.conv(X, None)),
    ("conv2d", "x", lambda: gpuconv.conv2d(None, W)),
    ("conv2d", "weight", lambda: gpuconv.conv2d(X, None)),
    ("conv_input_grad", "grad_out", lambda: gpuconv.conv_input_grad(None, W, _GX_SHAPE)),
    ("conv_input_grad", "weight", lambda: gpuconv.conv_input_grad(GY, None, _GX_SHAPE)),
    ("conv2d_input_grad", "grad_out", lambda: gpuconv.conv2d_input_grad(None, W, _GX_SHAPE)),
    ("conv_weight_grad", "x", lambda: gpuconv.conv_weight_grad(None, GY, W.shape)),
    ("conv_weight_grad", "grad_out", lambda: gpuconv.conv_weight_grad(X, None, W.shape)),
    ("conv2d_weight_grad", "x", lambda: gpuconv.conv2d_weight_grad(None, GY, W.shape)),
    ("conv_bias_grad", "grad_out", lambda: gpuconv.conv_bias_grad(None)),
    ("conv_transpose", "x", lambda: gpuconv.conv_transpose(None, W.transpose(1, 0, 2, 3))),
    ("conv_transpose", "weight", lambda: gpuconv.conv_transpose(GY, None)),
    ("conv_transpose2d", "x", lambda: gpuconv.conv_transpose2d(None, W)),
    ("conv_transpose_input_grad", "grad_out",
     lambda: gpuconv.conv_transpose_input_grad(None, W, GY.shape)),
    ("conv_transpose_weight_grad", "x",
     lambda: gpuconv.conv_transpose_weight_grad(None, X, W.shape)),
]


@pytest.mark.parametrize("op, name, call", _NONE_CALLS, ids=[f"{o}-{n}" for o, n, _ in _NONE_CALLS])
def test_none_array_argument(op, name, call):
    with raises(TypeError, f"{op}: {name} is None"):
        call()


# huge integers: a valid geometry works whatever the size of an irrelevant stride or
# dilation; an impossible size is a ValueError naming the argument and the size needed
def test_huge_stride_is_a_valid_geometry(backend, to_backend):
    x = RNG.standard_normal((2, 4, 5, 6))
    w = RNG.standard_normal((3, 4, 3, 3))
    # one output position per dim: y[n, k] = sum over the leading 3x3 window
    want = np.einsum("ncij,kcij->nk", x[:, :, :3, :3], w)[:, :, None, None]
    for stride in (2**70, (2**70, 2**64), (2**63, 10**30)):
        y = gt.to_numpy(gpuconv.conv(to_backend(x), to_backend(w), stride=stride))
        assert y.shape == (2, 3, 1, 1)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    # one huge and one ordinary stride: the ordinary one still counts
    y = gt.to_numpy(gpuconv.conv(to_backend(x), to_backend(w), stride=(2**70, 2)))
    np.testing.assert_allclose(y, ref.conv(x[:, :, :3], w, stride=(1, 2)), rtol=1e-12, atol=1e-12)
    gx = gt.to_numpy(gpuconv.conv_input_grad(to_backend(GY[:, :3, :1, :1]), to_backend(w),
                                             x.shape, stride=2**70))
    np.testing.assert_allclose(gx, ref.conv_input_grad(GY[:, :3, :1, :1], w, x.shape, stride=9),
                               rtol=1e-12, atol=1e-12)
    # a 1-tap kernel: any dilation is the same
    w1 = RNG.standard_normal((3, 4, 1, 3))
    y = gt.to_numpy(gpuconv.conv(to_backend(x), to_backend(w1), dilation=(2**70, 1)))
    np.testing.assert_allclose(y, ref.conv(x, w1), rtol=1e-12, atol=1e-12)


def test_impossible_padding_names_padding_and_the_size(backend, to_backend):
    x, w = to_backend(X), to_backend(W)
    with raises(ValueError, "conv:", "padding=1000000000", "(2, 6, 2000000003, 2000000003)",
                "bytes"):
        gpuconv.conv(x, w, padding=10**9)
    with raises(ValueError, "conv:", "padding=3000000000", "6000000005", "2**31 - 1"):
        gpuconv.conv(x, w, padding=3 * 10**9, stride=10**10)
    with raises(ValueError, "conv_input_grad:", "padding=1000000000", "bytes"):
        gpuconv.conv_input_grad(to_backend(GY), w, X.shape, padding=10**9)
    with raises(ValueError, "conv_transpose:", "stride=1180591620717411303424", "2**31 - 1"):
        gpuconv.conv_transpose(to_backend(GY), w, stride=2**70)


# ----------------------------------------------------------------------------- knobs
@pytest.fixture
def fresh_workspace_setting():
    from gpuconv._cpu import workspace
    saved = workspace._workspace
    workspace._workspace = None
    try:
        yield workspace
    finally:
        workspace._workspace = saved


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-3", "abc", "1e300"])
def test_workspace_env_rejects(monkeypatch, fresh_workspace_setting, value):
    monkeypatch.setenv("GPUCONV_WORKSPACE_MB", value)
    with raises(ValueError, "GPUCONV_WORKSPACE_MB", repr(value)):
        gpuconv.get_workspace_limit()


def test_workspace_env_accepts(monkeypatch, fresh_workspace_setting):
    monkeypatch.setenv("GPUCONV_WORKSPACE_MB", " 1.5 ")
    assert gpuconv.get_workspace_limit() == int(1.5 * 2**20)


@pytest.mark.parametrize("value, exc", [(float("inf"), ValueError), (float("nan"), ValueError),
                                        (1e300, ValueError), (-1, ValueError),
                                        (True, TypeError), (False, TypeError),
                                        ("abc", TypeError), ("64", TypeError),
                                        (None, TypeError), ([1], TypeError)])
def test_set_workspace_limit_rejects(fresh_workspace_setting, value, exc):
    before = gpuconv.get_workspace_limit()
    with raises(exc, "set_workspace_limit", "megabytes", repr(value)):
        gpuconv.set_workspace_limit(value)
    assert gpuconv.get_workspace_limit() == before  # unchanged


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5"])
def test_num_threads_env_rejects(monkeypatch, value):
    from gpuconv._cpu.parallel import get_num_threads
    monkeypatch.setenv("GPUCONV_NUM_THREADS", value)
    with raises(ValueError, "GPUCONV_NUM_THREADS", repr(value)):
        get_num_threads()
    with raises(ValueError, "GPUCONV_NUM_THREADS", repr(value)):  # and at the call
        gpuconv.conv(X, W, backend="numpy")
