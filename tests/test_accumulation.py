"""Half types accumulate in float32 on every backend.

A long reduction of positive float16/bfloat16 terms: accumulating in the half
type itself would stall once the running sum's spacing exceeds the terms
(errors of several percent); float32 accumulation leaves only the final
rounding (<= eps/2 of the result).
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref


def _half(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


@pytest.mark.parametrize("dtype,eps", [("float16", 2.0**-10), ("bfloat16", 2.0**-7)])
def test_long_reductions_accumulate_in_float32(backend, to_backend, to_host, dtype, eps):
    dt = _half(dtype)
    rng = np.random.default_rng(0)
    C, L = 512, 40          # forward / input grad reduce over C*3 = 1536 terms, weight grad over 2*L
    x = rng.uniform(0.5, 1.0, (2, C, L)).astype(dt)
    w = rng.uniform(0.5, 1.0, (4, C, 3)).astype(dt)
    gy = rng.uniform(0.5, 1.0, (2, 4, L - 2)).astype(dt)
    y = to_host(gpuconv.conv(to_backend(x), to_backend(w)))
    gx = to_host(gpuconv.conv_input_grad(to_backend(gy), to_backend(w), x.shape))
    big = rng.uniform(0.5, 1.0, (64, 2, 300)).astype(dt)            # weight grad: 64*298 terms
    gbig = rng.uniform(0.5, 1.0, (64, 3, 298)).astype(dt)
    gw = to_host(gpuconv.conv_weight_grad(to_backend(big), to_backend(gbig), (3, 2, 3)))
    for got, want in ((y, ref.conv(x, w)), (gx, ref.conv_input_grad(gy, w, x.shape)),
                      (gw, ref.conv_weight_grad(big, gbig, (3, 2, 3)))):
        rel = np.max(np.abs(got.astype(np.float64) - want) / np.abs(want))
        # the final rounding (eps/2) plus float32 summation error (~n * 2^-24, far below 1e-5)
        assert rel <= eps / 2 + 1e-5, (dtype, rel)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shared_kernel_form_sums_channels_in_float32(backend, to_backend, to_host, dtype):
    """The seed's shared-kernel weight (K, *kernel) sums x over its channels before the
    convolution: that sum must stay in float32 (64 channels of ~2000 overflow float16)
    and the result be rounded once."""
    dt = _half(dtype)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 64, 8, 8)) * 100 + 2000).astype(dt)
    w = rng.uniform(5e-4, 2e-3, (2, 3, 3)).astype(dt)
    gy = rng.uniform(5e-4, 1e-3, (1, 2, 6, 6)).astype(dt)  # true weight grad ~ 4e3: fits
    full_w = np.broadcast_to(w[:, None].astype(np.float64), (2, 64, 3, 3))
    y = to_host(gpuconv.conv2d(to_backend(x), to_backend(w)))
    gw = to_host(gpuconv.conv2d_weight_grad(to_backend(x), to_backend(gy), w.shape))
    want_y = ref.conv(x, full_w)
    want_gw = ref.conv_weight_grad(x, gy, full_w.shape).sum(axis=1)
    for got, want in ((y, want_y), (gw, want_gw)):
        assert np.isfinite(got.astype(np.float64)).all()
        rel = np.max(np.abs(got.astype(np.float64) - want) / np.abs(want))
        assert rel <= eps / 2 + 1e-5, rel


@pytest.mark.parametrize("dtype,eps", [("float16", 2.0**-10), ("bfloat16", 2.0**-7)])
def test_conv_transpose_with_bias_rounds_once(backend, to_backend, to_host, dtype, eps):
    """The bias is added before the single rounding to the half type (adding it to an
    already rounded result can be off by almost a whole unit in the last place)."""
    dt = _half(dtype)
    rng = np.random.default_rng(2)
    x = rng.uniform(0.5, 1.0, (2, 16, 9, 9)).astype(dt)
    w = rng.uniform(0.5, 1.0, (16, 4, 3, 3)).astype(dt)
    b = rng.uniform(0.05, 0.1, (4,)).astype(dt)
    y = to_host(gpuconv.conv_transpose(to_backend(x), to_backend(w), to_backend(b), stride=2))
    want = ref.conv_input_grad(x, w, (2, 4, 19, 19), stride=2) + \
        b.astype(np.float64).reshape(1, -1, 1, 1)
    assert y.dtype == dt
    rel = np.max(np.abs(y.astype(np.float64) - want) / np.abs(want))
    assert rel <= eps / 2 + 1e-5, rel / (eps / 2)
