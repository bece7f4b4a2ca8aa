"""conv_transpose{1,2,3}d: PyTorch semantics, checked against a direct scatter in float64
(independent of the backends: every input element adds weight * value to the output
positions its kernel taps land on)."""
import itertools

import numpy as np
import pytest

import gpuconv


def scatter_transpose(x, w, stride, padding, output_padding, dilation, groups):
    N, Cin = x.shape[:2]
    L, k = x.shape[2:], w.shape[2:]
    Cog = w.shape[1]
    out = [(l - 1) * s - 2 * p + d * (kk - 1) + o + 1
           for l, s, p, d, kk, o in zip(L, stride, padding, dilation, k, output_padding)]
    y = np.zeros((N, Cog * groups) + tuple(out))
    Cig = Cin // groups
    for n, ci in itertools.product(range(N), range(Cin)):
        gi = ci // Cig
        for pos in itertools.product(*[range(l) for l in L]):
            for tap in itertools.product(*[range(kk) for kk in k]):
                o = [p_ * s - pad + t * d for p_, s, pad, t, d in
                     zip(pos, stride, padding, tap, dilation)]
                if all(0 <= oo < m for oo, m in zip(o, out)):
                    for co in range(Cog):
                        y[(n, gi * Cog + co) + tuple(o)] += x[(n, ci) + pos] * w[(ci, co) + tap]
    return y


@pytest.mark.parametrize("nd,kw", [
    (1, dict(stride=(3,), padding=(1,), output_padding=(2,), dilation=(1,), groups=1)),
    (2, dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2), groups=2)),
    (3, dict(stride=(1, 2, 2), padding=(0, 1, 0), output_padding=(0, 1, 1), dilation=(1, 1, 1),
             groups=1)),
])
def test_conv_transpose_nd_matches_direct_scatter(backend, to_backend, to_host, nd, kw):
    rng = np.random.default_rng(nd)
    spatial = {1: (5,), 2: (4, 3), 3: (2, 3, 3)}[nd]
    x = rng.standard_normal((2, 4) + spatial)
    w = rng.standard_normal((4, 3) + (2,) * nd)
    b = rng.standard_normal(3 * kw["groups"])
    f = getattr(gpuconv, f"conv_transpose{nd}d")
    y = to_host(f(to_backend(x), to_backend(w), to_backend(b), **kw))
    want = scatter_transpose(x, w, **kw) + b.reshape((1, -1) + (1,) * nd)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_rank_specific_transpose_checks_the_rank():
    x = np.ones((1, 2, 5, 5))
    w = np.ones((2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"conv_transpose3d: weight must have 5 dims"):
        gpuconv.conv_transpose3d(x, w)
    assert gpuconv.conv_transpose2d(x, w).shape == (1, 3, 7, 7)


def test_conv_transpose_output_shape_matches_the_result_and_validates():
    rng = np.random.default_rng(9)
    for xs, ws, kw in [((2, 4, 5), (4, 3, 3), dict(stride=3, padding=1, output_padding=2)),
                       ((1, 4, 4, 3), (4, 1, 2, 3), dict(stride=(2, 1), padding=((1, 0), (0, 2)),
                                                         dilation=(1, 2), groups=2)),
                       ((1, 2, 2, 3, 3), (2, 3, 2, 2, 2), dict(stride=2, output_padding=(0, 1, 1)))]:
        shape = gpuconv.conv_transpose_output_shape(xs, ws, **kw)
        y = gpuconv.conv_transpose(rng.standard_normal(xs), rng.standard_normal(ws), **kw)
        assert shape == y.shape
    with pytest.raises(ValueError, match=r"input_shape=\(1, 3, 5, 5\)"):
        gpuconv.conv_transpose_output_shape((1, 3, 5, 5), (4, 2, 3, 3), groups=2)


# ----------------------------------------------------------------------------- gradients
def _extend(a, spatial):
    out = np.zeros(a.shape[:2] + tuple(spatial))
    out[(slice(None), slice(None)) + tuple(slice(0, l) for l in a.shape[2:])] = a
    return out


GRAD_CASES = [
    (1, dict(stride=(3,), padding=(1,), output_padding=(2,), dilation=(1,), groups=1)),
    (2, dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2), groups=2)),
    # output_padding >= stride (allowed: < dilation): the forward output has trailing
    # positions that x does not feed, cropped from / zero-extended into the gradients
    (2, dict(stride=(1, 2), padding=(0, 1), output_padding=(1, 1), dilation=(2, 1), groups=1)),
    (3, dict(stride=(1, 2, 2), padding=(0, 1, 0), output_padding=(0, 1, 1), dilation=(1, 1, 1),
             groups=1)),
]


