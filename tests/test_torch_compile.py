"""torch.compile traces gpuconv's operators as graph nodes (no graph breaks) and the
compiled model matches eager PyTorch.  Skipped without torch; the inductor case also
needs a C++ compiler (as torch.compile on the CPU always does)."""
from __future__ import annotations

import copy
import shutil

import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuconv.torch")
nn = torch.nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)  # BN next
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.c1d = nn.Conv1d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.up(torch.relu(self.g(torch.relu(self.bn(self.c1(x))))))
        return self.c1d(y.flatten(2))


def _recording_backend(seen):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def rec(tag):
        def compiler(gm, example_inputs):
            seen[tag] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=rec("fw"), bw_compiler=rec("bw"))


def _run(model, x):
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {k.replace("_orig_mod.", ""): p.grad.clone()
                        for k, p in model.named_parameters()}


def _compare(eager, compiled, x, tol):
    y_e, g_e = _run(eager, x)
    y_c, g_c = _run(compiled, x)
    assert (y_c - y_e).abs().max() <= tol * y_e.abs().max()
    for k in g_e:
        assert (g_c[k] - g_e[k]).abs().max() <= tol * g_e[k].abs().max(), k


def test_compile_aot_fullgraph_records_gpuconv_operators():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = gt.convert(Net().double())
    model = copy.deepcopy(eager)
    seen = {}
    compiled = torch.compile(model, backend=_recording_backend(seen), fullgraph=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _compare(eager, compiled, x, 1e-12)
    ops = torch.ops.gpuconv
    assert seen["fw"].count(ops.conv.default) == 3
    assert seen["fw"].count(ops.conv_transpose.default) == 1
    for op in (ops.conv_input_grad, ops.conv_weight_grad, ops.conv_transpose_input_grad,
               ops.conv_transpose_weight_grad):
        assert op.default in seen["bw"], op
    assert torch.ops.aten.convolution.default not in seen["fw"] + seen["bw"]


def test_compile_aot_eager_matches_native_model():
    torch._dynamo.reset()
    torch.manual_seed(1)
    native = Net()
    compiled = torch.compile(gt.convert(copy.deepcopy(native)), backend="aot_eager",
                             fullgraph=True)
    _compare(native, compiled, torch.randn(2, 3, 8, 8), 1e-4)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_compile_inductor_default_backend():
    torch._dynamo.reset()
    torch.manual_seed(2)
    native = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                           nn.ConvTranspose2d(4, 2, 2, stride=2))
    compiled = torch.compile(gt.convert(copy.deepcopy(native)), fullgraph=True)
    _compare(native, compiled, torch.randn(1, 2, 5, 5), 1e-4)


def test_compile_under_autocast():
    torch._dynamo.reset()
    pytest.importorskip("ml_dtypes")
    w = torch.randn(4, 3, 3, 3)
    f = torch.compile(lambda x: gt.conv2d(x, w, padding=1), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
        y_r = torch.nn.functional.conv2d(x, w, padding=1)
    assert y.dtype == y_r.dtype == torch.bfloat16
    assert (y.float() - y_r.float()).abs().max() <= 2 ** -6 * y_r.float().abs().max()
