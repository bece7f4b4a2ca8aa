"""PyTorch interop: gpuconv convolutions as differentiable ``torch`` functions.

Optional: PyTorch is not a dependency of gpuconv and ``import gpuconv`` never
imports it; importing *this* module does (and raises ImportError without it).

Every function here is a ``torch.autograd.Function`` whose forward and backward
call gpuconv.  Tensors cross over without copies through DLPack: CPU tensors
become NumPy arrays (``np.from_dlpack``, run by gpuconv's NumPy backend), CUDA
tensors become CuPy arrays (``cupy.from_dlpack``, run by gpuconv's CUDA
kernels on PyTorch's current stream), and results come back with
``torch.from_dlpack``.  Non-contiguous tensors are made contiguous first
(``Tensor.contiguous()``, a copy only when needed).

The signatures mirror ``torch.nn.functional``:

>>> import torch, gpuconv.torch as gt
>>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
>>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
>>> y = gt.conv2d(x, w, padding="same")
>>> y.sum().backward()
>>> torch.allclose(y, torch.nn.functional.conv2d(x, w, padding="same"))
True
>>> x.grad.shape, w.grad.shape
(torch.Size([2, 3, 8, 8]), torch.Size([4, 3, 3, 3]))

Supported dtypes: float16, bfloat16 (needs ml_dtypes on CPU), float32,
float64.  Double backward (gradients of gradients) is not supported.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import _api

__all__ = ["conv", "conv1d", "conv2d", "conv3d", "conv_transpose", "conv_transpose2d",
           "to_array", "from_array"]


# ----------------------------------------------------------------------------- DLPack bridge
def _bf16_numpy():
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("gpuconv.torch: bfloat16 CPU tensors need the ml_dtypes package "
                        "(pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def to_array(t: "torch.Tensor"):
    """A zero-copy NumPy (CPU tensor) or CuPy (CUDA tensor) view of ``t``.

    ``t`` is detached and made contiguous first (a copy only if it was not).
    bfloat16 tensors travel as int16 bits and are viewed as ``ml_dtypes.bfloat16``.
    Raises TypeError for tensors on other devices.

    >>> import torch, gpuconv.torch as gt
    >>> gt.to_array(torch.arange(3.0))
    array([0., 1., 2.], dtype=float32)
    """
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)
    if t.device.type == "cpu":
        a = np.from_dlpack(t)
        return a.view(_bf16_numpy()) if bf16 else a
    if t.device.type == "cuda":
        import cupy
        a = cupy.from_dlpack(t)
        return a.view(_bf16_numpy()) if bf16 else a
    raise TypeError(f"gpuconv.torch: tensors on device {t.device} are not supported "
                    f"(CPU tensors run on NumPy, CUDA tensors on CuPy)")


def from_array(a) -> "torch.Tensor":
    """A zero-copy tensor over a NumPy or CuPy array (inverse of :func:`to_array`).

    >>> import numpy as np, gpuconv.torch as gt
    >>> gt.from_array(np.ones(2, np.float32))
    tensor([1., 1.])
    """
    if a.dtype.name == "bfloat16":
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def _context(t):
    """Run gpuconv's CuPy work on PyTorch's current stream and device; nothing on CPU."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    stack = contextlib.ExitStack()
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stack.enter_context(cupy.cuda.Device(dev))
    stream = torch.cuda.current_stream(dev)
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, dev))
    return stack


def _check_devices(op, **tensors):
    for n, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"gpuconv.torch.{op}: {n} must be a torch.Tensor, got "
                            f"{type(t).__module__}.{type(t).__name__}")
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise RuntimeError(f"gpuconv.torch.{op}: tensors on different devices ({desc})")


# ----------------------------------------------------------------------------- autograd
def _save(ctx, x, w, b, kw):
    ctx.save_for_backward(x, w)
    ctx.kw = kw
    ctx.has_bias = b is not None


def _backward(ctx, gy, input_grad, weight_grad):
    """(gx, gw, gb) of a convolution-like op from its gradient functions (None where
    autograd does not need one)."""
    x, w = ctx.saved_tensors
    gx = gw = gb = None
    with _context(gy):
        g = to_array(gy)
        if ctx.needs_input_grad[0]:
            gx = from_array(input_grad(g, to_array(w), tuple(x.shape), **ctx.kw))
        if ctx.needs_input_grad[1]:
            gw = from_array(weight_grad(to_array(x), g, tuple(w.shape), **ctx.kw))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = from_array(_api.conv_bias_grad(g))
    return gx, gw, gb


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        with _context(x):
            y = _api.conv(to_array(x), to_array(w), None if b is None else to_array(b), **kw)
            out = from_array(y)
        _save(ctx, x, w, b, kw)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        return _backward(ctx, gy, _api.conv_input_grad, _api.conv_weight_grad) + (None,) * 4


class _ConvTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, output_padding, dilation, groups):
        kw = dict(stride=stride, padding=padding, output_padding=output_padding,
                  dilation=dilation, groups=groups)
        with _context(x):
            y = _api.conv_transpose(to_array(x), to_array(w), None if b is None else to_array(b),
                                    **kw)
            out = from_array(y)
        _save(ctx, x, w, b, kw)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        return (_backward(ctx, gy, _api.conv_transpose_input_grad,
                          _api.conv_transpose_weight_grad) + (None,) * 5)


