"""GPU-only properties of the cupy backend (skipped where no CUDA device works).

The parametrized property suite (tests/test_properties.py) runs on the cupy
backend through the ``backend`` fixture; this file adds what only a real device
can show: determinism, streams, >2^31-element tensors, device placement, and
agreement with PyTorch/cuDNN (TF32 off) where PyTorch with CUDA is installed.

Inputs are drawn from ``GPUCONV_TEST_SEED`` (default 0; benchmarks/gpu_check.sh sets a
fresh one per run and prints it), and the cupy runtime poisons every array it
allocates for a kernel to write (``GPUCONV_POISON_OUTPUTS=1``, set by conftest.py).
"""
import os

import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    if "cupy" not in gpuconv.available_backends():
        pytest.skip(gpuconv.backend_info()["backends"]["cupy"]["reason"])
    return cupy


SEED = int(os.environ.get("GPUCONV_TEST_SEED", "0"))


def _rng(k):
    """Generator of test k under the session seed (gpu_check.sh prints the seed)."""
    return np.random.default_rng([k, SEED])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _data(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def test_result_is_cupy_on_input_device_and_inputs_untouched(cp):
    rng = _rng(0)
    x, w, b = _data(rng, 2, 6, 9, 11), _data(rng, 4, 3, 3, 3), _data(rng, 4)
    xd, wd, bd = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    xd_nc = cp.asarray(np.ascontiguousarray(x[:, :, ::-1]))[:, :, ::-1]  # negative strides
    y = gpuconv.conv(xd_nc, wd, bd, stride=(2, 1), padding="same", groups=2)
    assert isinstance(y, cp.ndarray) and y.device.id == xd.device.id and y.dtype == np.float32
    want = ref.conv(x, w, b, stride=(2, 1), padding="same", groups=2)
    assert _rel(cp.asnumpy(y), want) < 1e-5
    for dev, host in ((xd_nc, x), (wd, w), (bd, b)):  # what was passed is unchanged
        assert cp.asnumpy(dev).tobytes() == np.ascontiguousarray(host).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_gradients_are_bit_identical_run_to_run(cp, dtype):
    rng = _rng(1)
    x = cp.asarray(_data(rng, 8, 32, 28, 28, dtype=dtype))
    gy = cp.asarray(_data(rng, 8, 64, 28, 28, dtype=dtype))
    w = cp.asarray(_data(rng, 64, 32, 3, 3, dtype=dtype))
    gw = [gpuconv.conv_weight_grad(x, gy, w.shape, padding=1) for _ in range(3)]
    gx = [gpuconv.conv_input_grad(gy, w, x.shape, padding=1) for _ in range(3)]
    for a in gw[1:]:
        assert cp.array_equal(a.view(cp.uint8), gw[0].view(cp.uint8))
    for a in gx[1:]:
        assert cp.array_equal(a.view(cp.uint8), gx[0].view(cp.uint8))


def test_cupy_runtime_poisons_what_it_allocates(cp):
    """The switch that makes every other gpu test see an unwritten element as NaN."""
    rt = gpuconv._dispatch._instance("cupy").rt
    assert rt.poison_outputs == (os.environ.get("GPUCONV_POISON_OUTPUTS") == "1")
    if not rt.poison_outputs:
        pytest.skip("GPUCONV_POISON_OUTPUTS is not 1")
    for dt in (cp.float16, cp.float32, cp.float64):
        a = rt.empty((3, 5), dt)
        assert bool(cp.isnan(a).all()), dt
    import ml_dtypes
    b = rt.empty((7,), ml_dtypes.bfloat16)
    assert bool(cp.isnan(b.astype(cp.float32)).all())


def test_work_on_a_non_default_stream(cp):
    rng = _rng(2)
    x, w = _data(rng, 4, 8, 33, 17), _data(rng, 16, 8, 5, 3)
    gy = _data(rng, 4, 16, 33, 17)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        xd, wd, gyd = cp.asarray(x), cp.asarray(w), cp.asarray(gy)
        y = gpuconv.conv(xd, wd, padding="same")
        gx = gpuconv.conv_input_grad(gyd, wd, x.shape, padding="same")
        gw = gpuconv.conv_weight_grad(xd, gyd, w.shape, padding="same")
        out = [cp.asnumpy(a, stream=stream) for a in (y, gx, gw)]
    stream.synchronize()
    assert _rel(out[0], ref.conv(x, w, padding="same")) < 1e-5
    assert _rel(out[1], ref.conv_input_grad(gy, w, x.shape, padding="same")) < 1e-5
    assert _rel(out[2], ref.conv_weight_grad(x, gy, w.shape, padding="same")) < 1e-5


def test_forward_over_2_to_the_31_elements(cp):
    """x has 2^31 + 2^17 half elements: the 64-bit index variant must be chosen and
    right at both ends of the tensor."""
    H, W = 2**16, 2**15 + 2
    assert H * W > 2**31
    try:
        x = cp.empty((1, 1, H, W), dtype=cp.float16)
    except cp.cuda.memory.OutOfMemoryError:
        pytest.skip("not enough device memory for a 2^31-element tensor")
    rng = _rng(3)
    pattern = cp.asarray(rng.uniform(-1, 1, (64, W)).astype(np.float16))
    x[0, 0] = cp.tile(pattern, (H // 64, 1))
    w = cp.asarray(_data(rng, 2, 1, 3, 3, dtype=np.float16))
    y = gpuconv.conv(x, w, padding=1)
    assert y.shape == (1, 2, H, W)
    wh = cp.asnumpy(w)
    for r0, r1 in ((0, 3), (H // 2 - 2, H // 2 + 2), (H - 3, H)):
        slab = cp.asnumpy(x[:, :, max(r0 - 1, 0):min(r1 + 1, H)])
        pad_rows = (1 if r0 == 0 else 0, 1 if r1 == H else 0)
        want = ref.conv(slab, wh, padding=(pad_rows, (1, 1)))
        assert want.shape[2] == r1 - r0
        assert _rel(cp.asnumpy(y[:, :, r0:r1]), want) < 4e-3, (r0, r1)
    del x, y


def test_arrays_on_a_second_device_run_there(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("only one CUDA device")
    rng = _rng(4)
    x, w = _data(rng, 2, 4, 10, 10), _data(rng, 3, 4, 3, 3)
    with cp.cuda.Device(1):
        xd, wd = cp.asarray(x), cp.asarray(w)
    y = gpuconv.conv(xd, wd, padding=1)  # current device is 0
    assert y.device.id == 1
    assert _rel(cp.asnumpy(y), ref.conv(x, w, padding=1)) < 1e-5


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nd,kw", [
    (2, dict(stride=1, padding=1, dilation=1, groups=1)),
    (2, dict(stride=2, padding=3, dilation=1, groups=1)),
    (2, dict(stride=1, padding=2, dilation=2, groups=4)),
    (2, dict(stride=2, padding=1, dilation=1, groups=8)),   # depthwise
    (3, dict(stride=1, padding=1, dilation=1, groups=1)),
    (3, dict(stride=2, padding=0, dilation=1, groups=2)),
])
def test_agrees_with_pytorch_cudnn_and_autograd(cp, torch_cuda, nd, kw, dtype):
    torch = torch_cuda
    F = torch.nn.functional
    rng = _rng(5)
    spatial = (13, 11) if nd == 2 else (7, 6, 5)
    C, K, g = 8, 16, kw["groups"]
    x = _data(rng, 3, C, *spatial, dtype=dtype)
    w = _data(rng, K, C // g, *(3,) * nd, dtype=dtype)
    b = _data(rng, K, dtype=dtype)
    xt = torch.tensor(x, device="cuda", requires_grad=True)
    wt = torch.tensor(w, device="cuda", requires_grad=True)
    bt = torch.tensor(b, device="cuda", requires_grad=True)
    conv_t = F.conv2d if nd == 2 else F.conv3d
    yt = conv_t(xt, wt, bt, **kw)
    gy = _data(rng, *yt.shape, dtype=dtype)
    yt.backward(torch.tensor(gy, device="cuda"))
    xd, wd, bd, gyd = (cp.asarray(a) for a in (x, w, b, gy))
    y = gpuconv.conv(xd, wd, bd, **kw)
    gx = gpuconv.conv_input_grad(gyd, wd, x.shape, **kw)
    gw = gpuconv.conv_weight_grad(xd, gyd, w.shape, **kw)
    gb = gpuconv.conv_bias_grad(gyd)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for ours, theirs in ((y, yt), (gx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        assert _rel(cp.asnumpy(ours), theirs.detach().cpu().numpy()) < tol


def test_arrays_on_different_devices_are_refused(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("only one CUDA device")
    with cp.cuda.Device(1):
        w = cp.ones((2, 3, 3, 3), cp.float32)
    x = cp.ones((1, 3, 5, 5), cp.float32)
    with pytest.raises(ValueError, match="different devices"):
        gpuconv.conv(x, w)
