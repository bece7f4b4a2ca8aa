"""gpuconv.nn layers: forward and backward against the float64 reference.

The expected values come from :mod:`gpuconv.reference` (naive, independent of
the backends), never from the layers' own code path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpuconv
from gpuconv import nn
from gpuconv import reference as ref

TOL = {"float64": 1e-12, "float32": 1e-5}


def _rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _host(a):
    if isinstance(a, np.ndarray):
        return a
    import cupy
    return cupy.asnumpy(a)


def _place(layer, backend, *arrays):
    """Put the layer and arrays where `backend` runs (cupy arrays for 'cupy')."""
    if backend == "cupy":
        import cupy
        layer.to("cupy")
        return [cupy.asarray(a) for a in arrays]
    return list(arrays)


CONV_CASES = [
    # cls, args, kwargs, input spatial
    (nn.Conv1d, (3, 4, 3), dict(), (11,)),
    (nn.Conv1d, (4, 6, 4), dict(stride=2, padding=(1,), dilation=2, groups=2), (13,)),
    (nn.Conv1d, (2, 3, 4), dict(padding="same", bias=False), (9,)),
    (nn.Conv2d, (3, 5, 3), dict(padding=1), (7, 6)),
    (nn.Conv2d, (4, 4, (3, 2)), dict(stride=(2, 1), padding="same", dilation=(1, 2), groups=4),
     (8, 7)),
    (nn.Conv2d, (6, 4, 3), dict(stride=2, padding=((1, 0), (0, 2)), groups=2), (9, 8)),
    (nn.Conv2d, (2, 3, 3), dict(padding="valid", dilation=2), (8, 9)),
    (nn.Conv3d, (2, 4, 3), dict(padding=1, stride=(1, 2, 1)), (5, 6, 4)),
    (nn.Conv3d, (4, 2, (2, 3, 1)), dict(groups=2, padding="same", bias=False), (4, 5, 3)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls,args,kwargs,spatial", CONV_CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CONV_CASES)])
def test_conv_layer_matches_reference(backend, cls, args, kwargs, spatial, dtype):
    rng = np.random.default_rng(len(spatial) * 100 + args[0])
    layer = cls(*args, **kwargs, dtype=dtype, seed=3)
    x = rng.standard_normal((2, args[0]) + spatial).astype(dtype)
    w64 = layer.weight.astype(np.float64)
    b64 = None if layer.bias is None else layer.bias.astype(np.float64)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
              groups=layer.groups)
    y_ref = ref.conv(x, w64, b64, **kw)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    xd, gyd = _place(layer, backend, x, gy)

    y = layer(xd)
    gx = layer.backward(gyd)

    tol = TOL[dtype]
    assert type(y) is type(xd) and y.dtype == np.dtype(dtype)
    assert _rel(_host(y), y_ref) < tol
    assert _rel(_host(gx), ref.conv_input_grad(gy, w64, x.shape, **kw)) < tol
    assert layer.weight_grad.shape == layer.weight.shape
    assert _rel(_host(layer.weight_grad), ref.conv_weight_grad(x, gy, w64.shape, **kw)) < tol
    if layer.bias is None:
        assert layer.bias_grad is None
    else:
        assert _rel(_host(layer.bias_grad), ref.conv_bias_grad(gy)) < tol


TRANSPOSE_CASES = [
    ((4, 3, 3), dict(stride=2, padding=1, output_padding=1), (5, 4)),
    ((4, 6, (2, 3)), dict(stride=(1, 2), padding=(0, 1), groups=2), (4, 5)),
    ((2, 2, 3), dict(stride=1, dilation=2, padding=((1, 0), (2, 1)), bias=False), (5, 5)),
    # output_padding >= stride (allowed because < dilation): extra trailing outputs
    ((3, 2, 3), dict(stride=1, dilation=2, output_padding=1), (4, 3)),
]


@pytest.mark.parametrize("args,kwargs,spatial", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_reference(backend, args, kwargs, spatial):
    rng = np.random.default_rng(7)
    layer = nn.ConvTranspose2d(*args, **kwargs, dtype=np.float64, seed=5)
    x = rng.standard_normal((2, args[0]) + spatial)
    w = layer.weight
    b = layer.bias
    # conv_transpose is the input gradient of conv(z, w), z: (N, C_out, *out)
    pad = layer.padding
    pairs = tuple(p if isinstance(p, tuple) else (p, p) for p in pad)
    out = tuple((l - 1) * s - lo - hi + d * (k - 1) + o + 1 for l, s, (lo, hi), d, k, o in
                zip(spatial, layer.stride, pairs, layer.dilation, layer.kernel_size,
                    layer.output_padding))
    z_shape = (2, layer.out_channels) + out
    kw = dict(stride=layer.stride, padding=pairs, dilation=layer.dilation, groups=layer.groups)
    g = ref.geometry(z_shape, w.shape, **kw)
    # x feeds the first len(spatial) positions of conv's output grid
    x_full = np.zeros(g.y_shape)
    x_full[(slice(None), slice(None)) + tuple(slice(0, l) for l in spatial)] = x
    y_ref = ref.conv_input_grad(x_full, w, z_shape, **kw)
    if b is not None:
        y_ref = y_ref + b.reshape(1, -1, 1, 1)
    gy = rng.standard_normal(z_shape)
    gx_ref = ref.conv(gy, w, **kw)[(slice(None), slice(None)) + tuple(slice(0, l) for l in spatial)]
    gw_ref = ref.conv_weight_grad(gy, x_full, w.shape, **kw)
    xd, gyd = _place(layer, backend, x, gy)

    y = layer(xd)
    gx = layer.backward(gyd)

    assert _rel(_host(y), y_ref) < 1e-12
    assert _rel(_host(gx), gx_ref) < 1e-12
    assert _rel(_host(layer.weight_grad), gw_ref) < 1e-12
    if b is not None:
        assert _rel(_host(layer.bias_grad), gy.sum(axis=(0, 2, 3))) < 1e-12


def test_gradients_agree_with_finite_differences():
    """An identity-free check: d/dx and d/dw of <layer(x), g> by central differences."""
    rng = np.random.default_rng(11)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=np.float64, seed=1)
    x = rng.standard_normal((1, 2, 5, 5))
    g = rng.standard_normal(layer(x).shape)
    gx = layer.backward(g)
    f = lambda: float(np.sum(layer(x) * g))  # noqa: E731
    h = 1e-6
    for idx in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 1, 4, 4)]:
        x[idx] += h
        up = f()
        x[idx] -= 2 * h
        dn = f()
        x[idx] += h
        assert abs((up - dn) / (2 * h) - gx[idx]) < 1e-6
    gw = layer.weight_grad.copy()
    for idx in [(0, 0, 0, 0), (2, 1, 1, 2)]:
        layer.weight[idx] += h
        up = f()
        layer.weight[idx] -= 2 * h
        dn = f()
        layer.weight[idx] += h
        assert abs((up - dn) / (2 * h) - gw[idx]) < 1e-6


def test_unbatched_input_and_input_grad_false():
    rng = np.random.default_rng(0)
    layer = nn.Conv1d(2, 3, 3, padding=1, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 10))
    y = layer(x)
    assert y.shape == (3, 10)
    np.testing.assert_allclose(y, ref.conv(x[None], layer.weight, layer.bias, padding=1)[0],
                               rtol=0, atol=1e-12)
    gy = rng.standard_normal(y.shape)
    gx = layer.backward(gy)
    assert gx.shape == x.shape
    assert layer.backward(gy, input_grad=False) is None
    np.testing.assert_allclose(layer.weight_grad,
                               ref.conv_weight_grad(x[None], gy[None], layer.weight.shape,
                                                    padding=1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("cls,args,fan_in", [
    (nn.Conv1d, (4, 8, 5), 4 * 5),
    (nn.Conv2d, (6, 9, (3, 2), 1, 0, 1, 3), 2 * 3 * 2),          # groups=3
    (nn.Conv3d, (2, 4, 3), 2 * 27),
    (nn.ConvTranspose2d, (6, 4, 3), 4 * 9),                       # torch: weight.shape[1]*k
])
def test_pytorch_style_init(cls, args, fan_in):
    layer = cls(*args, seed=0)
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.dtype == np.float32
        assert np.all(np.abs(p) <= bound * (1 + 1e-6))
        assert np.std(p) > 0
    assert np.max(np.abs(layer.weight)) > 0.7 * bound      # uses the whole range
    same = cls(*args, seed=0)
    np.testing.assert_array_equal(same.weight, layer.weight)
    other = cls(*args, seed=1)
    assert not np.array_equal(other.weight, layer.weight)
    from_rng = cls(*args, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(from_rng.weight, layer.weight)


def test_weight_shapes_follow_torch():
    assert nn.Conv2d(6, 8, 3, groups=2).weight.shape == (8, 3, 3, 3)
    assert nn.ConvTranspose2d(6, 8, 3, groups=2).weight.shape == (6, 4, 3, 3)
    assert nn.Conv1d(2, 5, 4, bias=False).bias is None
    assert nn.Conv2d(2, 2, 3, dtype="float64").dtype == np.float64
    assert nn.Conv2d(2, 2, 3, dtype=np.float16).weight.dtype == np.float16


def test_bfloat16_layer():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = nn.Conv2d(2, 3, 3, padding=1, dtype="bfloat16", seed=0)
    assert layer.weight.dtype == ml_dtypes.bfloat16
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(ml_dtypes.bfloat16)
    y = layer(x)
    y_ref = ref.conv(x, layer.weight, layer.bias, padding=1)
    assert _rel(y, y_ref) < 2 * 2.0 ** -7


# ----------------------------------------------------------------------------- errors, .to()
def test_backward_before_forward_raises():
    layer = nn.Conv2d(2, 3, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 3, 4, 4), np.float32))
    layer(np.ones((1, 2, 6, 6), np.float32))
    layer.to("numpy", np.float64)           # moving/casting forgets the saved input
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 3, 4, 4)))


def test_input_errors_are_clear():
    layer = nn.Conv2d(2, 3, 3)
    with pytest.raises(TypeError, match="float32"):
        layer(np.ones((1, 2, 6, 6)))              # float64 data, float32 layer
    with pytest.raises(TypeError, match="numpy.ndarray or cupy.ndarray"):
        layer([[1.0]])
    with pytest.raises(ValueError, match="spatial"):
        layer(np.ones((6, 6), np.float32))
    with pytest.raises(ValueError, match="channel"):
        layer(np.ones((1, 5, 6, 6), np.float32))
    layer(np.ones((1, 2, 6, 6), np.float32))
    with pytest.raises(ValueError, match="grad_out"):
        layer.backward(np.ones((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(TypeError, match="seed or rng"):
        nn.Conv2d(3, 4, 3, seed=1, rng=np.random.default_rng())
    with pytest.raises(ValueError, match="unknown device"):
        layer.to("tpu")
    with pytest.raises(ValueError, match="string padding"):
        nn.ConvTranspose2d(2, 2, 3, padding="same")


def test_to_dtype_round_trip_keeps_values():
    layer = nn.Conv2d(3, 4, 3, seed=2)
    w0, b0 = layer.weight.copy(), layer.bias.copy()
    assert layer.to(np.float64) is layer
    assert layer.weight.dtype == np.float64 and layer.bias.dtype == np.float64
    layer.to("numpy", "float32")
    np.testing.assert_array_equal(layer.weight, w0)
    np.testing.assert_array_equal(layer.bias, b0)
    assert layer.device == "numpy"
    assert layer.to("cpu") is layer and layer.device == "numpy"


def test_to_cupy_without_gpu_says_why():
    if "cupy" in gpuconv.available_backends():
        pytest.skip("a GPU is usable here")
    layer = nn.Conv2d(3, 4, 3)
    with pytest.raises(gpuconv.BackendUnavailableError, match="cupy"):
        layer.to("cupy")
    assert layer.device == "numpy" and isinstance(layer.weight, np.ndarray)


@pytest.mark.gpu
def test_to_cupy_round_trip_and_gpu_gradients():
    import cupy
    rng = np.random.default_rng(4)
    layer = nn.Conv2d(3, 4, 3, padding=1, dtype=np.float64, seed=2)
    w0 = layer.weight.copy()
    x = rng.standard_normal((2, 3, 6, 6))
    gy = rng.standard_normal((2, 4, 6, 6))
    layer.to("cupy")
    assert isinstance(layer.weight, cupy.ndarray) and layer.device == "cupy"
    with pytest.raises(TypeError, match="layer.to"):
        layer(x)                                    # numpy data, cupy layer
    layer(cupy.asarray(x))
    gx = layer.backward(cupy.asarray(gy))
    assert isinstance(gx, cupy.ndarray) and isinstance(layer.weight_grad, cupy.ndarray)
    assert _rel(cupy.asnumpy(gx), ref.conv_input_grad(gy, w0, x.shape, padding=1)) < 1e-12
    layer.to("numpy")
    assert isinstance(layer.weight, np.ndarray) and isinstance(layer.weight_grad, np.ndarray)
    np.testing.assert_array_equal(layer.weight, w0)
    assert _rel(layer.weight_grad, ref.conv_weight_grad(x, gy, w0.shape, padding=1)) < 1e-12


def test_docstring_examples():
    import doctest
    res = doctest.testmod(nn, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("cls,args,kwargs,spatial", [
    (nn.ConvTranspose1d, (4, 6, 3), dict(stride=3, padding=2, output_padding=1, groups=2), (6,)),
    (nn.ConvTranspose1d, (3, 2, 2), dict(dilation=3, output_padding=2, bias=False), (5,)),
    (nn.ConvTranspose3d, (2, 3, (2, 3, 2)), dict(stride=(1, 2, 2), padding=(0, 1, 0)), (3, 3, 4)),
])
def test_conv_transpose1d_3d_match_reference(cls, args, kwargs, spatial):
    """Transposed layer = input gradient of the matching convolution, on the float64
    reference; its backward = that convolution (cropped) and its weight gradient."""
    rng = np.random.default_rng(8)
    layer = cls(*args, **kwargs, dtype=np.float64, seed=6)
    nd = len(spatial)
    assert layer.weight.shape == (args[0], args[1] // layer.groups) + layer.kernel_size
    x = rng.standard_normal((2, args[0]) + spatial)
    pairs = tuple((p, p) for p in layer.padding)
    out = tuple((l - 1) * s - 2 * p + d * (k - 1) + o + 1 for l, s, p, d, k, o in
                zip(spatial, layer.stride, layer.padding, layer.dilation, layer.kernel_size,
                    layer.output_padding))
    z_shape = (2, layer.out_channels) + out
    kw = dict(stride=layer.stride, padding=pairs, dilation=layer.dilation, groups=layer.groups)
    g = ref.geometry(z_shape, layer.weight.shape, **kw)
    x_full = np.zeros(g.y_shape)
    crop = (slice(None), slice(None)) + tuple(slice(0, l) for l in spatial)
    x_full[crop] = x
    y_ref = ref.conv_input_grad(x_full, layer.weight, z_shape, **kw)
    if layer.bias is not None:
        y_ref = y_ref + layer.bias.reshape((1, -1) + (1,) * nd)
    gy = rng.standard_normal(z_shape)
    y = layer(x)
    gx = layer.backward(gy)
    assert _rel(y, y_ref) < 1e-12
    assert _rel(gx, ref.conv(gy, layer.weight, **kw)[crop]) < 1e-12
    gw_ref = ref.conv_weight_grad(gy, x_full, layer.weight.shape, **kw)
    assert _rel(layer.weight_grad, gw_ref) < 1e-12
    if layer.bias is not None:
        assert _rel(layer.bias_grad, ref.conv_bias_grad(gy)) < 1e-12
