"""The speed paths of gpuconv.torch on the CPU, each checked against an independent
float64 truth: eager calls that skip the dispatcher (while every tracer, mode and
functorch transform still sees the registered operator), the GEMM shapes routed
differently on PyTorch's pool, and the col2im input gradient of deep layers on
small images.  Skipped without torch.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuconv.torch")
F = torch.nn.functional

from gpuconv import reference as ref  # noqa: E402
from gpuconv._cpu import parallel as nb  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def op_calls(monkeypatch):
    """Names of the registered operators called through the dispatcher."""
    calls = []
    for name, op in list(gt._OPS.items()):
        def spy(*a, _op=op, _name=name):
            calls.append(_name)
            return _op(*a)
        monkeypatch.setitem(gt._OPS, name, spy)
    return calls


def _model_step(dtype):
    g = _gen(3)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    wt = torch.randn(4, 2, 2, 2, generator=g, dtype=dtype, requires_grad=True)
    return x, w, wt


def test_eager_cpu_calls_skip_the_dispatcher(op_calls):
    x, w, wt = _model_step(torch.float64)
    y = gt.conv_transpose2d(torch.tanh(gt.conv2d(x, w, padding=1, stride=2)), wt, stride=2)
    gx, gw, gwt = torch.autograd.grad(y.square().sum(), (x, w, wt))
    assert op_calls == []           # forward and every gradient ran the implementations
    xr, wr, wtr = (t.detach().requires_grad_() for t in (x, w, wt))
    yr = F.conv_transpose2d(torch.tanh(F.conv2d(xr, wr, padding=1, stride=2)), wtr, stride=2)
    want = torch.autograd.grad(yr.square().sum(), (xr, wr, wtr))
    for got, exp in zip((y, gx, gw, gwt), (yr,) + want):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_modes_transforms_and_meta_tensors_keep_the_operator(op_calls):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, _ = _model_step(torch.float64)
    with Seen() as mode:
        y = gt.conv2d(x, w, padding=1)
        torch.autograd.grad(y.sum(), (x, w))
    assert op_calls == ["conv", "input_grad", "weight_grad"]
    assert {"gpuconv.conv.default", "gpuconv.conv_input_grad.default",
            "gpuconv.conv_weight_grad.default"} <= set(mode.ops)
    del op_calls[:]
    ws = torch.randn(3, 4, 3, 3, 3, generator=_gen(4), dtype=torch.float64)
    yv = torch.func.vmap(lambda w1: gt.conv2d(x.detach(), w1, padding=1))(ws)
    assert "conv" in op_calls
    for i in range(3):
        torch.testing.assert_close(yv[i], F.conv2d(x.detach(), ws[i], padding=1),
                                   rtol=1e-12, atol=1e-12)
    del op_calls[:]
    assert gt.conv2d(x.to("meta"), w.to("meta")).shape == (2, 4, 7, 7)
    assert op_calls == ["conv"]


@pytest.mark.parametrize("shape_a,shape_b,trans_b", [
    ((3, 200, 40), (3, 40, 5), False),      # narrow result: computed as its transpose
    ((600, 8), (8, 700), True),             # short reduction, large result: NumPy's BLAS
    ((70, 90), (90, 60), False),            # the plain torch.matmul
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_gemm_routes_agree_with_float64(shape_a, shape_b, trans_b, dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shape_a).astype(dtype)
    if trans_b:  # a transposed view, as the weight gradient passes it
        b = rng.standard_normal(shape_b[::-1]).astype(dtype).T
    else:
        b = rng.standard_normal(shape_b).astype(dtype)
    out = np.full(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                  np.nan, dtype)
    before = (a.copy(), b.copy())
    gt._torch_gemm(a, b, out)
    want = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    assert np.abs(out - want).max() <= tol * np.abs(want).max()
    assert np.array_equal(a, before[0]) and np.array_equal(b, before[1])
    again = np.full_like(out, np.nan)
    gt._torch_gemm(a, b, again)
    assert np.array_equal(out, again)   # deterministic


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_deep_layer_on_small_image_gradients(dtype, tol):
    """C >= N*H*W (the col2im input gradient inside PyTorch), a narrow forward GEMM and a
    short weight-gradient reduction into a large result, against float64 truths."""
    g = _gen(6)
    x = torch.randn(2, 128, 2, 2, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(256, 128, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    y = gt.conv2d(x, w, padding=1)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    x64, w64, gy64 = (t.detach().double().numpy() for t in (x, w, gy))
    for got, want in ((y, ref.conv(x64, w64, padding=1)),
                      (gx, ref.conv_input_grad(gy64, w64, x64.shape, padding=1)),
                      (gw, ref.conv_weight_grad(x64, gy64, w64.shape, padding=1))):
        got = got.detach().double().numpy()
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_deep_layer_input_grad_with_a_nonfinite_weight():
    """The col2im route multiplies only taps that meet data: an inf weight gives inf/NaN
    exactly where the float64 reference does."""
    g = _gen(7)
    w = torch.randn(16, 64, 3, 3, generator=g, dtype=torch.float64)
    w[1, 2, 0, 0] = float("inf")
    gy = torch.randn(1, 16, 2, 2, generator=g, dtype=torch.float64)
    with gt._cpu_threads():
        assert nb.hosted()
    gx = gt._run("input_grad", gy, w, [1, 64, 2, 2], [1, 1], [1, 1], [1, 1], [1, 1], 1)
    want = ref.conv_input_grad(gy.numpy(), w.numpy(), (1, 64, 2, 2), padding=1)
    got = gx.numpy()
    assert not np.isfinite(want).all() and np.isfinite(want).any()
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    assert np.abs(got[fin] - want[fin]).max() <= 1e-13 * np.abs(want[fin]).max()


@pytest.mark.parametrize("stride", [1, 2])
def test_large_copies_and_col2im_adds_on_pytorchs_pool(monkeypatch, stride):
    """im2col gathers, staging copies and col2im adds big enough for PyTorch's pool run
    there (Tensor.copy_ / add_ on views) and every result matches the float64 truth."""
    taken = {"copy": 0, "add": 0}
    for name, key in (("_torch_copy", "copy"), ("_torch_add", "add")):
        orig = getattr(gt, name)

        def spy(*a, _orig=orig, _key=key):
            ok = _orig(*a)
            taken[_key] += bool(ok)
            return ok
        monkeypatch.setattr(gt, name, spy)
    g = _gen(8)
    x = torch.randn(2, 64, 48, 48, generator=g, requires_grad=True)
    w = torch.randn(32, 64, 3, 3, generator=g, requires_grad=True)
    y = gt.conv2d(x, w, stride=stride, padding=1)
    gy = torch.randn(y.shape, generator=g)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    assert taken["copy"] > 0
    if stride == 2:
        assert taken["add"] > 0    # the strided input gradient's col2im
    x64, w64, gy64 = (t.detach().double().numpy() for t in (x, w, gy))
    kw = dict(stride=stride, padding=1)
    for got, want in ((y, ref.conv(x64, w64, **kw)),
                      (gx, ref.conv_input_grad(gy64, w64, x64.shape, **kw)),
                      (gw, ref.conv_weight_grad(x64, gy64, w64.shape, **kw))):
        got = got.detach().double().numpy()
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_gemm_in_row_blocks_agrees_with_float64(dtype):
    """A narrow result with thousands of rows (the input gradient of a deep layer on a
    small image: a transposed view of the weight times grad_out) goes through the
    row-block bmm; rows that do not split evenly take the plain transposed route."""
    rng = np.random.default_rng(9)
    for M in (4096, 4098):
        w = rng.standard_normal((64, M)).astype(dtype)
        a = w.T[None]                                    # (1, M, 64) transposed view
        b = rng.standard_normal((1, 64, 8)).astype(dtype)
        out = np.full((1, M, 8), np.nan, dtype)
        gt._torch_gemm(a, b, out)
        want = a.astype(np.float64) @ b.astype(np.float64)
        tol = 1e-5 if dtype == np.float32 else 1e-13
        assert np.abs(out - want).max() <= tol * np.abs(want).max()
