"""gpuconv.torch: autograd functions over gpuconv, checked against PyTorch itself.

PyTorch's own convolutions (``torch.nn.functional``) and ``gradcheck`` (finite
differences) are the independent references here.  Skipped without torch.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gt = pytest.importorskip("gpuconv.torch")


def test_importing_gpuconv_does_not_import_torch():
    code = ("import sys, gpuconv, gpuconv.nn; "
            "import gpuconv.__main__; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


CASES = [
    # nd, C, K, kernel, kwargs
    (1, 3, 4, (3,), dict(stride=2, padding=1)),
    (1, 4, 6, (4,), dict(padding="same", dilation=2, groups=2)),
    (2, 3, 5, (3, 3), dict(padding=1)),
    (2, 4, 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=4)),
    (2, 6, 4, (2, 3), dict(padding="same", groups=2)),
    (2, 2, 3, (3, 3), dict(padding="valid", dilation=2)),
    (3, 2, 4, (3, 3, 3), dict(padding=1, stride=(1, 2, 2))),
    (3, 4, 2, (2, 1, 3), dict(padding="same", groups=2)),
]
TORCH_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
GT_FN = {1: gt.conv1d, 2: gt.conv2d, 3: gt.conv3d}


def _inputs(nd, C, K, kernel, groups, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    spatial = {1: (13,), 2: (8, 7), 3: (5, 6, 5)}[nd]
    x = torch.randn((2, C) + spatial, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn((K, C // groups) + kernel, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(K, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("nd,C,K,kernel,kw", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_agrees_with_torch_functional_and_autograd(nd, C, K, kernel, kw, dtype, tol):
    x, w, b = _inputs(nd, C, K, kernel, kw.get("groups", 1), dtype, seed=nd * 10 + C)
    y = GT_FN[nd](x, w, b, **kw)
    y_t = TORCH_FN[nd](x, w, b, **kw)
    assert y.dtype == dtype and y.shape == y_t.shape
    scale = y_t.abs().max()
    assert (y - y_t).abs().max() <= tol * scale
    g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (x, w, b), g)
    grads_t = torch.autograd.grad(y_t, (x, w, b), g)
    for a, e in zip(grads, grads_t):
        assert a.shape == e.shape
        assert (a - e).abs().max() <= tol * e.abs().max()


@pytest.mark.parametrize("nd,C,K,kernel,kw", [CASES[0], CASES[3], CASES[4], CASES[7]])
def test_gradcheck_float64(nd, C, K, kernel, kw):
    g = torch.Generator().manual_seed(3)
    spatial = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}[nd]
    groups = kw.get("groups", 1)
    x = torch.randn((1, C) + spatial, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((K, C // groups) + kernel, generator=g, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(K, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: gt.conv(x, w, b, **kw), (x, w, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_only_requested_gradients_and_no_bias():
    x, w, _ = _inputs(2, 3, 4, (3, 3), 1, torch.float64, seed=5, bias=False)
    w_frozen = w.detach()
    gt.conv2d(x, w_frozen, padding=1).square().sum().backward()
    xt = x.detach().clone().requires_grad_()
    F.conv2d(xt, w_frozen, padding=1).square().sum().backward()
    assert w_frozen.grad is None
    assert torch.allclose(x.grad, xt.grad, rtol=1e-12, atol=1e-12)


def test_unbatched_input_and_non_contiguous_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 8, generator=g, dtype=torch.float64)       # unbatched
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(gt.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), atol=1e-12)
    xt = x.transpose(1, 2).unsqueeze(0)                               # non-contiguous
    assert not xt.is_contiguous()
    assert torch.allclose(gt.conv2d(xt, w), F.conv2d(xt, w), atol=1e-12)


@pytest.mark.parametrize("kw,spatial", [
    (dict(stride=2, padding=1, output_padding=1), (4, 5)),
    (dict(stride=(1, 2), padding=(0, 1), groups=2, dilation=(2, 1)), (5, 4)),
])
def test_conv_transpose2d_agrees_with_torch(kw, spatial):
    g = torch.Generator().manual_seed(9)
    groups = kw.get("groups", 1)
    x = torch.randn((2, 4) + spatial, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6 // groups, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    y = gt.conv_transpose2d(x, w, b, **kw)
    y_t = F.conv_transpose2d(x, w, b, **kw)
    assert y.shape == y_t.shape
    assert torch.allclose(y, y_t, rtol=0, atol=1e-12 * float(y_t.detach().abs().max()))
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(y_t, (x, w, b), gy)):
        assert torch.allclose(a, e, rtol=0, atol=1e-12 * float(e.abs().max()))
    x1 = x[:1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: gt.conv_transpose2d(x, w, b, **kw),
                                    (x1, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_half_and_bfloat16_round_trip():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 6, generator=g)
    w = torch.randn(3, 2, 3, 3, generator=g)
    y64 = F.conv2d(x.double(), w.double(), padding=1)
    for dt, eps in [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)]:
        if dt == torch.bfloat16:
            pytest.importorskip("ml_dtypes")
        xh, wh = x.to(dt), w.to(dt)
        y = gt.conv2d(xh, wh, padding=1)
        assert y.dtype == dt
        ref = F.conv2d(xh.double(), wh.double(), padding=1)     # same rounded inputs
        assert (y.double() - ref).abs().max() <= 2 * eps * ref.abs().max()
        assert (y.double() - y64).abs().max() < 0.1 * y64.abs().max()


def test_dlpack_bridge_is_zero_copy():
    t = torch.arange(6.0).reshape(2, 3)
    a = gt.to_array(t)
    assert isinstance(a, np.ndarray)
    a[0, 0] = 42.0
    assert t[0, 0].item() == 42.0
    back = gt.from_array(a)
    back[1, 2] = -1.0
    assert a[1, 2] == -1.0 and t[1, 2].item() == -1.0


def test_errors():
    x = torch.ones(1, 2, 5, 5)
    with pytest.raises(ValueError, match="kernel dims"):
        gt.conv2d(x, torch.ones(3, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        gt.conv2d(x, torch.ones(3, 1, 3, 3), groups=3)
    with pytest.raises(TypeError, match="dtype"):
        gt.conv2d(x, torch.ones(3, 2, 3, 3, dtype=torch.float64))


def test_docstring_examples():
    import doctest
    res = doctest.testmod(gt, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_non_tensor_arguments_get_a_type_error():
    for f in (gt.conv2d, gt.conv, gt.conv_transpose2d):
        with pytest.raises(TypeError, match="weight must be a torch.Tensor, got numpy.ndarray"):
            f(torch.ones(1, 3, 5, 5), np.ones((3, 3, 3, 3)))
