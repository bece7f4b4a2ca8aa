"""float32 precision policy (the PyTorch convention).

``"highest"`` (default): float32 convolutions are exact float32 arithmetic (float32
products and sums).  ``"high"``: the GPU may use TF32 tensor cores for float32
(10-bit mantissa products, float32 sums).  Half types always accumulate in float32;
float64 is never affected.

* ``gpuconv.set_float32_precision("high")`` sets it for the process; the returned
  object is also a context manager that restores the previous value on exit::

      with gpuconv.set_float32_precision("high"):
          y = gpuconv.conv(x, w)

* ``precision=`` on every public convolution function overrides it for that call.
* ``gpuconv.get_float32_precision()`` and ``backend_info()["float32_precision"]``
  report it.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import threading

PRECISIONS = ("highest", "high")

_global = {"value": "highest"}
_lock = threading.Lock()
# a per-call override (precision=) lives in a context variable: threads and tasks
# running other calls at the same time do not see it
_call = contextvars.ContextVar("gpuconv_float32_precision_call", default=None)


def _check(value, what):
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {value!r}")
    return value


class set_float32_precision:  # noqa: N801 (a function to its users; a class to be a context manager)
    """Set the float32 precision policy: ``"highest"`` (exact float32, the default) or
    ``"high"`` (TF32 tensor cores allowed on the GPU).  Usable as a plain call (the
    setting stays) or as a context manager (the previous setting comes back on exit)."""

    def __init__(self, precision):
        _check(precision, "set_float32_precision: precision")
        with _lock:
            self._previous = _global["value"]
            _global["value"] = precision
        self.precision = precision

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with _lock:
            _global["value"] = self._previous
        return False

    def __repr__(self):
        return f"set_float32_precision({self.precision!r})"


def get_float32_precision() -> str:
    """The process-wide float32 precision policy ('highest' or 'high')."""
    return _global["value"]


def effective() -> str:
    """The policy for the call in progress: its ``precision=`` or the global one."""
    v = _call.get()
    return v if v is not None else _global["value"]


def allow_tf32(dtype) -> bool:
    import numpy as np
    return np.dtype(dtype) == np.float32 and effective() == "high"


def with_precision(fn):
    """Give a public function a keyword-only ``precision=None`` (validated before any
    work, in force for the duration of the call)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    params.append(inspect.Parameter("precision", inspect.Parameter.KEYWORD_ONLY, default=None))

    @functools.wraps(fn)
    def wrapper(*args, precision=None, **kwargs):
        if precision is None:
            return fn(*args, **kwargs)
        _check(precision, f"{fn.__name__}: precision")
        token = _call.set(precision)
        try:
            return fn(*args, **kwargs)
        finally:
            _call.reset(token)

    wrapper.__signature__ = sig.replace(parameters=params)
    if wrapper.__doc__:
        wrapper.__doc__ += ("\n\n    precision : None, 'highest' or 'high' -- float32 policy for this "
                            "call\n        (default: gpuconv.get_float32_precision()).\n")
    return wrapper
