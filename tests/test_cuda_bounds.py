"""Every bound of the direct and tiled CUDA kernels, on the emulator (issue 9 item 9).

Each geometry pads past both edges of every spatial dimension (so the first and the
last row of each dim sits in the padding for some tap), with two images and several
channels of non-zero data: a bound that admits one element too many reads a
neighbouring row, channel or image (wrong values) or past the array (the emulator's
out-of-bounds error); one that admits one too few drops a product.  The float-to-half
rounding is checked where every branch of it decides: subnormal results between
2^-25 and 2^-24, ties, and the largest finite half.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

BOUNDS = {
    "3d-depth-pad": ((2, 3, 3, 4, 4), (5, 3, 3, 2, 2), dict(padding=((2, 2), (1, 1), (1, 0)))),
    "3d-all-edges": ((2, 2, 5, 4, 6), (4, 2, 3, 3, 2),
                     dict(stride=(2, 1, 2), padding=((1, 2), (2, 1), (1, 1)), dilation=(1, 2, 1))),
    "3d-grouped": ((2, 4, 3, 3, 3), (4, 2, 2, 2, 2), dict(padding=1, groups=2)),
    "2d-hi-lo": ((2, 3, 5, 6), (4, 3, 3, 3), dict(padding=((0, 2), (2, 0)))),
    "2d-stride-hi": ((2, 3, 7, 6), (4, 3, 3, 2), dict(stride=(2, 3), padding=((1, 2), (0, 2)))),
    "1d-wide-pad": ((2, 3, 7), (4, 3, 4), dict(padding=(3, 3))),
    # more than one 64-row / 64-column tile, the last one partial: K = 70 output
    # channels (forward M, weight-grad M) and C*taps = 72 (weight-grad N)
    "2d-two-tiles": ((2, 8, 4, 5), (70, 8, 3, 3), dict(padding=1)),
}


@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("algo", ["direct", "tiled"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_edge_of_every_dim(sim_backend, monkeypatch, dtype, algo, index):
    be = sim_backend
    dt = np.dtype(dtype)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    monkeypatch.setenv("GPUCONV_CUDA_INDEX", index)
    for i, (name, (xs, ws, kw)) in enumerate(BOUNDS.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        rng = np.random.default_rng(40 + i)
        x, w, b, gy = ((rng.uniform(0.5, 1.5, s) * rng.choice([-1, 1], s)).astype(dt)
                       for s in (g.x_shape, g.w_shape, (g.K,), g.y_shape))
        with be.rt.schedule("random", seed=i):
            y = be.forward(x, w, b, g)
            gx = be.input_grad(gy, w, g)
            gw = be.weight_grad(x, gy, g)
        assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} {algo} forward")
        assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} {algo} input grad")
        assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} {algo} weight grad")


# (weight, inputs): every x and w a float16, every product exact in float32
_SMALL = 2.0**-12  # products x * 2^-12 with normal x land in the subnormal halves
_HALF_CASES = [
    (_SMALL, [2.0**-14 * f for f in (1, 1.25, 1.5, 1.75)]            # 2^-26 .. below 2^-25
     + [2.0**-13 * f for f in (1, 1.25, 1.5, 1.75)]                   # [2^-25, 2^-24): e = 102
     + [2.0**-12 * f for f in (1, 1.25, 1.5, 1.75)]                   # [2^-24, 2^-23)
     + [2.0**-11 * f for f in (1.125, 1.375, 1.625)]                  # subnormal ties
     + [2.0**-2 - 2.0**-12, -1.5 * 2.0**-13, -(2.0**-14)]),           # below 2^-14; signs
    (1.5, [1 + a * 2.0**-10 for a in range(8)]),                      # normal ties (odd a)
    (1 + 2.0**-10, [1 + a * 2.0**-10 for a in range(8)] + [65440.0, 65472.0, 65504.0]),
    (1.0, [np.inf, -np.inf, 2.0**-24, 65504.0]),                     # inf stays inf (not NaN)
]


@pytest.mark.parametrize("algo", ["direct", "tiled"])
def test_float_to_half_rounding_at_every_branch(sim_backend, monkeypatch, algo):
    """y = x * w (1x1, one channel) with float32 products chosen at each decision of
    the float->half rounding (zero below 2^-25, the subnormal range with its ties,
    normals with ties, the overflow threshold 65520); the result must be the float16
    of the exact product, bit for bit."""
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    for wv, xv in _HALF_CASES:
        x16 = np.array(xv, np.float64)
        assert np.array_equal(np.float16(x16).astype(np.float64), x16)  # inputs are halves
        xs = np.float16(x16).reshape(1, 1, -1)
        w = np.full((1, 1, 1), wv, np.float16)
        assert float(w[0, 0, 0]) == wv
        g = conv_geometry("t", xs.shape, w.shape, dtype=np.dtype(np.float16))
        y = sim_backend.forward(xs, w, None, g).reshape(-1)
        prods = (x16 * wv).astype(np.float32)
        assert np.array_equal(prods.astype(np.float64), x16 * wv)  # exact in float32
        with np.errstate(over="ignore"):  # 65520 and up round to inf: intended
            want = prods.astype(np.float16)
        bad = y.view(np.uint16) != want.view(np.uint16)
        assert not bad.any(), [(float(p), float(a), float(b))
                               for p, a, b in zip(prods[bad], y[bad], want[bad])]
    # NaN stays NaN
    xs = np.array([np.nan, 1.0, -np.nan], np.float16).reshape(1, 1, -1)
    w = np.ones((1, 1, 1), np.float16)
    g = conv_geometry("t", xs.shape, w.shape, dtype=np.dtype(np.float16))
    y = sim_backend.forward(xs, w, None, g).reshape(-1)
    assert np.isnan(y[0]) and y[1] == 1 and np.isnan(y[2])


@pytest.mark.parametrize("algo", ["direct", "tiled"])
def test_float_to_bfloat16_rounding_inf_and_nan(sim_backend, monkeypatch, algo):
    """bfloat16 results: round to nearest even at ties and near-ties, inf stays inf
    (not NaN), NaN stays NaN -- bit for bit as ml_dtypes rounds the exact product."""
    ml = pytest.importorskip("ml_dtypes")
    bf = np.dtype(ml.bfloat16)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    wv = 1 + 2.0**-7   # a bfloat16; x * w with 8-bit x is exact in float32
    xv = np.array([1 + a * 2.0**-7 for a in range(16)] + [np.inf, -np.inf, 2.0**100, -3.0])
    xs = xv.astype(bf).reshape(1, 1, -1)
    assert np.array_equal(xs.astype(np.float64).reshape(-1), xv)
    w = np.full((1, 1, 1), wv, bf)
    g = conv_geometry("t", xs.shape, w.shape, dtype=bf)
    y = sim_backend.forward(xs, w, None, g).reshape(-1)
    want = (xv * wv).astype(np.float32).astype(bf)
    bad = y.view(np.uint16) != want.view(np.uint16)
    assert not bad.any(), [(float(p), float(a), float(b))
                           for p, a, b in zip(xv[bad] * wv, y[bad], want[bad])]
    xs = np.array([np.nan, 1.0], bf).reshape(1, 1, -1)
    y = sim_backend.forward(xs, w, None, conv_geometry("t", xs.shape, w.shape, dtype=bf))
    assert np.isnan(y.astype(np.float32)[0, 0, 0]) and np.isfinite(y.astype(np.float32)[0, 0, 1])
