"""Convolution layers with explicit forward/backward, on NumPy or CuPy arrays.

A small, framework-free counterpart of ``torch.nn.Conv*d``: each layer holds
its ``weight`` and ``bias`` arrays, ``forward(x)`` remembers what the backward
pass needs, and ``backward(grad_out)`` returns the input gradient and fills
``weight_grad`` / ``bias_grad``.  Parameters live where the data lives: a
layer on ``"numpy"`` takes NumPy arrays, a layer moved with ``.to("cupy")``
takes CuPy arrays (no silent host/device copies, as everywhere in gpuconv).

>>> import numpy as np
>>> from gpuconv.nn import Conv2d
>>> layer = Conv2d(3, 8, 3, padding=1, seed=0)
>>> x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
>>> y = layer(x)                       # forward
>>> y.shape
(2, 8, 16, 16)
>>> gx = layer.backward(np.ones_like(y))
>>> gx.shape, layer.weight_grad.shape, layer.bias_grad.shape
((2, 3, 16, 16), (8, 3, 3, 3), (8,))

Initialisation matches PyTorch's default (``kaiming_uniform_(a=sqrt(5))``):
weight and bias are both drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
with ``fan_in = weight.shape[1] * prod(kernel_size)``.
"""
from __future__ import annotations

import math

import numpy as np

from . import _api
from . import _geometry as geo
from ._dispatch import (BackendUnavailableError, array_namespace, available_backends,
                        backend_info, namespace_name)

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]

_DEVICES = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "cuda": "cupy", "gpu": "cupy"}


def _device_of(a, what="array"):
    """'numpy' or 'cupy': where array `a` lives (TypeError for anything else)."""
    return namespace_name(array_namespace(what, **{"input": a}))


_resolve_dtype = geo.resolve_dtype


def _move(a, device):
    """Copy array `a` to 'numpy' or 'cupy' (no-op when already there)."""
    if a is None or _device_of(a) == device:
        return a
    if device == "cupy":
        import cupy
        return cupy.asarray(a)
    import cupy
    return cupy.asnumpy(a)


def _tuple(name, v, nd, cls):
    return geo.int_tuple(cls, name, v, nd)


