"""gpuconv.torch as a drop-in: modules, convert(), torch.func, double backward,
autocast, channels_last, threads and errors.

The independent references are PyTorch's own convolutions (run on a deep copy
of the same model), float64 finite differences (gradcheck / gradgradcheck) and
float64 truths for the reduced-precision checks.  Skipped without torch.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuconv.torch")
nn = torch.nn
F = torch.nn.functional


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def small_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         Block(8, 8, 1), Block(8, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


class Mixed(nn.Module):
    """Transposed, grouped, depthwise, dilated, 1-d and 3-d convolutions, padding modes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.g = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, padding_mode="circular")
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, padding_mode="replicate")
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c1d = nn.Conv1d(6, 4, 3, padding="same")
        self.up1d = nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1)
        self.c3d = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))
        self.up3d = nn.ConvTranspose3d(3, 2, 2, stride=(1, 2, 2), dilation=(2, 1, 1))

    def forward(self, x):
        y = self.up(self.dw(torch.tanh(self.g(torch.tanh(self.c1(x))))))     # (N, 6, H, W)
        n, c, h, w = y.shape
        z = self.up1d(torch.tanh(self.c1d(y.flatten(2))))                    # (N, 2, 2HW)
        v = self.c3d(z.reshape(n, 2, 2, h, w))
        return self.up3d(torch.tanh(v))


def _params_equal(m):
    return {k: v for k, v in m.named_parameters()}


@pytest.mark.parametrize("make,shape,dtype,tol", [
    (small_resnet, (3, 3, 12, 12), torch.float64, 1e-11),
    (small_resnet, (3, 3, 12, 12), torch.float32, 1e-4),
    (Mixed, (2, 4, 6, 6), torch.float64, 1e-11),
    (Mixed, (2, 4, 6, 6), torch.float32, 1e-4),
])
def test_convert_matches_native_forward_gradients_and_optimizer_step(make, shape, dtype, tol):
    torch.manual_seed(0)
    native = make().to(dtype).train()
    ours = copy.deepcopy(native)
    params = list(ours.parameters())
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)   # built before convert
    assert gt.convert(ours) is ours
    assert [p is q for p, q in zip(params, ours.parameters())] == [True] * len(params)
    convs = [m for m in ours.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(type(m).__module__ == "gpuconv.torch" for m in convs)
    assert list(ours.state_dict()) == list(native.state_dict())
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(shape, generator=_gen(1), dtype=dtype)
    for step in range(2):
        ys = []
        for m, opt_ in ((native, opt_n), (ours, opt)):
            opt_.zero_grad()
            y = m(x)
            y.square().mean().backward()
            ys.append(y.detach())
        scale = ys[0].abs().max()
        assert (ys[0] - ys[1]).abs().max() <= tol * scale, f"forward, step {step}"
        pn, po = _params_equal(native), _params_equal(ours)
        for k in pn:
            e, a = pn[k].grad, po[k].grad
            assert a is not None and a.shape == e.shape, k
            assert (a - e).abs().max() <= tol * e.abs().max() + 1e-30, f"grad {k}, step {step}"
        opt_n.step()
        opt.step()
    for k, p in _params_equal(native).items():
        q = _params_equal(ours)[k]
        assert (p - q).abs().max() <= tol * p.abs().max(), f"after optimizer steps: {k}"


def test_modules_keep_torch_nn_constructor_state_dict_and_repr():
    pairs = [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False,
                   padding_mode="circular"),
         gt.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False,
                   padding_mode="circular")),
        (nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"),
         gt.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect")),
        (nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate"),
         gt.Conv3d(2, 2, 3, padding=1, padding_mode="replicate")),
        (nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1),
         gt.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2),
         gt.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2)),
        (nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2), bias=False),
         gt.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2), bias=False)),
    ]
    for ref, ours in pairs:
        assert isinstance(ours, type(ref))
        assert ours.extra_repr() == ref.extra_repr()
        assert repr(ours) == repr(ref)
        sd = ref.state_dict()
        assert list(ours.state_dict()) == list(sd)
        ours.load_state_dict(sd)
        nd = ref.weight.dim() - 2
        x = torch.randn((2, ref.in_channels) + (7,) * nd, generator=_gen(nd))
        y, y_ref = ours(x), ref(x)
        assert y.shape == y_ref.shape
        assert (y - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()


def test_convert_leaves_subclasses_and_other_modules_alone_and_converts_the_root():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(MyConv(2, 2, 3), nn.Linear(3, 3))
    gt.convert(net)
    assert type(net[0]) is MyConv and type(net[1]) is nn.Linear
    root = nn.Conv2d(2, 3, 3)
    assert type(gt.convert(root)) is gt.Conv2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gt.convert(lambda x: x)


def test_conv_transpose_output_size_and_padding_mode():
    ref = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    ours = gt.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 5, 5, generator=_gen(2))
    y = ours(x, output_size=[10, 10])
    assert y.shape == (1, 2, 10, 10)
    assert (y - ref(x, output_size=[10, 10])).abs().max() <= 1e-5
    bad = gt.ConvTranspose2d(3, 2, 3)
    bad.padding_mode = "reflect"
    with pytest.raises(ValueError, match="Only 'zeros' padding mode"):
        bad(x)