# ----------------------------------------------------------------------------- functional API
def _batch(op, x, nd):
    if x.dim() == nd + 2:
        return x, True
    if x.dim() == nd + 1:
        return x.unsqueeze(0), False
    raise ValueError(f"gpuconv.torch.{op}: input must be (N, C, *spatial) or (C, *spatial) with "
                     f"{nd} spatial dims, got shape {tuple(x.shape)}")


def _norm(v):
    """torch accepts lists; gpuconv wants ints/tuples (hashable, as saved in ctx)."""
    if isinstance(v, (list, tuple)):
        return tuple(_norm(e) for e in v)
    return v


def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """N-d convolution (1-3 spatial dims, from ``weight``'s rank), differentiable.

    ``input`` ``(N, C, *spatial)`` (or unbatched ``(C, *spatial)``), ``weight``
    ``(K, C // groups, *kernel)``, ``bias`` ``(K,)`` or None: tensors on one
    device (CPU or CUDA) with one dtype.  ``stride``/``dilation``: int or
    per-dim tuple; ``padding``: int, per-dim tuple, per-dim ``(lo, hi)``
    pairs, ``'valid'`` or ``'same'``.  Returns ``(N, K, *out)`` like
    ``torch.nn.functional.conv{1,2,3}d``.  Raises ValueError/TypeError as
    :func:`gpuconv.conv` does, RuntimeError for tensors on different devices.

    >>> import torch, gpuconv.torch as gt
    >>> gt.conv(torch.ones(1, 2, 5, 5, 5), torch.ones(3, 2, 3, 3, 3)).shape
    torch.Size([1, 3, 3, 3, 3])
    """
    _check_devices("conv", input=input, weight=weight, bias=bias)
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"gpuconv.torch.conv: weight must be (K, C/groups, *kernel) with 1-3 "
                         f"kernel dims, got shape {tuple(weight.shape)}")
    x, batched = _batch("conv", input, nd)
    y = _Conv.apply(x, weight, bias, _norm(stride), _norm(padding), _norm(dilation), groups)
    return y if batched else y.squeeze(0)


def _rank_checked(name, nd):
    def f(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        _check_devices(name, input=input, weight=weight, bias=bias)
        if weight.dim() != nd + 2:
            raise ValueError(f"gpuconv.torch.{name}: weight must be (K, C/groups, *kernel) with "
                             f"{nd} kernel dims, got shape {tuple(weight.shape)}")
        return conv(input, weight, bias, stride, padding, dilation, groups)
    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""{nd}-d convolution, differentiable; ``torch.nn.functional.{name}``'s signature.

    ``input`` ``(N, C, *{nd} spatial)`` or unbatched; ``weight``
    ``(K, C // groups, *{nd} kernel dims)``; see :func:`conv` for the rest.

    >>> import torch, gpuconv.torch as gt
    >>> gt.{name}(torch.ones((1, 2) + (6,) * {nd}), torch.ones((4, 2) + (3,) * {nd}),
    ...        stride=2).shape[1:3]
    torch.Size([4, 2])
    """
    return f


conv1d = _rank_checked("conv1d", 1)
conv2d = _rank_checked("conv2d", 2)
conv3d = _rank_checked("conv3d", 3)


def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    """N-d transposed convolution, differentiable; ``conv_transpose{1,2,3}d``'s signature.

    ``input`` ``(N, C_in, *L)`` (or unbatched), ``weight``
    ``(C_in, C_out // groups, *kernel)``, ``bias`` ``(C_out,)``.  Note PyTorch's
    argument order: ``groups`` comes before ``dilation``.  ``padding``: int,
    per-dim ints or ``(lo, hi)`` pairs (no strings).  Output per dim:
    ``(L - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1``.

    >>> import torch, gpuconv.torch as gt
    >>> gt.conv_transpose(torch.ones(1, 4, 5, 5), torch.ones(4, 2, 3, 3), stride=2,
    ...                   padding=1, output_padding=1).shape
    torch.Size([1, 2, 10, 10])
    """
    _check_devices("conv_transpose", input=input, weight=weight, bias=bias)
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"gpuconv.torch.conv_transpose: weight must be (C_in, C_out/groups, "
                         f"*kernel) with 1-3 kernel dims, got shape {tuple(weight.shape)}")
    x, batched = _batch("conv_transpose", input, nd)
    y = _ConvTranspose.apply(x, weight, bias, _norm(stride), _norm(padding),
                             _norm(output_padding), _norm(dilation), groups)
    return y if batched else y.squeeze(0)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """2-d transposed convolution, differentiable; see :func:`conv_transpose`.

    >>> import torch, gpuconv.torch as gt
    >>> gt.conv_transpose2d(torch.ones(1, 3, 4, 4), torch.ones(3, 5, 2, 2), stride=2).shape
    torch.Size([1, 5, 8, 8])
    """
    _check_devices("conv_transpose2d", input=input, weight=weight, bias=bias)
    if weight.dim() != 4:
        raise ValueError(f"gpuconv.torch.conv_transpose2d: weight must be (C_in, C_out/groups, "
                         f"kh, kw), got shape {tuple(weight.shape)}")
    return conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