class _ConvBase:
    """Shared machinery for the convolution layers (not public)."""

    _nd = 2
    _transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, output_padding=0, dtype=np.float32, seed=None, rng=None,
                 device="numpy"):
        cls = type(self).__name__
        nd = self._nd
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("groups", groups)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{cls}: {name} must be a positive int, got {name}={v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{cls}: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _tuple("kernel_size", kernel_size, nd, cls)
        if min(self.kernel_size) < 1:
            raise ValueError(f"{cls}: kernel_size must be >= 1, got kernel_size={kernel_size!r}")
        self.stride = _tuple("stride", stride, nd, cls)
        self.dilation = _tuple("dilation", dilation, nd, cls)
        if isinstance(padding, str):
            self.padding = padding
        elif isinstance(padding, (int, np.integer)):
            self.padding = (int(padding),) * nd
        else:  # per-dim ints or (lo, hi) pairs: validated by gpuconv at the first call
            self.padding = tuple(p if isinstance(p, (int, np.integer)) else tuple(p)
                                 for p in padding)
        self.groups = int(groups)
        self.output_padding = _tuple("output_padding", output_padding, nd, cls)
        if not self._transposed and any(self.output_padding):
            raise TypeError(f"{cls}: output_padding is only for transposed convolutions")
        dt = _resolve_dtype(dtype)
        if device not in _DEVICES:
            raise ValueError(f"{cls}: device={device!r}; expected 'numpy' or 'cupy'")
        if rng is not None and seed is not None:
            raise TypeError(f"{cls}: pass seed or rng, not both")
        if rng is None:
            rng = np.random.default_rng(seed)
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(f"{cls}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if self._transposed:
            wshape = (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        else:
            wshape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        fan_in = wshape[1] * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = rng.uniform(-bound, bound, wshape).astype(dt)
        self.bias = rng.uniform(-bound, bound, (self.out_channels,)).astype(dt) if bias else None
        self.weight_grad = None
        self.bias_grad = None
        self._saved = None
        self.device = "numpy"
        if _DEVICES[device] != "numpy":
            self.to(device)

    # ------------------------------------------------------------------ housekeeping
    @property
    def dtype(self):
        """The parameters' dtype (numpy.dtype)."""
        return self.weight.dtype

    def to(self, device=None, dtype=None):
        """Move parameters (and gradients) to ``'numpy'`` or ``'cupy'`` and/or cast them.

        ``device`` is ``'numpy'`` (alias ``'cpu'``) or ``'cupy'`` (aliases
        ``'cuda'``, ``'gpu'``); a dtype may be given as the only argument
        (``layer.to(np.float64)``).  Returns the layer.  Forgets the saved
        forward input.  Raises :class:`gpuconv.BackendUnavailableError` when
        moving to CuPy on a machine where the cupy backend cannot run, and
        ValueError for an unknown device.

        >>> from gpuconv.nn import Conv1d
        >>> Conv1d(2, 3, 5).to("numpy", "float64").weight.dtype
        dtype('float64')
        """
        if isinstance(device, str):
            device = device.lower()
        if device is not None and device not in _DEVICES:
            # a dtype given as the only argument: layer.to(np.float64)
            try:
                if dtype is not None:
                    raise TypeError
                _resolve_dtype(device)
            except TypeError:
                raise ValueError(f"{type(self).__name__}.to: unknown device {device!r}; "
                                 f"expected 'numpy' or 'cupy'") from None
            device, dtype = None, device
        if dtype is not None:
            dtype = _resolve_dtype(dtype)
        target = _DEVICES[device] if device is not None else self.device
        if target == "cupy" and self.device != "cupy":
            if "cupy" not in available_backends():
                reason = backend_info()["backends"]["cupy"]["reason"]
                raise BackendUnavailableError(
                    f"{type(self).__name__}.to('cupy'): the cupy backend cannot run here: {reason}")
        names = ("weight", "bias", "weight_grad", "bias_grad")
        for name in names:
            a = getattr(self, name)
            if a is None:
                continue
            a = _move(a, target)
            if dtype is not None:
                a = a.astype(dtype)
            setattr(self, name, a)
        self.device = target
        self._saved = None
        return self

    def parameters(self):
        """The parameter arrays ``[weight, bias]`` (bias omitted when absent).

        They are the layer's own arrays: update them in place (``p -= lr * g``)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def gradients(self):
        """The gradients matching :meth:`parameters` (None before the first backward)."""
        return [self.weight_grad] + ([self.bias_grad] if self.bias is not None else [])

    def zero_grad(self):
        """Forget the gradients (``weight_grad = bias_grad = None``)."""
        self.weight_grad = None
        self.bias_grad = None

    def _conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def _check_input(self, x, what):
        cls = type(self).__name__
        dev = _device_of(x, f"{cls}.{what}")
        if dev != self.device:
            raise TypeError(f"{cls}.{what}: got a {dev} array but the layer's parameters live on "
                            f"{self.device!r}; call layer.to({dev!r}) or move the data")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{cls}.{what}: got dtype {x.dtype} but the layer's parameters are "
                            f"{self.weight.dtype}; cast the data or call layer.to(dtype)")
        nd = self._nd
        if x.ndim not in (nd + 1, nd + 2):
            raise ValueError(f"{cls}.{what}: expected an (N, C, *spatial) array "
                             f"with {nd} spatial dims (or an unbatched (C, *spatial) one), got "
                             f"shape {tuple(x.shape)}")

    def __call__(self, x):
        """Same as :meth:`forward`."""
        return self.forward(x)

    def __repr__(self):
        s = (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
             f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self._transposed and any(self.output_padding):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", dtype={self.dtype.name}, device={self.device!r})"

    # ------------------------------------------------------------------ passes
    def forward(self, x):
        """Apply the layer to ``x`` and remember ``x`` for :meth:`backward`.

        ``x``: ``(N, C_in, *spatial)`` (or unbatched ``(C_in, *spatial)``), a
        NumPy or CuPy array on the layer's device with the layer's dtype.
        Returns ``(N, C_out, *out_spatial)`` (unbatched in, unbatched out).
        Raises TypeError for an array on the wrong device or of the wrong
        dtype, ValueError for a wrong rank or channel count.
        """
        self._check_input(x, "forward")
        batched = x.ndim == self._nd + 2
        xb = x if batched else x[None]
        y = self._forward(xb)
        self._saved = (xb, batched)
        return y if batched else y[0]

    def backward(self, grad_out, *, input_grad=True):
        """Back-propagate ``grad_out`` (the gradient of the loss w.r.t. the last output).

        Fills ``weight_grad`` (weight's shape) and ``bias_grad`` (``(C_out,)``,
        when the layer has a bias), replacing earlier values, and returns the
        gradient with respect to the last forward input (its shape), or None
        with ``input_grad=False`` (saves the work for a first layer).
        Raises RuntimeError if :meth:`forward` has not been called since the
        layer was created or moved, ValueError if ``grad_out`` does not have
        the last output's shape.
        """
        cls = type(self).__name__
        if self._saved is None:
            raise RuntimeError(f"{cls}.backward called before forward: call the layer on an "
                               f"input first (it keeps that input for the backward pass)")
        self._check_input(grad_out, "backward")
        xb, batched = self._saved
        gy = grad_out if batched else grad_out[None]
        gx = self._backward(xb, gy, input_grad)
        if gx is None or batched:
            return gx
        return gx[0]


class _Conv(_ConvBase):
    def _forward(self, x):
        return _api.conv(x, self.weight, self.bias, **self._conv_kwargs())

    def _backward(self, x, gy, need_input_grad):
        kw = self._conv_kwargs()
        expected = _api.conv_output_shape(x.shape, self.weight.shape, **kw)
        if tuple(gy.shape) != tuple(expected):
            raise ValueError(f"{type(self).__name__}.backward: grad_out has shape "
                             f"{tuple(gy.shape)}, expected the forward output's shape "
                             f"{tuple(expected)}")
        self.weight_grad = _api.conv_weight_grad(x, gy, self.weight.shape, **kw)
        if self.bias is not None:
            self.bias_grad = _api.conv_bias_grad(gy)
        if not need_input_grad:
            return None
        return _api.conv_input_grad(gy, self.weight, x.shape, **kw)


class Conv1d(_Conv):
    """1-D convolution layer, ``torch.nn.Conv1d``'s arguments and semantics.

    Parameters
    ----------
    in_channels, out_channels : int (both divisible by ``groups``).
    kernel_size, stride, dilation : int or 1-tuple.
    padding : int, 1-tuple, ``((lo, hi),)``, ``'valid'`` or ``'same'``.
    groups : int.
    bias : bool, whether to learn a bias.
    dtype : float16, ``'bfloat16'`` (ml_dtypes), float32 (default) or float64.
    seed : int or None; or ``rng``: a ``numpy.random.Generator`` (not both).
    device : ``'numpy'`` (default) or ``'cupy'``.

    Attributes: ``weight (out_channels, in_channels // groups, k)``,
    ``bias (out_channels,)`` or None, ``weight_grad``, ``bias_grad``.
    Input ``(N, C_in, L)`` -> output ``(N, C_out, L_out)``.

    >>> import numpy as np
    >>> from gpuconv.nn import Conv1d
    >>> Conv1d(4, 6, 3, stride=2, seed=1)(np.ones((5, 4, 11), np.float32)).shape
    (5, 6, 5)
    """
    _nd = 1


class Conv2d(_Conv):
    """2-D convolution layer, ``torch.nn.Conv2d``'s arguments and semantics.

    Same arguments as :class:`Conv1d` with 2-tuples.  ``weight`` is
    ``(out_channels, in_channels // groups, kh, kw)``; input ``(N, C_in, H, W)``
    -> output ``(N, C_out, H_out, W_out)``.

    >>> import numpy as np
    >>> from gpuconv.nn import Conv2d
    >>> conv = Conv2d(3, 6, (3, 5), padding="same", seed=0, dtype=np.float64)
    >>> y = conv(np.ones((2, 3, 7, 9)))
    >>> y.shape, conv.backward(np.ones_like(y)).shape
    ((2, 6, 7, 9), (2, 3, 7, 9))
    """
    _nd = 2


class Conv3d(_Conv):
    """3-D convolution layer, ``torch.nn.Conv3d``'s arguments and semantics.

    Same arguments as :class:`Conv1d` with 3-tuples.  ``weight`` is
    ``(out_channels, in_channels // groups, kd, kh, kw)``; input
    ``(N, C_in, D, H, W)`` -> output ``(N, C_out, D_out, H_out, W_out)``.

    >>> import numpy as np
    >>> from gpuconv.nn import Conv3d
    >>> Conv3d(2, 4, 3, padding=1, seed=0)(np.ones((1, 2, 4, 4, 4), np.float32)).shape
    (1, 4, 4, 4, 4)
    """
    _nd = 3


class _ConvTranspose(_ConvBase):
    """Transposed convolution layers (``torch.nn.ConvTranspose{1,2,3}d``'s semantics)."""

    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, *, dtype=np.float32,
                 seed=None, rng=None, device="numpy"):
        if isinstance(padding, str):
            raise ValueError(f"{type(self).__name__}: padding={padding!r}: string padding is not "
                             f"supported for transposed convolutions (as in PyTorch)")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, output_padding=output_padding, dtype=dtype, seed=seed,
                         rng=rng, device=device)

    def _forward(self, x):
        return _api.conv_transpose(x, self.weight, self.bias, output_padding=self.output_padding,
                                   **self._conv_kwargs())

    def _backward(self, x, gy, need_input_grad):
        kw = dict(self._conv_kwargs(), output_padding=self.output_padding)
        expected_y = self._out_shape(x.shape)
        if tuple(gy.shape) != expected_y:
            raise ValueError(f"{type(self).__name__}.backward: grad_out has shape "
                             f"{tuple(gy.shape)}, expected the forward output's shape "
                             f"{expected_y}")
        self.weight_grad = _api.conv_transpose_weight_grad(x, gy, self.weight.shape, **kw)
        if self.bias is not None:
            self.bias_grad = _api.conv_bias_grad(gy)
        if not need_input_grad:
            return None
        return _api.conv_transpose_input_grad(gy, self.weight, x.shape, **kw)

    def _out_shape(self, x_shape):
        return _api.conv_transpose_output_shape(
            x_shape, self.weight.shape, stride=self.stride, padding=self.padding,
            output_padding=self.output_padding, dilation=self.dilation, groups=self.groups)


class ConvTranspose1d(_ConvTranspose):
    """1-D transposed convolution layer, ``torch.nn.ConvTranspose1d``'s semantics.

    Arguments as :class:`Conv1d` plus ``output_padding`` (int or 1-tuple, smaller
    than stride or dilation).  ``padding`` is an int, a 1-tuple or ``((lo, hi),)``
    (no strings).  ``weight`` is ``(in_channels, out_channels // groups, k)``.
    Output length: ``(L - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1``.

    >>> import numpy as np
    >>> from gpuconv.nn import ConvTranspose1d
    >>> ConvTranspose1d(4, 2, 4, stride=2, padding=1, seed=0)(np.ones((1, 4, 5), np.float32)).shape
    (1, 2, 10)
    """
    _nd = 1


class ConvTranspose2d(_ConvTranspose):
    """2-D transposed convolution layer, ``torch.nn.ConvTranspose2d``'s semantics.

    Arguments as :class:`Conv2d` plus ``output_padding`` (int or 2-tuple, each
    smaller than stride or dilation).  ``padding`` is an int, a 2-tuple or
    ``((lo, hi), (lo, hi))`` (no strings).  ``weight`` is
    ``(in_channels, out_channels // groups, kh, kw)`` as in PyTorch.
    Output size per dim: ``(L - 1)*stride - 2*padding + dilation*(k - 1) +
    output_padding + 1``.

    >>> import numpy as np
    >>> from gpuconv.nn import ConvTranspose2d
    >>> up = ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, seed=0)
    >>> up(np.ones((1, 4, 5, 5), np.float32)).shape
    (1, 2, 10, 10)
    """
    _nd = 2


class ConvTranspose3d(_ConvTranspose):
    """3-D transposed convolution layer, ``torch.nn.ConvTranspose3d``'s semantics.

    Arguments as :class:`Conv3d` plus ``output_padding`` (int or 3-tuple);
    ``weight`` is ``(in_channels, out_channels // groups, kd, kh, kw)``.

    >>> import numpy as np
    >>> from gpuconv.nn import ConvTranspose3d
    >>> up = ConvTranspose3d(2, 3, 2, stride=(1, 2, 2), seed=0)
    >>> up(np.ones((1, 2, 3, 4, 4), np.float32)).shape
    (1, 3, 4, 8, 8)
    """
    _nd = 3