@pytest.mark.parametrize("nd,kw", [
    (1, dict(stride=3, padding=2, output_padding=1, dilation=2)),
    (1, dict(stride=1, padding=0, output_padding=1, dilation=2)),   # output_padding >= stride
    (3, dict(stride=(1, 2, 2), padding=(0, 1, 1), groups=2)),
])
def test_conv_transpose1d_3d_functions_agree_with_torch(nd, kw):
    g = _gen(7 + nd)
    groups = kw.get("groups", 1)
    x = torch.randn((2, 4) + (5,) * nd, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((4, 6 // groups) + (3,) * nd, generator=g, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    fn = {1: (gt.conv_transpose1d, F.conv_transpose1d),
          3: (gt.conv_transpose3d, F.conv_transpose3d)}[nd]
    y, y_ref = fn[0](x, w, b, **kw), fn[1](x, w, b, **kw)
    assert y.shape == y_ref.shape
    assert (y - y_ref).abs().max() <= 1e-12 * y_ref.abs().max()
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), gy),
                    torch.autograd.grad(y_ref, (x, w, b), gy)):
        assert (a - e).abs().max() <= 1e-12 * e.abs().max()


# ----------------------------------------------------------------------------- higher order
GG_CASES = [
    ("conv2d", dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)),
    ("conv1d", dict(padding="same", dilation=2)),
    ("conv_transpose2d", dict(stride=2, padding=1, output_padding=(1, 0), groups=2)),
    ("conv_transpose2d", dict(stride=1, output_padding=1, dilation=2)),
]


