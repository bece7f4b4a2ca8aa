"""Public convolution functions: validate once, pick a backend, run.

Conventions (PyTorch/cuDNN): cross-correlation; x ``(N, C, *spatial)``; weight
``(K, C // groups, *kernel)``; bias ``(K,)``; result ``(N, K, *out)``.  Everything
after ``bias`` is keyword-only.  The result's array type and dtype are the
inputs'.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from . import _geometry as geo
from ._dispatch import array_namespace, get_backend

__all__ = [
    "conv", "conv_input_grad", "conv_weight_grad", "conv_bias_grad", "conv_transpose",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_output_shape",
    "conv_transpose_output_shape", "conv_transpose_input_grad", "conv_transpose_weight_grad",
    "conv1d", "conv2d", "conv3d",
    "conv1d_input_grad", "conv2d_input_grad", "conv3d_input_grad",
    "conv1d_weight_grad", "conv2d_weight_grad", "conv3d_weight_grad",
]


def _namespace(op, **arrays):
    """array_namespace of the arrays, every one required except ``bias``: a None
    array argument is a TypeError naming it (not an AttributeError later)."""
    for name, a in arrays.items():
        if a is None and name != "bias":
            raise TypeError(f"{op}: {name} is None; expected a numpy.ndarray or cupy.ndarray")
    return array_namespace(op, **arrays)


def _prepare(op, **arrays):
    """(xp, dtype, arrays): the namespace, the one dtype (native byte order) and the
    arrays in native byte order -- a big-endian array (FITS files, ``'>f8'``) is
    copied once, here, into native order, so every backend computes in its precision."""
    xp = _namespace(op, **arrays)
    dtype = geo.check_dtype(op, arrays)
    return xp, dtype, tuple(a if a is None or a.dtype.isnative else
                            a.astype(a.dtype.newbyteorder("="))
                            for a in arrays.values())


def _ndim_check(op, name, a, allowed, form):
    if a.ndim not in allowed:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, allowed))} dims "
                         f"({form}), got {name}.shape={geo._fmt_shape(a.shape)}")


def _check_bias(op, bias, K):
    if bias is None:
        return
    if bias.ndim != 1 or bias.shape[0] != K:
        raise ValueError(f"{op}: bias must have shape ({K},) (one value per output channel K={K}), "
                         f"got bias.shape={geo._fmt_shape(bias.shape)}")


# ----------------------------------------------------------------------------- cores
# Each core takes standard batched arrays and a validated geometry.  The
# shared-kernel (seed) weight form reduces to a C = 1 convolution of the
# channel sum of x, because the same kernel meets every input channel.

def _channel_sum(x, acc):
    """(N, 1, *L) sum over the channels, in the accumulate type (no full-size copy)."""
    return x.sum(axis=1, keepdims=True, dtype=acc)


def _shared_geometry(g):
    """The C = 1 problem of a shared-kernel weight, computed in the accumulate type, so
    half types are summed over channels in float32 and rounded once at the end."""
    return dataclasses.replace(g, C=1, dtype=g.accumulate_dtype)


def _forward(op, x, w, bias, g, xp, backend, shared=False):
    be = get_backend(op, xp, backend)
    if g.N == 0:
        return xp.empty(g.y_shape, dtype=g.dtype)
    if shared:
        g1 = _shared_geometry(g)
        b1 = None if bias is None else bias.astype(g1.dtype, copy=False)
        y = be.forward(_channel_sum(x, g1.dtype), w[:, None].astype(g1.dtype, copy=False), b1, g1)
        return y.astype(g.dtype, copy=False)
    return be.forward(x, w, bias, g)


def _input_grad(op, gy, w, g, xp, backend, shared=False):
    be = get_backend(op, xp, backend)
    if g.N == 0:
        return xp.empty(g.x_shape, dtype=g.dtype)
    if shared:  # every input channel gets the same gradient
        gx1 = be.input_grad(gy, w[:, None], dataclasses.replace(g, C=1))
        return xp.ascontiguousarray(xp.broadcast_to(gx1, g.x_shape))
    return be.input_grad(gy, w, g)


def _weight_grad(op, x, gy, g, xp, backend, shared=False):
    be = get_backend(op, xp, backend)
    if g.N == 0:
        return xp.zeros((g.K,) + g.kernel if shared else g.w_shape, dtype=g.dtype)
    if shared:
        g1 = _shared_geometry(g)
        gw = be.weight_grad(_channel_sum(x, g1.dtype), gy.astype(g1.dtype, copy=False), g1)
        return gw[:, 0].astype(g.dtype, copy=False)
    return be.weight_grad(x, gy, g)


def _geometry(op, x_shape, w_shape, stride, padding, dilation, groups, dtype,
              names=("x.shape", "weight.shape")):
    return geo.conv_geometry(op, x_shape, w_shape, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, dtype=dtype, names=names)


# ----------------------------------------------------------------------------- generic
def conv(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """N-d convolution (cross-correlation), rank taken from ``weight``.

    Parameters
    ----------
    x : ndarray ``(N, C, *spatial)``, 1-3 spatial dims, numpy or cupy; or a
        ``dask.array.Array`` (then the result is lazy; its chunks, and the rechunk
        that aligns them to the stride, are defined in :mod:`gpuconv.dask`).
    weight : ndarray ``(K, C // groups, *kernel)``.
    bias : ndarray ``(K,)`` or None.
    stride, dilation : int or one int per spatial dim (>= 1).
    padding : int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``
        (out = ceil(L / stride); with stride 1 every size is kept; an odd total
        padding puts the extra element on the high side).
    groups : int dividing C and K.
    backend : None/'auto' (by array type), 'numpy', 'cupy' or 'cudasim'.

    Returns ``(N, K, *out)`` with ``out = floor((L + lo + hi - dilation*(k-1) - 1)/stride) + 1``,
    same array type and dtype (float16, bfloat16, float32 or float64) as ``x``.

    Raises ValueError for inconsistent shapes or arguments, TypeError for
    unsupported/mismatched dtypes and for numpy/cupy mixtures.

    >>> import numpy as np, gpuconv
    >>> gpuconv.conv(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)), padding=1).shape
    (1, 3, 5, 5)
    """
    op = "conv"
    xp, dtype, (x, weight, bias) = _prepare(op, x=x, weight=weight, bias=bias)
    g = _geometry(op, x.shape, weight.shape, stride, padding, dilation, groups, dtype)
    _check_bias(op, bias, g.K)
    return _forward(op, x, weight, bias, g, xp, backend)


def _grad_out_check(op, grad_out, g):
    geo.check_shape(op, "grad_out", grad_out.shape, g.y_shape,
                    "the forward output shape for these x/weight shapes and arguments")


def conv_input_grad(grad_out, weight, input_shape, *, stride=1, padding=0, dilation=1,
                    groups=1, backend=None):
    """Gradient of ``conv`` with respect to x.

    ``grad_out`` is ``(N, K, *out)`` (the forward output's shape), ``weight`` is
    ``(K, C // groups, *kernel)``, ``input_shape`` is x's shape ``(N, C, *spatial)``
    (needed because with stride > 1 several input sizes give the same output size).
    Returns an array of ``input_shape``.
    """
    op = "conv_input_grad"
    xp, dtype, (grad_out, weight) = _prepare(op, grad_out=grad_out, weight=weight)
    input_shape = geo._shape_of(op, "input_shape", input_shape)
    g = _geometry(op, input_shape, weight.shape, stride, padding, dilation, groups, dtype,
                  names=("input_shape", "weight.shape"))
    _grad_out_check(op, grad_out, g)
    return _input_grad(op, grad_out, weight, g, xp, backend)


def conv_weight_grad(x, grad_out, weight_shape, *, stride=1, padding=0, dilation=1, groups=1,
                     backend=None):
    """Gradient of ``conv`` with respect to the weight: an array of ``weight_shape``.

    Deterministic on every backend: the reduction over N and the output
    positions runs in a fixed order.
    """
    op = "conv_weight_grad"
    xp, dtype, (x, grad_out) = _prepare(op, x=x, grad_out=grad_out)
    weight_shape = geo._shape_of(op, "weight_shape", weight_shape)
    g = _geometry(op, x.shape, weight_shape, stride, padding, dilation, groups, dtype,
                  names=("x.shape", "weight_shape"))
    _grad_out_check(op, grad_out, g)
    return _weight_grad(op, x, grad_out, g, xp, backend)


def conv_bias_grad(grad_out):
    """Gradient with respect to the bias: ``grad_out`` summed over N and every spatial axis.

    Half types are summed in float32 and rounded once.
    """
    op = "conv_bias_grad"
    xp, dtype, (grad_out,) = _prepare(op, grad_out=grad_out)
    if grad_out.ndim < 3:
        raise ValueError(f"{op}: grad_out must be (N, K, *spatial) with at least one spatial dim, "
                         f"got grad_out.shape={geo._fmt_shape(grad_out.shape)}")
    axes = (0,) + tuple(range(2, grad_out.ndim))
    out = grad_out.sum(axis=axes, dtype=geo.accumulate_dtype(dtype))  # no full-size cast copy
    return xp.ascontiguousarray(out.astype(dtype, copy=False))


def conv_output_shape(input_shape, weight_shape, *, stride=1, padding=0, dilation=1, groups=1):
    """Shape ``(N, K, *out)`` of ``conv(x, w, ...)`` for x of ``input_shape`` and w of
    ``weight_shape``, with every argument validated as ``conv`` would."""
    g = _geometry("conv_output_shape", input_shape, weight_shape, stride, padding, dilation,
                  groups, np.float32, names=("input_shape", "weight_shape"))
    return g.y_shape


def conv_transpose(x, weight, bias=None, *, stride=1, padding=0, output_padding=0, dilation=1,
                   groups=1, backend=None):
    """Transposed convolution with PyTorch's semantics (``conv_transpose{1,2,3}d``).

    x ``(N, C_in, *L)``, weight ``(C_in, C_out // groups, *kernel)``, bias ``(C_out,)``.
    Output size per dim: ``(L - 1)*stride - lo - hi + dilation*(k - 1) + output_padding + 1``.
    ``padding`` is an int, per-dim ints or per-dim ``(lo, hi)`` pairs (no strings);
    ``output_padding`` must be smaller than stride or dilation in each dim.
    It is the input gradient of the matching convolution, so it runs on the
    same kernels.
    """
    return _conv_transpose("conv_transpose", None, x, weight, bias, stride, padding,
                           output_padding, dilation, groups, backend)


def _conv_transpose(op, rank, x, weight, bias, stride, padding, output_padding, dilation, groups,
                    backend):
    xp, dtype, (x, weight, bias) = _prepare(op, x=x, weight=weight, bias=bias)
    g, L = geo.transpose_geometry(op, x.shape, weight.shape, stride=stride, padding=padding,
                                  output_padding=output_padding, dilation=dilation,
                                  groups=groups, dtype=dtype, rank=rank)
    _check_bias(op, bias, g.C)
    nd = g.nd
    gy = _extend(xp, x, g.out_spatial)
    acc = g.accumulate_dtype
    if bias is None or acc == dtype:
        y = _input_grad(op, gy, weight, g, xp, backend)
        if bias is not None:
            y += bias.reshape((1, -1) + (1,) * nd)
        return y
    # half types with a bias: add it in float32 before the one rounding
    y = _input_grad(op, gy.astype(acc), weight.astype(acc), dataclasses.replace(g, dtype=acc),
                    xp, backend)
    y += bias.astype(acc).reshape((1, -1) + (1,) * nd)
    return y.astype(dtype)


# The transposed convolution y = conv_transpose(x, w) is the input gradient of the
# convolution c(z) = conv(z, w) mapping (N, C_out, *out) -> (N, C_in, *L'), fed with x
# extended by zeros from L to L' (L' > L only when output_padding >= stride).  So its
# gradients are c itself and c's weight gradient, cropped / extended between L and L'.
def _extend(xp, a, spatial):
    """a (N, C, *L) zero-extended to (N, C, *spatial) (a itself when L == spatial)."""
    if tuple(a.shape[2:]) == tuple(spatial):
        return a
    # a pad, not zeros + assignment: keeps a Dask array's chunk type (NumPy or CuPy)
    return xp.pad(a, [(0, 0), (0, 0)] + [(0, s - l) for s, l in zip(spatial, a.shape[2:])])


def _crop(xp, a, spatial):
    """The leading (N, C, *spatial) box of a, contiguous (a itself when it is that size)."""
    if tuple(a.shape[2:]) == tuple(spatial):
        return a
    return xp.ascontiguousarray(a[geo.leading_box(spatial)])


def conv_transpose_input_grad(grad_out, weight, input_shape, *, stride=1, padding=0,
                              output_padding=0, dilation=1, groups=1, backend=None):
    """Gradient of ``conv_transpose`` with respect to its input x.

    ``grad_out`` is ``(N, C_out, *out)`` (the transposed convolution's output shape),
    ``weight`` ``(C_in, C_out // groups, *kernel)``, ``input_shape`` x's shape
    ``(N, C_in, *L)``.  Returns an array of ``input_shape``: the convolution
    ``conv(grad_out, weight)`` (cropped to L where ``output_padding >= stride``).
    """
    op = "conv_transpose_input_grad"
    xp, dtype, (grad_out, weight) = _prepare(op, grad_out=grad_out, weight=weight)
    g, L = geo.transpose_geometry(op, input_shape, weight.shape, stride=stride, padding=padding,
                                  output_padding=output_padding, dilation=dilation,
                                  groups=groups, dtype=dtype,
                                  names=("input_shape", "weight.shape"))
    geo.check_shape(op, "grad_out", grad_out.shape, g.x_shape,
                    "the transposed convolution's output shape for these shapes and arguments")
    return _crop(xp, _forward(op, grad_out, weight, None, g, xp, backend), L)


def conv_transpose_weight_grad(x, grad_out, weight_shape, *, stride=1, padding=0,
                               output_padding=0, dilation=1, groups=1, backend=None):
    """Gradient of ``conv_transpose`` with respect to its weight: an array of
    ``weight_shape`` ``(C_in, C_out // groups, *kernel)``.

    ``x`` is the transposed convolution's input ``(N, C_in, *L)``, ``grad_out`` the
    gradient of its output ``(N, C_out, *out)``.  Deterministic on every backend.
    """
    op = "conv_transpose_weight_grad"
    xp, dtype, (x, grad_out) = _prepare(op, x=x, grad_out=grad_out)
    g, L = geo.transpose_geometry(op, x.shape, weight_shape, stride=stride, padding=padding,
                                  output_padding=output_padding, dilation=dilation,
                                  groups=groups, dtype=dtype, names=("x.shape", "weight_shape"))
    geo.check_shape(op, "grad_out", grad_out.shape, g.x_shape,
                    "the transposed convolution's output shape for these shapes and arguments")
    return _weight_grad(op, grad_out, _extend(xp, x, g.out_spatial), g, xp, backend)


def conv_transpose_output_shape(input_shape, weight_shape, *, stride=1, padding=0,
                                output_padding=0, dilation=1, groups=1):
    """Shape ``(N, C_out, *out)`` of ``conv_transpose(x, w, ...)`` for x of ``input_shape``
    ``(N, C_in, *L)`` and w of ``weight_shape`` ``(C_in, C_out/groups, *kernel)``:
    ``out = (L - 1)*stride - lo - hi + dilation*(k - 1) + output_padding + 1``,
    every argument validated as ``conv_transpose`` would.

    >>> conv_transpose_output_shape((1, 4, 5, 5), (4, 2, 3, 3), stride=2, padding=1,
    ...                             output_padding=1)
    (1, 2, 10, 10)
    """
    g, _ = geo.transpose_geometry("conv_transpose_output_shape", input_shape, weight_shape,
                                  stride=stride, padding=padding, output_padding=output_padding,
                                  dilation=dilation, groups=groups,
                                  names=("input_shape", "weight_shape"))
    return g.x_shape


# ----------------------------------------------------------------------------- rank-specific
def _seed_forms(op, nd, x=None, weight=None, input_shape=None, weight_shape=None):
    """Decide batched/unbatched and standard/shared forms for a rank-specific call."""
    batched = shared = None
    if x is not None:
        _ndim_check(op, "x", x, (nd + 1, nd + 2),
                    f"(C, *spatial) unbatched or (N, C, *spatial) batched, {nd} spatial dims")
        batched = x.ndim == nd + 2
    if input_shape is not None:
        if len(input_shape) not in (nd + 1, nd + 2):
            raise ValueError(f"{op}: input_shape={tuple(input_shape)} must have {nd + 1} "
                             f"(unbatched) or {nd + 2} (batched) entries")
        batched = len(input_shape) == nd + 2
    if weight is not None:
        _ndim_check(op, "weight", weight, (nd + 1, nd + 2),
                    f"(K, *kernel) shared or (K, C/groups, *kernel), {nd} kernel dims")
        shared = weight.ndim == nd + 1
    if weight_shape is not None:
        if len(weight_shape) not in (nd + 1, nd + 2):
            raise ValueError(f"{op}: weight_shape={tuple(weight_shape)} must have {nd + 1} "
                             f"(shared kernel (K, *kernel)) or {nd + 2} entries")
        shared = len(weight_shape) == nd + 1
    return batched, shared


def _shared_wshape(op, w_shape, C, groups, shared):
    if not shared:
        return tuple(w_shape)
    if groups != 1:
        raise ValueError(f"{op}: a shared kernel weight (K, *kernel) applies every kernel to "
                         f"every input channel, so groups must be 1, got groups={groups!r}")
    return (w_shape[0], C) + tuple(w_shape[1:])


def _make_conv(nd):
    name = f"conv{nd}d"

    def f(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, backend=None):
        op = name
        xp, dtype, (x, weight, bias) = _prepare(op, x=x, weight=weight, bias=bias)
        batched, shared = _seed_forms(op, nd, x=x, weight=weight)
        xb = x if batched else x[None]
        wshape = _shared_wshape(op, weight.shape, xb.shape[1], groups, shared)
        g = _geometry(op, xb.shape, wshape, stride, padding, dilation, groups, dtype)
        _check_bias(op, bias, g.K)
        y = _forward(op, xb, weight, bias, g, xp, backend, shared)
        return y if batched else y[0]

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""{nd}-d convolution; see :func:`conv`.

    Also accepts the seed notebook's forms: an unbatched x ``(C, *spatial)`` (the
    result is unbatched) and a shared-kernel weight ``(K, *kernel)``: one {nd}-d
    kernel per output channel, applied to every input channel (groups must be 1).
    """
    return f


def _make_input_grad(nd):
    name = f"conv{nd}d_input_grad"

    def f(grad_out, weight, input_shape, *, stride=1, padding=0, dilation=1, groups=1,
          backend=None):
        op = name
        xp, dtype, (grad_out, weight) = _prepare(op, grad_out=grad_out, weight=weight)
        input_shape = geo._shape_of(op, "input_shape", input_shape)
        batched, shared = _seed_forms(op, nd, weight=weight, input_shape=input_shape)
        xshape = input_shape if batched else (1,) + input_shape
        wshape = _shared_wshape(op, weight.shape, xshape[1], groups, shared)
        g = _geometry(op, xshape, wshape, stride, padding, dilation, groups, dtype)
        gy = grad_out if batched else grad_out[None]
        geo.check_shape(op, "grad_out", grad_out.shape, g.y_shape if batched else g.y_shape[1:],
                        "the forward output shape for these shapes and arguments")
        gx = _input_grad(op, gy, weight, g, xp, backend, shared)
        return gx if batched else gx[0]

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""Input gradient of :func:`conv{nd}d`; see :func:`conv_input_grad`.

    ``input_shape`` may be unbatched ``(C, *spatial)`` (then ``grad_out`` is
    ``(K, *out)``) and ``weight`` may be the shared form ``(K, *kernel)``.
    """
    return f


def _make_weight_grad(nd):
    name = f"conv{nd}d_weight_grad"

    def f(x, grad_out, weight_shape, *, stride=1, padding=0, dilation=1, groups=1, backend=None):
        op = name
        xp, dtype, (x, grad_out) = _prepare(op, x=x, grad_out=grad_out)
        weight_shape = geo._shape_of(op, "weight_shape", weight_shape)
        batched, shared = _seed_forms(op, nd, x=x, weight_shape=weight_shape)
        xb = x if batched else x[None]
        wshape = _shared_wshape(op, weight_shape, xb.shape[1], groups, shared)
        g = _geometry(op, xb.shape, wshape, stride, padding, dilation, groups, dtype)
        gy = grad_out if batched else grad_out[None]
        geo.check_shape(op, "grad_out", grad_out.shape, g.y_shape if batched else g.y_shape[1:],
                        "the forward output shape for these shapes and arguments")
        return _weight_grad(op, xb, gy, g, xp, backend, shared)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""Weight gradient of :func:`conv{nd}d`; see :func:`conv_weight_grad`.

    ``x`` may be unbatched ``(C, *spatial)``; with a shared-kernel ``weight_shape``
    ``(K, *kernel)`` the gradient comes back as ``(K, *kernel)`` (summed over the
    input channels the kernel was applied to).
    """
    return f


conv1d, conv2d, conv3d = (_make_conv(n) for n in (1, 2, 3))
conv1d_input_grad, conv2d_input_grad, conv3d_input_grad = (_make_input_grad(n) for n in (1, 2, 3))
conv1d_weight_grad, conv2d_weight_grad, conv3d_weight_grad = (_make_weight_grad(n)
                                                              for n in (1, 2, 3))


def _make_conv_transpose(nd):
    name = f"conv_transpose{nd}d"

    def f(x, weight, bias=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
          backend=None):
        return _conv_transpose(name, nd, x, weight, bias, stride, padding, output_padding,
                               dilation, groups, backend)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"""{nd}-d transposed convolution (batched x only); see :func:`conv_transpose`."""
    return f


conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(n) for n in (1, 2, 3))


# every public function that runs a convolution takes precision= (gpuconv._precision)
def _add_precision():
    from ._precision import with_precision
    g = globals()
    for name in __all__:
        f = g[name]
        if callable(f) and "backend" in inspect.signature(f).parameters:
            g[name] = with_precision(f)


_add_precision()
