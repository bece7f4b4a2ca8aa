"""The implicit-GEMM engine on a real device (skipped where no CUDA device works):
every entry point family (both tiles, split-K on and off, both index widths) over the
emulator suite's awkward geometries and one ResNet-sized layer per pass, against the
float64 reference; bit-identical repeats; 'high' precision runs the TF32 entries, within
TF32's elementwise bound and bit-identical run to run."""
import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from test_igemm import CASES, _data  # noqa: E402  (same geometries as the emulator)
from test_igemm_tf32 import tf32_bound, tf32_bound_dgrad, tf32_bound_wgrad

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    if "cupy" not in gpuconv.available_backends():
        pytest.skip(gpuconv.backend_info()["backends"]["cupy"]["reason"])
    return cupy


def _all_passes(cp, x, w, b, gy, xs, ws, kw):
    xd, wd, bd, gyd = (cp.asarray(a) for a in (x, w, b, gy))
    y = cp.asnumpy(gpuconv.conv(xd, wd, bd, **kw))
    gx = cp.asnumpy(gpuconv.conv_input_grad(gyd, wd, xs, **kw))
    gw = cp.asnumpy(gpuconv.conv_weight_grad(xd, gyd, ws, **kw))
    return y, gx, gw


@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("splits", ["", "3"])
@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_engine_on_device(cp, monkeypatch, dtype, cfg, splits, index):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", cfg)
    monkeypatch.setenv("GPUCONV_IGEMM_SPLITS", splits)
    monkeypatch.setenv("GPUCONV_CUDA_INDEX", index)
    dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    for i, (name, (xs, ws, kw)) in enumerate(CASES.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        x, w, b, gy = _data(g, dt, i)
        y, gx, gw = _all_passes(cp, x, w, b, gy, xs, ws, kw)
        assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} forward")
        assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} input grad")
        assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} weight grad")


@pytest.mark.parametrize("layer", [((4, 256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
                                   ((4, 128, 28, 28), (128, 128, 3, 3), dict(stride=2, padding=1)),
                                   ((2, 512, 7, 7), (2048, 512, 1, 1), dict())])
def test_resnet_sized_layers_and_repeats_are_bit_identical(cp, layer):
    xs, ws, kw = layer
    g = conv_geometry("t", xs, ws, dtype=np.float32, **kw)
    x, w, b, gy = _data(g, np.float32, 5)
    first = _all_passes(cp, x, w, b, gy, xs, ws, kw)
    assert_close(first[0], ref.conv(x, w, b, **kw), np.float32, "forward")
    assert_close(first[1], ref.conv_input_grad(gy, w, xs, **kw), np.float32, "input grad")
    assert_close(first[2], ref.conv_weight_grad(x, gy, ws, **kw), np.float32, "weight grad")
    again = _all_passes(cp, x, w, b, gy, xs, ws, kw)
    for a, e in zip(again, first):
        assert a.tobytes() == e.tobytes()
    with gpuconv.set_float32_precision("high"):  # TF32: its own bits, repeatable
        high = _all_passes(cp, x, w, b, gy, xs, ws, kw)
        high2 = _all_passes(cp, x, w, b, gy, xs, ws, kw)
    for h, h2 in zip(high, high2):
        assert h.tobytes() == h2.tobytes()
    bounds = (tf32_bound(x, w, **kw) + 2.0 ** -23 * np.abs(ref.conv(x, w, b, **kw)),
              tf32_bound_dgrad(gy, w, xs, **kw), tf32_bound_wgrad(x, gy, ws, **kw))
    wants = (ref.conv(x, w, b, **kw), ref.conv_input_grad(gy, w, xs, **kw),
             ref.conv_weight_grad(x, gy, ws, **kw))
    for h, e, bd in zip(high, wants, bounds):
        assert (np.abs(h.astype(np.float64) - e) <= bd).all()
