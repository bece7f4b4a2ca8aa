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
