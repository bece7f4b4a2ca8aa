"""PyTorch interop: gpuconv convolutions as PyTorch operators, functions and modules.

Optional: PyTorch is not a dependency of gpuconv and ``import gpuconv`` never
imports it; importing *this* module does (and raises ImportError without it).

Three layers, each usable on its own:

* **Operators** registered with ``torch.library.custom_op`` in the ``gpuconv``
  namespace (``torch.ops.gpuconv.conv``, ``conv_input_grad``,
  ``conv_weight_grad``, ``conv_transpose``, ``conv_transpose_input_grad``,
  ``conv_transpose_weight_grad``), each with a fake (meta)
  implementation, so ``torch.compile`` / ``torch.export`` trace them as single
  graph nodes, a vmap rule and an autograd formula whose backward is written
  with the same operators.  The public functions reach them through
  ``setup_context``-style ``torch.autograd.Function`` s (custom-op autograd
  does not support ``torch.func`` in this PyTorch), so gradients of gradients
  work (``create_graph=True``, ``gradgradcheck``) and ``torch.func.grad`` /
  ``vjp`` / ``jacrev`` / ``vmap`` apply.
* **Functions** with ``torch.nn.functional``'s signatures: :func:`conv1d`,
  :func:`conv2d`, :func:`conv3d`, :func:`conv_transpose1d`,
  :func:`conv_transpose2d`, :func:`conv_transpose3d` (and the rank-generic
  :func:`conv`, :func:`conv_transpose`).  They validate, apply autocast as
  native convolutions do (float32 tensors are cast to the autocast dtype) and
  call the operators.
* **Modules** :class:`Conv1d` ... :class:`ConvTranspose3d`: subclasses of the
  ``torch.nn`` classes (same constructor, parameters, ``state_dict`` keys,
  ``padding_mode``, ``extra_repr``) whose forward runs gpuconv, and
  :func:`convert`, which switches every ``torch.nn`` convolution of a model to
  them in place.

Tensors cross over without copies through DLPack: CPU tensors become NumPy
arrays (run by gpuconv's NumPy backend), CUDA tensors become CuPy arrays (run by
gpuconv's CUDA kernels on PyTorch's current stream).  Non-contiguous inputs are
made contiguous first; results are channels_last when an input is (as native).

>>> import torch, gpuconv.torch as gt
>>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
>>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
>>> y = gt.conv2d(x, w, padding="same")
>>> y.sum().backward()
>>> torch.allclose(y, torch.nn.functional.conv2d(x, w, padding="same"))
True
>>> x.grad.shape, w.grad.shape
(torch.Size([2, 3, 8, 8]), torch.Size([4, 3, 3, 3]))

Supported dtypes: float16, bfloat16 (needs ml_dtypes on CPU), float32, float64.

Threads: on the CPU, inside these operators gpuconv starts no threads of its
own: its GEMMs, large copies and col2im adds run on PyTorch's thread pool
(``torch.get_num_threads()`` threads), the rest in the calling thread (see the
notes above ``_torch_gemm`` and ``_torch_copy``).  Eager CPU calls skip the
dispatcher (see ``_eager_cpu``).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _api
from . import _geometry as geo

__all__ = ["conv", "conv1d", "conv2d", "conv3d",
           "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
           "convert", "to_array", "from_array"]


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
        a = t.numpy()  # the same zero-copy view as np.from_dlpack, at a third of the cost
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


def _arr(t):
    return None if t is None else to_array(t)


# ----------------------------------------------------------------------------- threads
# PyTorch's intra-op pool is OpenMP (libgomp in the official CPU wheels): after each
# operator its threads spin-wait for the next one (GOMP_SPINCOUNT, fixed when torch
# is imported).  gpuconv's NumPy backend, left alone, runs chunks on its own worker
# threads and some GEMMs on OpenBLAS's threads, which spin-wait too (up to
# ~0.1 s).  Three pools on the same cores fight: each parallel region waits for
# its descheduled worker, and PyTorch's next operator for gpuconv's spinning
# threads.  So inside these operators gpuconv hands its GEMMs (the bulk of the
# work) to PyTorch -- torch.matmul on zero-copy views, i.e. MKL on PyTorch's own
# OpenMP threads, torch.get_num_threads() of them -- and its large copies too (below),
# the rest in the calling thread: no thread of gpuconv's or OpenBLAS's is started,
# whatever torch.set_num_threads says.  Only for float32 with
# torch.get_float32_matmul_precision() == "highest" (else PyTorch could round the
# GEMM to bfloat16/TF32) and float64; other GEMMs stay on NumPy.

_GEMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# Two GEMM shapes are slow through torch.matmul here (MKL splitting one skinny GEMM
# over its threads; measured on the ResNet layers, benchmarks/RESULTS.md):
# * a narrow result (N <= 16 columns: deep layers on small images, forward and input
#   gradient, whose weight is the long operand) is 2-3x faster as its transpose
#   b^T a^T into a scratch copied back (a few thousand elements); where a has
#   thousands of rows (the input gradient's C*taps), cut into row blocks, one bmm
#   (PyTorch gives each thread whole GEMMs);
# * a short reduction (K <= 32) into a large result (weight gradients of small
#   images) is 2x faster on NumPy's BLAS, one thread, in the calling thread.
_NARROW_N = 16
_SHORT_K = 32
_SHORT_K_MIN_OUT = 1 << 18


def _torch_gemm(a, b, out):
    if a.dtype in _GEMM_DTYPES and a.dtype == b.dtype == out.dtype and \
            min(a.strides + b.strides + out.strides) >= 0:
        M, K = a.shape[-2:]
        N = b.shape[-1]
        if K <= _SHORT_K and M * N >= _SHORT_K_MIN_OUT and _one_thread_blas():
            with _one_thread_blas()[0]():
                np.matmul(a, b, out=out)
            return
        ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        if N <= _NARROW_N and M >= 8 * N:
            _narrow_gemm(ta, tb, to, M, N)
        else:
            torch.matmul(ta, tb, out=to)
    else:
        np.matmul(a, b, out=out)


def _narrow_gemm(ta, tb, to, M, N):
    """to = ta @ tb for N << M: to^T = tb^T ta^T, ta's rows in P blocks (one bmm)."""
    P = 2 * torch.get_num_threads()
    if ta.dim() == 3 and ta.shape[0] == 1 == tb.shape[0] and M % P == 0 and M // P >= 512:
        # (P, N, M/P) = (N, K) x (P, K, M/P): block p of to^T from rows p*M/P.. of ta
        tmp = torch.bmm(tb[0].t().expand(P, N, tb.shape[1]),
                        ta[0].unflatten(0, (P, M // P)).transpose(1, 2))
        to[0].unflatten(0, (P, M // P)).copy_(tmp.transpose(1, 2))
        return
    tmp = torch.empty(to.shape[:-2] + (N, M), dtype=to.dtype)
    torch.matmul(tb.transpose(-1, -2), ta.transpose(-1, -2), out=tmp)
    to.copy_(tmp.transpose(-1, -2))


_blas1 = []


def _one_thread_blas():
    """[context manager making NumPy's BLAS single-threaded in this thread] where
    OpenBLAS has a thread-local setting, else [] (then no GEMM goes to NumPy's BLAS:
    its own threads would fight PyTorch's)."""
    if not _blas1:
        from ._cpu import parallel as nb
        _blas1.append([nb._ThreadSingleBlas] if nb._blas_local_setters() else [])
    return _blas1[0]


# The large copies (im2col gathers, padding, staging) and col2im adds go to PyTorch's
# pool too: Tensor.copy_ / add_ on zero-copy views, 2-3x faster than NumPy's copies of
# these short strided rows on one core.  Below 2^15 elements PyTorch runs them on one
# thread anyway (its grain size) and NumPy's per-call cost is lower: those stay.
_HOST_COPY_MIN = 1 << 15


def _host_views(dst, src):
    return (dst.dtype == src.dtype and dst.dtype in _GEMM_DTYPES and dst.size >= _HOST_COPY_MIN
            and dst.flags.writeable and src.flags.writeable
            and min(dst.strides + src.strides, default=0) >= 0)


def _torch_copy(dst, src, window=None):
    if not _host_views(dst, src):
        return False
    ts = torch.from_numpy(src)
    if window is not None:
        shape, strides = window
        it = src.itemsize
        if any(st < 0 or st % it for st in strides):
            return False
        ts = ts.as_strided(shape, [st // it for st in strides], ts.storage_offset())
    torch.from_numpy(dst).copy_(ts)
    return True


def _torch_add(dst, src):
    if not _host_views(dst, src):
        return False
    torch.from_numpy(dst).add_(torch.from_numpy(src))
    return True


def _cpu_threads():
    from ._cpu import parallel as nb
    if torch.get_float32_matmul_precision() != "highest":
        return nb.host_gemm(_numpy_only_gemm)
    return nb.host_gemm(_torch_gemm, _torch_copy, _torch_add)


def _numpy_only_gemm(a, b, out):
    # still no threads of gpuconv's own; OpenBLAS single call (threads as NumPy's BLAS has)
    np.matmul(a, b, out=out)


def _context(t):
    """CUDA: gpuconv's CuPy work on PyTorch's current stream and device; CPU: its GEMMs
    on PyTorch's thread pool (see the note above)."""
    if t.device.type != "cuda":
        return _cpu_threads() if t.device.type == "cpu" else contextlib.nullcontext()
    import cupy
    stack = contextlib.ExitStack()
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stack.enter_context(cupy.cuda.Device(dev))
    stream = torch.cuda.current_stream(dev)
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, dev))
    return stack


# ----------------------------------------------------------------------------- layouts
def _memory_format(*tensors):
    """channels_last(_3d) when any operand is channels_last (and not plainly contiguous),
    as PyTorch's CPU/cuDNN convolutions decide; else contiguous."""
    for t in tensors:
        if t is None:
            continue
        if t.dim() == 4 and not t.is_contiguous() and \
                t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.dim() == 5 and not t.is_contiguous() and \
                t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _out(a, fmt):
    t = from_array(a)
    return t if fmt == torch.contiguous_format else t.contiguous(memory_format=fmt)


def _empty(shape, like, fmt):
    return torch.empty(list(shape), dtype=like.dtype, device=like.device, memory_format=fmt)


# ----------------------------------------------------------------------------- operators
# Geometry travels as explicit per-dim lists: stride, pad_lo, pad_hi, dilation, groups
# (the functions below resolve 'same'/'valid' and (lo, hi) pairs first).

def _custom_op(name, impl):
    return torch.library.custom_op(name, mutates_args=())(impl)

def _kw(stride, pad_lo, pad_hi, dilation, groups):
    return dict(stride=tuple(stride), padding=tuple(zip(pad_lo, pad_hi)),
                dilation=tuple(dilation), groups=groups)


def _conv_out_spatial(in_spatial, kernel, stride, pad_lo, pad_hi, dilation):
    return [(l + a + b - d * (k - 1) - 1) // s + 1
            for l, k, s, a, b, d in zip(in_spatial, kernel, stride, pad_lo, pad_hi, dilation)]


def _conv_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
               pad_lo: List[int], pad_hi: List[int], dilation: List[int], groups: int) -> Tensor:
    with _context(x):
        y = _api.conv(to_array(x), to_array(weight), _arr(bias),
                      **_kw(stride, pad_lo, pad_hi, dilation, groups))
        return _out(y, _memory_format(x, weight))


_conv_op = _custom_op("gpuconv::conv", _conv_impl)


@_conv_op.register_fake
def _(x, weight, bias, stride, pad_lo, pad_hi, dilation, groups):
    out = _conv_out_spatial(x.shape[2:], weight.shape[2:], stride, pad_lo, pad_hi, dilation)
    return _empty([x.shape[0], weight.shape[0]] + out, x, _memory_format(x, weight))


def _input_grad_impl(grad_out: Tensor, weight: Tensor, input_shape: List[int], stride: List[int],
                     pad_lo: List[int], pad_hi: List[int], dilation: List[int],
                     groups: int) -> Tensor:
    with _context(grad_out):
        gx = _api.conv_input_grad(to_array(grad_out), to_array(weight), tuple(input_shape),
                                  **_kw(stride, pad_lo, pad_hi, dilation, groups))
        return _out(gx, _memory_format(grad_out, weight))


_input_grad_op = _custom_op("gpuconv::conv_input_grad", _input_grad_impl)


@_input_grad_op.register_fake
def _(grad_out, weight, input_shape, stride, pad_lo, pad_hi, dilation, groups):
    return _empty(input_shape, grad_out, _memory_format(grad_out, weight))


def _weight_grad_impl(x: Tensor, grad_out: Tensor, weight_shape: List[int], stride: List[int],
                      pad_lo: List[int], pad_hi: List[int], dilation: List[int],
                      groups: int) -> Tensor:
    with _context(x):
        gw = _api.conv_weight_grad(to_array(x), to_array(grad_out), tuple(weight_shape),
                                   **_kw(stride, pad_lo, pad_hi, dilation, groups))
        return from_array(gw)


_weight_grad_op = _custom_op("gpuconv::conv_weight_grad", _weight_grad_impl)


@_weight_grad_op.register_fake
def _(x, grad_out, weight_shape, stride, pad_lo, pad_hi, dilation, groups):
    return _empty(weight_shape, x, torch.contiguous_format)


def _transpose_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                    pad_lo: List[int], pad_hi: List[int], output_padding: List[int],
                    dilation: List[int], groups: int) -> Tensor:
    with _context(x):
        y = _api.conv_transpose(to_array(x), to_array(weight), _arr(bias), stride=tuple(stride),
                                padding=tuple(zip(pad_lo, pad_hi)),
                                output_padding=tuple(output_padding), dilation=tuple(dilation),
                                groups=groups)
        return _out(y, _memory_format(x, weight))


_transpose_op = _custom_op("gpuconv::conv_transpose", _transpose_impl)


def _transpose_out_spatial(in_spatial, kernel, stride, pad_lo, pad_hi, output_padding, dilation):
    return [(l - 1) * s - a - b + d * (k - 1) + o + 1 for l, k, s, a, b, o, d in
            zip(in_spatial, kernel, stride, pad_lo, pad_hi, output_padding, dilation)]


@_transpose_op.register_fake
def _(x, weight, bias, stride, pad_lo, pad_hi, output_padding, dilation, groups):
    out = _transpose_out_spatial(x.shape[2:], weight.shape[2:], stride, pad_lo, pad_hi,
                                 output_padding, dilation)
    return _empty([x.shape[0], weight.shape[1] * groups] + out, x, _memory_format(x, weight))


# The transposed convolution's own gradients (gpuconv.conv_transpose_input_grad /
# conv_transpose_weight_grad), T(x, w) = A_w^T x':
#   input grad  TI(gy, w)  = crop(A_w gy)         weight grad  TW(x, gy) = wgrad(gy, x')
# (x' = x zero-extended where output_padding >= stride, allowed when < dilation).
def _transpose_kw(stride, pad_lo, pad_hi, output_padding, dilation, groups):
    return dict(stride=tuple(stride), padding=tuple(zip(pad_lo, pad_hi)),
                output_padding=tuple(output_padding), dilation=tuple(dilation), groups=groups)


def _t_input_grad_impl(grad_out: Tensor, weight: Tensor, input_shape: List[int],
                       stride: List[int], pad_lo: List[int], pad_hi: List[int],
                       output_padding: List[int], dilation: List[int], groups: int) -> Tensor:
    with _context(grad_out):
        kw = _transpose_kw(stride, pad_lo, pad_hi, output_padding, dilation, groups)
        gx = _api.conv_transpose_input_grad(to_array(grad_out), to_array(weight),
                                            tuple(input_shape), **kw)
        return _out(gx, _memory_format(grad_out, weight))


_t_input_grad_op = _custom_op("gpuconv::conv_transpose_input_grad", _t_input_grad_impl)


@_t_input_grad_op.register_fake
def _(grad_out, weight, input_shape, stride, pad_lo, pad_hi, output_padding, dilation, groups):
    return _empty(input_shape, grad_out, _memory_format(grad_out, weight))


def _t_weight_grad_impl(x: Tensor, grad_out: Tensor, weight_shape: List[int],
                        stride: List[int], pad_lo: List[int], pad_hi: List[int],
                        output_padding: List[int], dilation: List[int], groups: int) -> Tensor:
    with _context(x):
        kw = _transpose_kw(stride, pad_lo, pad_hi, output_padding, dilation, groups)
        gw = _api.conv_transpose_weight_grad(to_array(x), to_array(grad_out), tuple(weight_shape),
                                             **kw)
        return from_array(gw)


_t_weight_grad_op = _custom_op("gpuconv::conv_transpose_weight_grad", _t_weight_grad_impl)


@_t_weight_grad_op.register_fake
def _(x, grad_out, weight_shape, stride, pad_lo, pad_hi, output_padding, dilation, groups):
    return _empty(weight_shape, x, torch.contiguous_format)


# ----------------------------------------------------------------------------- autograd
# Every backward is written with the operators above (and differentiable torch ops),
# so it is itself differentiable: the convolution is bilinear in (x, w) and
#   conv:          y  = A_w x       gx = A_w^T gy  (input_grad)   gw = wgrad(x, gy)
#   input_grad:    gx = A_w^T gy    d/dgy: A_w ggx (conv)         d/dw: wgrad(ggx, gy)
#   weight_grad:   gw = wgrad(x,gy) d/dx:  A_ggw^T gy             d/dgy: A_ggw x
#   conv_transpose y  = T(x, w)     d/dx:  TI(gy, w)              d/dw: TW(x, gy)
#   TI (its dgrad) gx = TI(gy, w)   d/dgy: T(ggx, w)              d/dw: TW(ggx, gy)
#   TW (its wgrad) gw = TW(x, gy)   d/dx:  TI(gy, ggw)            d/dgy: T(x, ggw)

def _bias_grad(gy):
    return gy.sum(dim=[0] + list(range(2, gy.dim())))


def _call(fn, name, *args):
    """The differentiable Function when a graph is being built (an operand requires
    grad: forward passes, create_graph=True backward passes, torch.func), else the bare
    operator ``name`` (what inference and torch.compile's backward graphs record)."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        if _base_apply is not None and _eager_cpu(args):
            # what fn.apply does with these arguments (no functorch transform, positional
            # arguments, no defaults) less its inspect.signature binding, 20 us a call
            return _base_apply(fn)(*_unwrap_dead(args))
        return fn.apply(*args)
    return _run(name, *args)


try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead

    def _base_apply(fn):
        return super(torch.autograd.Function, fn).apply
except ImportError:  # another PyTorch: Function.apply
    _base_apply = None


# Eager calls on plain CPU tensors skip the dispatcher: the operator's Python
# implementation runs directly.  Going through the registered operator costs about
# 0.15 ms a call here (its autograd and dynamo-disable wrappers, the redispatch),
# as much as a whole small convolution.  Everything else -- torch.compile / export
# tracing, fake or meta tensors, tensor subclasses, dispatch or function modes
# (FlopCounterMode ...), vmap and the other functorch transforms, jit tracing --
# goes through the operator, so those see the same graph node as before.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_cpu(args):
    if torch.compiler.is_compiling():   # first: dynamo folds it, never traces the rest
        return False
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.device.type != "cpu"):
            return False
    C = torch._C
    try:
        return not (C._are_functorch_transforms_active() or C._len_torch_dispatch_stack()
                    or C._is_torch_function_mode_enabled() or C._get_tracing_state() is not None)
    except AttributeError:  # another PyTorch: always the operator
        return False


def _run(name, *args):
    """Operator ``name`` (a key of ``_OPS``) on args: its implementation directly for
    eager CPU calls, else through the dispatcher."""
    if _eager_cpu(args):
        return _IMPLS[name](*args)
    return _OPS[name](*args)


class _GradFn(torch.autograd.Function):
    """Shared context of the gradient Functions: inputs (a, b, shape, *geom); a and b
    are saved for their backward."""
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, _, *geom = inputs
        ctx.save_for_backward(a, b)
        ctx.geom = geom


def _function_triple(fwd, dgrad, wgrad, name):
    """The differentiable Functions of one convolution family: the convolution, its
    input gradient and its weight gradient, whose backward passes are made of the
    other two (so every order of derivative is a gpuconv call).  The operators are named
    (keys of ``_OPS``) and looked up there (by :func:`_run`), so torch.compile sees them
    as module globals."""

    class Fwd(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, w, b, *geom):
            return _run(fwd, x, w, b, *geom)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, w, b, *geom = inputs
            ctx.save_for_backward(x, w)
            ctx.geom = geom
            ctx.has_bias = b is not None

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            gx = gw = gb = None
            if ctx.needs_input_grad[0]:
                gx = _call(InputGrad, dgrad, gy, w, list(x.shape), *ctx.geom)
            if ctx.needs_input_grad[1]:
                gw = _call(WeightGrad, wgrad, x, gy, list(w.shape), *ctx.geom)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = _bias_grad(gy)
            return (gx, gw, gb) + (None,) * len(ctx.geom)

    class InputGrad(_GradFn):
        @staticmethod
        def forward(gy, w, input_shape, *geom):
            return _run(dgrad, gy, w, input_shape, *geom)

        @staticmethod
        def backward(ctx, ggx):
            gy, w = ctx.saved_tensors
            d_gy = d_w = None
            if ctx.needs_input_grad[0]:
                d_gy = _call(Fwd, fwd, ggx, w, None, *ctx.geom)
            if ctx.needs_input_grad[1]:
                d_w = _call(WeightGrad, wgrad, ggx, gy, list(w.shape), *ctx.geom)
            return (d_gy, d_w, None) + (None,) * len(ctx.geom)

    class WeightGrad(_GradFn):
        @staticmethod
        def forward(x, gy, weight_shape, *geom):
            return _run(wgrad, x, gy, weight_shape, *geom)

        @staticmethod
        def backward(ctx, ggw):
            x, gy = ctx.saved_tensors
            d_x = d_gy = None
            if ctx.needs_input_grad[0]:
                d_x = _call(InputGrad, dgrad, gy, ggw, list(x.shape), *ctx.geom)
            if ctx.needs_input_grad[1]:
                d_gy = _call(Fwd, fwd, x, ggw, None, *ctx.geom)
            return (d_x, d_gy, None) + (None,) * len(ctx.geom)

    for cls, suffix in ((Fwd, ""), (InputGrad, "InputGrad"), (WeightGrad, "WeightGrad")):
        cls.__name__ = cls.__qualname__ = f"_{name}{suffix}Fn"
    return Fwd, InputGrad, WeightGrad


_OPS = {"conv": _conv_op, "input_grad": _input_grad_op, "weight_grad": _weight_grad_op,
        "transpose": _transpose_op, "t_input_grad": _t_input_grad_op,
        "t_weight_grad": _t_weight_grad_op}
_IMPLS = {"conv": _conv_impl, "input_grad": _input_grad_impl, "weight_grad": _weight_grad_impl,
          "transpose": _transpose_impl, "t_input_grad": _t_input_grad_impl,
          "t_weight_grad": _t_weight_grad_impl}
_ConvFn, _InputGradFn, _WeightGradFn = _function_triple(
    "conv", "input_grad", "weight_grad", "Conv")
_TransposeFn, _TInputGradFn, _TWeightGradFn = _function_triple(
    "transpose", "t_input_grad", "t_weight_grad", "Transpose")


# Direct callers of torch.ops.gpuconv.* get the same formulas (custom-op autograd does
# not support torch.func transforms in this PyTorch, hence the Functions above, which
# the public functions use).
_PAIRS = ((_conv_op, _ConvFn), (_input_grad_op, _InputGradFn), (_weight_grad_op, _WeightGradFn),
          (_transpose_op, _TransposeFn), (_t_input_grad_op, _TInputGradFn),
          (_t_weight_grad_op, _TWeightGradFn))
for _op, _fn in _PAIRS:
    _op.register_autograd(_fn.backward, setup_context=_fn.setup_context)


def _vmap_loop(op):
    """vmap rule: one operator call per batch entry, stacked (the batch dimension is
    moved to the front of every batched tensor argument)."""
    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            a = [t.select(d, i) if isinstance(d, int) else t for t, d in zip(args, in_dims)]
            outs.append(op(*a))
        return torch.stack(outs), 0
    return rule


for _op, _ in _PAIRS:
    torch.library.register_vmap(_op, _vmap_loop(_op))


# ----------------------------------------------------------------------------- checks
def _dtype_name(dt):
    return str(dt).replace("torch.", "")


def _check(op, **tensors):
    """Types, devices and supported dtypes, with the array API's messages."""
    op = f"gpuconv.torch.{op}"
    for n, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {n} must be a torch.Tensor, got "
                            f"{type(t).__module__}.{type(t).__name__}")
    present = {n: t for n, t in tensors.items() if t is not None}
    devs = {n: t.device for n, t in present.items()}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise RuntimeError(f"{op}: tensors on different devices ({desc}); gpuconv never copies "
                           f"between devices silently -- move them with .to(device) first")
    for n, t in present.items():
        if _dtype_name(t.dtype) not in geo.DTYPES:      # the one dtype table
            raise TypeError(f"{op}: {n} has dtype {_dtype_name(t.dtype)}; supported dtypes are "
                            f"{geo.DTYPES_TEXT}")
    dev = next(iter(devs.values()))
    _check_device(op, dev, next(iter(devs)))


def _check_same_dtype(op, **tensors):
    """After autocast: one dtype for every operand."""
    present = {n: t for n, t in tensors.items() if t is not None}
    if len({t.dtype for t in present.values()}) > 1:
        desc = ", ".join(f"{n}={_dtype_name(t.dtype)}" for n, t in present.items())
        raise TypeError(f"gpuconv.torch.{op}: all arrays must share one dtype, got {desc}; "
                        f"cast them first")


def _check_device(op, device, name):
    """CPU tensors run on NumPy, CUDA tensors on CuPy (which must be importable);
    meta tensors only compute shapes (the fake implementations)."""
    if device.type in ("cpu", "meta"):
        return
    if device.type != "cuda":
        raise TypeError(f"{op}: {name} is on device {device}; gpuconv runs CPU tensors (NumPy) "
                        f"and CUDA tensors (CuPy) only")
    try:
        import cupy  # noqa: F401
    except Exception as e:
        from ._dispatch import BackendUnavailableError
        raise BackendUnavailableError(
            f"{op}: {name} is a CUDA tensor ({device}) but gpuconv backend 'cupy' cannot run "
            f"here: CuPy is not installed or failed to import ({type(e).__name__}: {e}); "
            f"install cupy-cuda12x or cupy-cuda13x, or move the tensors to the CPU") from None


def _autocast(*tensors):
    """Native convolutions are on autocast's lower-precision list: float32 operands are
    cast to the autocast dtype, other dtypes are left alone."""
    t0 = tensors[0]
    dev = t0.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.dtype == torch.float32 else t for t in tensors)


def _batch(op, x, nd):
    if x.dim() == nd + 2:
        return x, True
    if x.dim() == nd + 1:
        return x.unsqueeze(0), False
    raise ValueError(f"gpuconv.torch.{op}: input must be (N, C, *spatial) or (C, *spatial) with "
                     f"{nd} spatial dims, got shape {tuple(x.shape)}")


def _norm(v):
    """torch accepts lists and torch.Size; gpuconv wants ints/tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(_norm(e) for e in v)
    return v


def _geom(op, x, w, stride, padding, dilation, groups):
    """(stride, pad_lo, pad_hi, dilation, groups) as lists, validated (the forward's
    geometry also checks every shape, with gpuconv's messages)."""
    g = geo.conv_geometry(op, tuple(x.shape), tuple(w.shape), stride=_norm(stride),
                          padding=_norm(padding), dilation=_norm(dilation), groups=groups,
                          dtype=np.float32, names=("input.shape", "weight.shape"),
                          memo=not torch.compiler.is_compiling())
    return [list(g.stride), list(g.pad_lo), list(g.pad_hi), list(g.dilation), g.groups]


# ----------------------------------------------------------------------------- functional API
def _operands(op, nd, input, weight, bias, weight_layout):
    """Checks the tensors and the weight's rank (``nd`` None: from the weight), adds the
    batch axis of an unbatched input, applies autocast and checks one dtype; returns
    (nd, x, weight, bias, batched)."""
    _check(op, input=input, weight=weight, bias=bias)
    if nd is None:
        nd = weight.dim() - 2
        if nd not in (1, 2, 3):
            raise ValueError(f"gpuconv.torch.{op}: weight must be ({weight_layout}, *kernel) "
                             f"with 1-3 kernel dims, got shape {tuple(weight.shape)}")
    elif weight.dim() != nd + 2:
        raise ValueError(f"gpuconv.torch.{op}: weight must be ({weight_layout}, *kernel) with "
                         f"{nd} kernel dims, got shape {tuple(weight.shape)}")
    x, batched = _batch(op, input, nd)
    x, weight, bias = _autocast(x, weight, bias)
    _check_same_dtype(op, input=x, weight=weight, bias=bias)
    return nd, x, weight, bias, batched


def _conv(op, nd, input, weight, bias, stride, padding, dilation, groups):
    nd, x, weight, bias, batched = _operands(op, nd, input, weight, bias, "K, C/groups")
    geom = _geom(f"gpuconv.torch.{op}", x, weight, stride, padding, dilation, groups)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"gpuconv.torch.{op}: bias must have shape ({weight.shape[0]},) (one "
                         f"value per output channel), got bias.shape={tuple(bias.shape)}")
    y = _call(_ConvFn, "conv", x, weight, bias, *geom)
    return y if batched else y.squeeze(0)


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
    return _conv("conv", None, input, weight, bias, stride, padding, dilation, groups)


def _rank_conv(nd):
    name = f"conv{nd}d"

    def f(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return _conv(name, nd, input, weight, bias, stride, padding, dilation, groups)

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


conv1d, conv2d, conv3d = (_rank_conv(n) for n in (1, 2, 3))


def _conv_transpose(op, nd, input, weight, bias, stride, padding, output_padding, groups,
                    dilation):
    nd, x, weight, bias, batched = _operands(op, nd, input, weight, bias,
                                             "C_in, C_out/groups")
    # validates every argument and shape with gpuconv's messages; g is the matching
    # forward convolution (its output is this one's input, possibly extended)
    g, _ = geo.transpose_geometry(f"gpuconv.torch.{op}", tuple(x.shape), tuple(weight.shape),
                                  stride=_norm(stride), padding=_norm(padding),
                                  output_padding=_norm(output_padding), dilation=_norm(dilation),
                                  groups=groups, names=("input.shape", "weight.shape"),
                                  memo=not torch.compiler.is_compiling())
    opad = geo.transpose_output_padding(f"gpuconv.torch.{op}", _norm(output_padding), nd,
                                        g.stride, g.dilation)
    if bias is not None and tuple(bias.shape) != (g.C,):
        raise ValueError(f"gpuconv.torch.{op}: bias must have shape ({g.C},) (one value per "
                         f"output channel), got bias.shape={tuple(bias.shape)}")
    y = _call(_TransposeFn, "transpose", x, weight, bias, list(g.stride), list(g.pad_lo),
              list(g.pad_hi), list(opad), list(g.dilation), g.groups)
    return y if batched else y.squeeze(0)


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
    return _conv_transpose("conv_transpose", None, input, weight, bias, stride, padding,
                           output_padding, groups, dilation)


def _rank_conv_transpose(nd):
    name = f"conv_transpose{nd}d"

    def f(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
          dilation=1):
        return _conv_transpose(name, nd, input, weight, bias, stride, padding, output_padding,
                               groups, dilation)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""{nd}-d transposed convolution, differentiable; see :func:`conv_transpose`.

    ``torch.nn.functional.{name}``'s signature (``groups`` before ``dilation``).

    >>> import torch, gpuconv.torch as gt
    >>> gt.{name}(torch.ones((1, 3) + (4,) * {nd}), torch.ones((3, 5) + (2,) * {nd}),
    ...        stride=2).shape[1:3]
    torch.Size([5, 8])
    """
    return f


conv_transpose1d, conv_transpose2d, conv_transpose3d = (_rank_conv_transpose(n)
                                                        for n in (1, 2, 3))


# ----------------------------------------------------------------------------- modules
_FUNCS = {1: conv1d, 2: conv2d, 3: conv3d}
_TFUNCS = {1: conv_transpose1d, 2: conv_transpose2d, 3: conv_transpose3d}


class _GpuconvConv:
    """forward of torch.nn.Conv{1,2,3}d through gpuconv (padding_mode as torch does it)."""

    _nd = 2

    def _conv_forward(self, input, weight, bias):
        f = _FUNCS[self._nd]
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return f(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return f(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _GpuconvConvTranspose:
    """forward of torch.nn.ConvTranspose{1,2,3}d through gpuconv."""

    _nd = 2

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for "
                             f"{type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, self._nd, self.dilation)
        return _TFUNCS[self._nd](input, self.weight, self.bias, self.stride, self.padding,
                                 output_padding, self.groups, self.dilation)


def _module_doc(base, fn):
    return f"""``torch.nn.{base}`` whose forward runs gpuconv (:func:`{fn}`).

    Same constructor, parameters, ``state_dict`` keys, ``padding_mode`` and
    ``extra_repr`` as ``torch.nn.{base}``, of which it is a subclass;
    :func:`convert` switches existing ``torch.nn.{base}`` modules to it in place.
    """


class Conv1d(_GpuconvConv, torch.nn.Conv1d):
    __doc__ = _module_doc("Conv1d", "conv1d")
    _nd = 1


class Conv2d(_GpuconvConv, torch.nn.Conv2d):
    __doc__ = _module_doc("Conv2d", "conv2d") + """
    >>> import torch, gpuconv.torch as gt
    >>> m = gt.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
    >>> m(torch.randn(2, 3, 16, 16)).shape, list(m.state_dict())
    (torch.Size([2, 8, 16, 16]), ['weight', 'bias'])
    """
    _nd = 2


class Conv3d(_GpuconvConv, torch.nn.Conv3d):
    __doc__ = _module_doc("Conv3d", "conv3d")
    _nd = 3


class ConvTranspose1d(_GpuconvConvTranspose, torch.nn.ConvTranspose1d):
    __doc__ = _module_doc("ConvTranspose1d", "conv_transpose1d")
    _nd = 1


class ConvTranspose2d(_GpuconvConvTranspose, torch.nn.ConvTranspose2d):
    __doc__ = _module_doc("ConvTranspose2d", "conv_transpose2d")
    _nd = 2


class ConvTranspose3d(_GpuconvConvTranspose, torch.nn.ConvTranspose3d):
    __doc__ = _module_doc("ConvTranspose3d", "conv_transpose3d")
    _nd = 3


_SWAP = {torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
         torch.nn.ConvTranspose1d: ConvTranspose1d, torch.nn.ConvTranspose2d: ConvTranspose2d,
         torch.nn.ConvTranspose3d: ConvTranspose3d}


def convert(model: "torch.nn.Module") -> "torch.nn.Module":
    """Route every ``torch.nn`` convolution of ``model`` through gpuconv, in place.

    Each module whose class is exactly ``torch.nn.Conv{1,2,3}d`` or
    ``torch.nn.ConvTranspose{1,2,3}d`` (``model`` itself included) becomes the
    matching :mod:`gpuconv.torch` subclass: the module object, its Parameter
    objects (so an optimizer built before keeps working), buffers, hooks and
    ``state_dict`` stay the same; only its forward changes.  Subclasses of
    those classes (user-defined forwards) are left alone.  Returns ``model``.

    >>> import torch, gpuconv.torch as gt
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> w = net[0].weight
    >>> gt.convert(net)[0].__class__.__module__, net[0].weight is w
    ('gpuconv.torch', True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gpuconv.torch.convert: model must be a torch.nn.Module, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    for m in model.modules():
        cls = _SWAP.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return model