@pytest.mark.parametrize("nd,kw", GRAD_CASES)
def test_conv_transpose_gradients_match_scatter_and_reference(backend, to_backend, to_host,
                                                              nd, kw):
    """dL/dx and dL/dw of L = <conv_transpose(x, w), g>: (1) the adjoint identities
    through the independent direct scatter, for several random probes, and (2) the
    float64 reference (dx = conv(g, w) on the first L positions; dw = the weight
    gradient of conv(g, .) against x zero-extended)."""
    from gpuconv import reference as ref
    rng = np.random.default_rng(10 + nd)
    spatial = {1: (5,), 2: (4, 3), 3: (2, 3, 3)}[nd]
    x = rng.standard_normal((2, 4) + spatial)
    w = rng.standard_normal((4, 3) + (2,) * nd)
    y_shape = gpuconv.conv_transpose_output_shape(x.shape, w.shape, **kw)
    g = rng.standard_normal(y_shape)
    gx = to_host(gpuconv.conv_transpose_input_grad(to_backend(g), to_backend(w), x.shape, **kw))
    gw = to_host(gpuconv.conv_transpose_weight_grad(to_backend(x), to_backend(g), w.shape, **kw))
    assert gx.shape == x.shape and gw.shape == w.shape
    pads = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"],
                groups=kw["groups"])
    # (1) identities through the scatter, which computes conv_transpose independently
    for _ in range(3):
        px, pw = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
        lhs_x = float(np.sum(scatter_transpose(px, w, **kw) * g))
        lhs_w = float(np.sum(scatter_transpose(x, pw, **kw) * g))
        assert abs(lhs_x - float(np.sum(px * gx))) <= 1e-10 * max(1.0, abs(lhs_x))
        assert abs(lhs_w - float(np.sum(pw * gw))) <= 1e-10 * max(1.0, abs(lhs_w))
    # (2) the float64 reference
    full = ref.conv(g, w, **pads)
    want_gx = full[(slice(None), slice(None)) + tuple(slice(0, l) for l in spatial)]
    np.testing.assert_allclose(gx, want_gx, rtol=1e-12, atol=1e-12)
    want_gw = ref.conv_weight_grad(g, _extend(x, full.shape[2:]), w.shape, **pads)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_conv_transpose_gradients_low_precision(dtype):
    from gpuconv import reference as ref
    from gpuconv.testing import assert_close
    kw = dict(stride=2, padding=1, output_padding=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5, 4)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    g = rng.standard_normal(gpuconv.conv_transpose_output_shape(x.shape, w.shape, **kw))
    g = g.astype(dtype)
    gx = gpuconv.conv_transpose_input_grad(g, w, x.shape, **kw)
    gw = gpuconv.conv_transpose_weight_grad(x, g, w.shape, **kw)
    assert gx.dtype == np.dtype(dtype) and gw.dtype == np.dtype(dtype)
    g64, w64, x64 = (a.astype(np.float64) for a in (g, w, x))
    assert_close(gx, ref.conv(g64, w64, stride=2, padding=1), dtype, "gx")
    assert_close(gw, ref.conv_weight_grad(g64, x64, w.shape, stride=2, padding=1), dtype, "gw")


def test_conv_transpose_gradient_errors_name_the_argument():
    x, w = np.ones((1, 4, 5, 5)), np.ones((4, 2, 3, 3))
    g = np.ones(gpuconv.conv_transpose_output_shape(x.shape, w.shape, stride=2))
    with pytest.raises(ValueError, match=r"conv_transpose_input_grad: grad_out has shape"):
        gpuconv.conv_transpose_input_grad(g[..., :-1], w, x.shape, stride=2)
    with pytest.raises(ValueError, match=r"conv_transpose_weight_grad: grad_out has shape"):
        gpuconv.conv_transpose_weight_grad(x, g[:, :1], w.shape, stride=2)
    with pytest.raises(ValueError, match=r"channel mismatch"):
        gpuconv.conv_transpose_input_grad(g, w, (1, 3, 5, 5), stride=2)
    with pytest.raises(TypeError, match=r"numpy and cupy|dtype"):
        gpuconv.conv_transpose_weight_grad(x.astype(np.float32), g, w.shape, stride=2)
    x0 = x.copy()
    gpuconv.conv_transpose_weight_grad(x, g, w.shape, stride=2)
    np.testing.assert_array_equal(x, x0)  # inputs never modified