def _gg_inputs(name, kw, g):
    """Small on purpose: gradgradcheck differentiates the backward numerically."""
    nd = 1 if name.endswith("1d") else 2
    groups = kw.get("groups", 1)
    x = torch.randn((1, 2) + (4, 3)[:nd], generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((2, 2 // groups) + (2, 2)[:nd], generator=g, dtype=torch.float64,
                    requires_grad=True)
    return x, w


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name,kw", GG_CASES)
def test_gradgradcheck_float64(name, kw):
    x, w = _gg_inputs(name, kw, _gen(11))
    K = w.shape[0] if not name.startswith("conv_transpose") else w.shape[1] * kw.get("groups", 1)
    b = torch.randn(K, generator=_gen(12), dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: getattr(gt, name)(x, w, b, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_penalty_matches_native():
    """create_graph=True: a WGAN-style penalty ||d out / d x||^2, differentiated again."""
    g = _gen(13)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    res = []
    for conv in (gt.conv2d, F.conv2d):
        y = torch.tanh(conv(x, w, None, 1, 1)).sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        res.append(torch.autograd.grad(gx.square().sum(), (x, w)))
    for a, e in zip(*res):
        assert (a - e).abs().max() <= 1e-12 * e.abs().max()


def test_torch_func_grad_vjp_jacrev():
    g = _gen(14)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    kw = dict(stride=2, padding=1, groups=2)
    ours = lambda x, w: torch.sin(gt.conv2d(x, w, **kw))  # noqa: E731
    ref = lambda x, w: torch.sin(F.conv2d(x, w, **kw))  # noqa: E731

    def close(a, e):
        return (a - e).abs().max() <= 1e-12 * e.abs().max()

    for argnums in (0, 1, (0, 1)):
        a = torch.func.grad(lambda x, w: ours(x, w).square().sum(), argnums=argnums)(x, w)
        e = torch.func.grad(lambda x, w: ref(x, w).square().sum(), argnums=argnums)(x, w)
        for ai, ei in zip(a if isinstance(a, tuple) else (a,), e if isinstance(e, tuple) else (e,)):
            assert close(ai, ei)
    y, vjp = torch.func.vjp(ours, x, w)
    y_r, vjp_r = torch.func.vjp(ref, x, w)
    assert close(y, y_r)
    ct = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, e in zip(vjp(ct), vjp_r(ct)):
        assert close(a, e)
    xs = x[:1, :, :3, :3]
    assert close(torch.func.jacrev(ours, argnums=1)(xs, w),
                 torch.func.jacrev(ref, argnums=1)(xs, w))
    # a Hessian-vector product: grad of grad
    loss = lambda w: ours(x, w).square().sum()  # noqa: E731
    loss_r = lambda w: ref(x, w).square().sum()  # noqa: E731
    v = torch.randn(w.shape, generator=g, dtype=torch.float64)
    hvp = torch.func.grad(lambda w: (torch.func.grad(loss)(w) * v).sum())(w)
    hvp_r = torch.func.grad(lambda w: (torch.func.grad(loss_r)(w) * v).sum())(w)
    assert close(hvp, hvp_r)


def test_vmap_over_a_batch_of_weights():
    g = _gen(15)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    ws = torch.randn(4, 5, 3, 3, 3, generator=g, dtype=torch.float64)
    y = torch.vmap(lambda w: gt.conv2d(x, w, padding=1))(ws)
    y_r = torch.stack([F.conv2d(x, w, padding=1) for w in ws])
    assert (y - y_r).abs().max() <= 1e-12 * y_r.abs().max()


def test_opcheck_operators():
    g = _gen(16)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    geom = ([2, 1], [1, 0], [1, 1], [1, 2], 2)
    y = torch.ops.gpuconv.conv(x, w, b, *geom)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wt = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    tgeom = ([2, 1], [1, 0], [1, 0], [1, 0], [1, 1], 2)   # stride lo hi output_padding dil groups
    yt = torch.randn(torch.ops.gpuconv.conv_transpose(x, wt, None, *tgeom).shape, generator=g,
                     dtype=torch.float64)
    cases = [
        (torch.ops.gpuconv.conv.default, (x, w, b) + geom),
        (torch.ops.gpuconv.conv_input_grad.default, (gy, w, list(x.shape)) + geom),
        (torch.ops.gpuconv.conv_weight_grad.default, (x, gy, list(w.shape)) + geom),
        (torch.ops.gpuconv.conv_transpose.default, (x, wt, None) + tgeom),
        (torch.ops.gpuconv.conv_transpose_input_grad.default, (yt, wt, list(x.shape)) + tgeom),
        (torch.ops.gpuconv.conv_transpose_weight_grad.default, (x, yt, list(wt.shape)) + tgeom),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- autocast, layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_as_native(dtype):
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    g = _gen(17)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2))
    ours = gt.convert(copy.deepcopy(m))
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        y_r = m(x)
        y = ours(x)
        mixed = gt.conv2d(x.to(dtype), m[0].weight, m[0].bias, padding=1)   # half x, f32 w
        mixed_r = F.conv2d(x.to(dtype), m[0].weight, m[0].bias, padding=1)
        d = gt.conv2d(x.double(), m[0].weight.double())                     # float64 stays
    assert y.dtype == y_r.dtype == dtype and mixed.dtype == mixed_r.dtype == dtype
    assert d.dtype == torch.float64
    truth = m.double()(x.double())
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    err, err_r = (y.double() - truth).abs().max(), (y_r.double() - truth).abs().max()
    assert err <= max(2 * err_r, 8 * eps * truth.abs().max())
    y.float().sum().backward()
    assert ours[0].weight.grad.dtype == torch.float32


def test_channels_last_in_channels_last_out():
    g = _gen(18)
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64).to(memory_format=cl)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    for a, b in ((x, w), (x.contiguous(), w.to(memory_format=cl))):
        y, y_r = gt.conv2d(a, b, padding=1), F.conv2d(a, b, padding=1)
        assert y.is_contiguous(memory_format=cl) == y_r.is_contiguous(memory_format=cl) is True
        assert (y - y_r).abs().max() <= 1e-12 * y_r.abs().max()
    xt = x.detach().requires_grad_()
    wt = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    y = gt.conv_transpose2d(xt, wt, stride=2)
    assert y.is_contiguous(memory_format=cl)
    (gx,) = torch.autograd.grad(y, xt, torch.ones_like(y))
    (gx_r,) = torch.autograd.grad(F.conv_transpose2d(xt, wt, stride=2), xt, torch.ones_like(y))
    assert (gx - gx_r).abs().max() <= 1e-12 * gx_r.abs().max()
    x5 = torch.randn(1, 2, 3, 4, 5, generator=g).to(memory_format=cl3)
    y5 = gt.conv3d(x5, torch.randn(3, 2, 1, 3, 3, generator=g), padding=(0, 1, 1))
    assert y5.is_contiguous(memory_format=cl3)
    assert gt.conv2d(x.contiguous(), w).is_contiguous()


# ----------------------------------------------------------------------------- threads
def test_no_threads_of_gpuconvs_own_inside_pytorch():
    """Inside the operators gpuconv's GEMMs run on PyTorch's pool (torch.matmul) and
    nothing else starts a thread: after a forward+backward of a model whose
    convolutions are large enough to be chunked, no 'gpuconv' worker exists, while the
    same convolution through the NumPy API (outside PyTorch) does start them."""
    code = r"""
import threading, numpy as np, torch, gpuconv, gpuconv.torch as gt
from gpuconv._cpu import parallel as nb
torch.set_num_threads(2)
calls = []
orig = gt._torch_gemm
def spy(a, b, out):
    calls.append(threading.get_ident()); orig(a, b, out)
nb_gemm = gt._torch_gemm = spy
m = gt.convert(torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(32, 16, 3, padding=1)))
x = torch.randn(4, 16, 48, 48)
m(x).sum().backward()
names = [t.name for t in threading.enumerate()]
assert not any(n.startswith("gpuconv") for n in names), names
assert calls and set(calls) == {threading.get_ident()}, calls
if nb.get_num_threads() > 1:
    gpuconv.conv(np.ones((4, 16, 48, 48), np.float32), np.ones((32, 16, 3, 3), np.float32))
    assert any(t.name.startswith("gpuconv") for t in threading.enumerate())
print("ok")
"""
    env = dict(__import__("os").environ, GPUCONV_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_host_gemm_keeps_float32_exact_and_rejects_lowered_precision():
    g = _gen(19)
    x = torch.randn(2, 8, 9, 9, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g)
    truth = F.conv2d(x.double(), w.double(), padding=1)
    y = gt.conv2d(x, w, padding=1)
    assert (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        calls = []
        orig = gt._torch_gemm
        gt._torch_gemm = lambda *a: calls.append(1) or orig(*a)
        try:
            y2 = gt.conv2d(x, w, padding=1)
        finally:
            gt._torch_gemm = orig
        assert not calls      # PyTorch may round those GEMMs: gpuconv keeps its own
        assert (y2.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    finally:
        torch.set_float32_matmul_precision(prev)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = torch.ones(1, 2, 5, 5)
    w = torch.ones(3, 2, 3, 3)
    with pytest.raises(TypeError, match=r"conv2d: input has dtype int64; supported dtypes are "
                                        r"float16, bfloat16 \(ml_dtypes\), float32 and float64"):
        gt.conv2d(torch.ones(1, 2, 5, 5, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="all arrays must share one dtype, got input=float32, "
                                        "weight=float64"):
        gt.conv2d(x, w.double())
    with pytest.raises(RuntimeError, match=r"different devices \(input on cpu, weight on meta\)"):
        gt.conv2d(x, w.to("meta"))
    with pytest.raises(ValueError, match="channel"):
        gt.conv2d(torch.ones(1, 4, 5, 5), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        gt.conv2d(x, w, torch.ones(4))
    with pytest.raises(ValueError, match="output_padding"):
        gt.conv_transpose2d(x, torch.ones(2, 3, 3, 3), stride=2, output_padding=2)
    # meta tensors only compute shapes (the fake implementations)
    assert gt.conv2d(x.to("meta"), w.to("meta"), stride=2).shape == (1, 3, 2, 2)


def test_cuda_tensor_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # import cupy -> ImportError
    from gpuconv._dispatch import BackendUnavailableError
    with pytest.raises(BackendUnavailableError,
                       match=r"conv2d: input is a CUDA tensor \(cuda:0\) but gpuconv backend "
                             r"'cupy' cannot run here: CuPy is not installed"):
        gt._check_device("gpuconv.torch.conv2d", torch.device("cuda", 0), "input")


def test_readme_pytorch_section_runs():
    """The README's PyTorch blocks (```py, not run by test_readme.py because torch is
    optional) run as written, in order."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Use it from PyTorch"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    ns = {}
    for i, b in enumerate(blocks):
        exec(compile(b, f"README.md PyTorch block {i}", "exec"), ns)
    assert ns["y"].dtype == torch.bfloat16


def test_depthwise_gemms_run_on_pytorchs_pool(monkeypatch):
    """The CPU depthwise band GEMM (the NumPy passes) also goes through the host GEMM hook
    inside PyTorch (so depthwise layers start no multi-threaded BLAS of their own), and
    stays right."""
    import threading
    import gpuconv.torch as gt
    monkeypatch.setenv("GPUCONV_CPU_NATIVE", "0")
    calls = []
    orig = gt._torch_gemm

    def spy(a, b, out):
        calls.append(threading.get_ident())
        orig(a, b, out)

    monkeypatch.setattr(gt, "_torch_gemm", spy)
    torch.manual_seed(0)
    native = torch.nn.Conv2d(8, 16, 7, padding=3, groups=8).double()
    m = gt.convert(copy.deepcopy(native))
    x = torch.randn(2, 8, 20, 20, dtype=torch.float64)
    y = m(x)
    assert calls and set(calls) == {threading.get_ident()}
    torch.testing.assert_close(y, native(x), rtol=1e-12, atol=1e-12)


def test_depthwise_native_kernels_inside_pytorch(monkeypatch):
    """With the native depthwise kernels, a depthwise layer inside PyTorch runs them in the
    calling thread (no worker threads, no BLAS), forward and backward, and stays right."""
    import threading
    import gpuconv.torch as gt
    from gpuconv._cpu import native as nat
    monkeypatch.delenv("GPUCONV_CPU_NATIVE", raising=False)
    if nat.library() is None:
        pytest.skip(f"native CPU kernels not usable here: {nat.status()['reason']}")
    calls, gemms = [], []
    real = nat.call
    monkeypatch.setattr(nat, "call", lambda *a, **k: (calls.append((a[0], threading.get_ident())),
                                                      real(*a, **k)))
    orig = gt._torch_gemm
    monkeypatch.setattr(gt, "_torch_gemm", lambda a, b, out: (gemms.append(1), orig(a, b, out)))
    torch.manual_seed(0)
    ref_m = torch.nn.Conv2d(8, 16, 7, padding=3, groups=8).double()
    m = gt.convert(copy.deepcopy(ref_m))
    x = torch.randn(2, 8, 20, 20, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.square().sum().backward()
    ref_m(x2).square().sum().backward()
    assert {c[0] for c in calls} == {"forward", "input_grad", "weight_grad"}
    assert {c[1] for c in calls} == {threading.get_ident()} and not gemms
    torch.testing.assert_close(y, ref_m(x2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, ref_m.weight.grad, rtol=1e-12, atol=1e-12)
