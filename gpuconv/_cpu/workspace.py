"""CPU workspace: the memory bound of the numpy backend.

Every temporary (padded input slab, column buffer, GEMM result staging,
per-thread weight-gradient partials) is carved from per-thread arenas whose
total stays under the workspace limit (default 256 MiB; ``GPUCONV_WORKSPACE_MB``
or :func:`gpuconv.set_workspace_limit`).  Arenas are kept between calls (so
large buffers are not page-faulted in again every call), never more than the
limit in total; :func:`clear_workspace_cache` frees them.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

_MB = 1 << 20
_workspace = None
_ALIGN = 64
# NumPy's ufunc/copy machinery buffers strided, broadcast or casting operands in
# blocks of 8192 elements (up to ~64 KiB per call); reserve that per thread.
_UFUNC_RESERVE = 96 * 1024


def _megabytes(where: str, value) -> float:
    """A finite number of MiB > 0, with at least one byte: else ValueError/TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.number)):
        raise TypeError(f"{where} must be a number of MiB (an int or a float > 0), "
                        f"got {value!r}")
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number of MiB (> 0), got {value!r}") from None
    if not math.isfinite(mb) or not mb > 0:
        raise ValueError(f"{where} must be a finite number of MiB > 0, got {value!r}")
    if mb * _MB > 2**62:
        raise ValueError(f"{where}={value!r} MiB is more than any machine's memory")
    return mb


def get_workspace_limit() -> int:
    """Current CPU workspace limit in bytes."""
    global _workspace
    if _workspace is None:
        env = os.environ.get("GPUCONV_WORKSPACE_MB", "").strip()
        mb = _megabytes(f"environment variable GPUCONV_WORKSPACE_MB={env!r}: the value",
                        env) if env else 256.0
        _workspace = max(1, int(mb * _MB))
    return _workspace


def set_workspace_limit(megabytes) -> None:
    """Bound the temporaries of the CPU backend to ``megabytes`` MiB (a finite number > 0)."""
    global _workspace
    if isinstance(megabytes, str):
        raise TypeError(f"set_workspace_limit: megabytes must be a number of MiB (an int or a "
                        f"float > 0), got the string {megabytes!r}")
    mb = _megabytes("set_workspace_limit: megabytes", megabytes)
    _workspace = max(1, int(mb * _MB))
    clear_workspace_cache()


# ============================================================================ arenas
class _Arena:
    """One contiguous byte buffer handed out as typed sub-arrays."""

    def __init__(self, nbytes):
        self.buf = np.empty(max(int(nbytes), _ALIGN), dtype=np.uint8)
        self.off = 0

    @property
    def nbytes(self):
        return self.buf.nbytes

    def take(self, shape, dtype):
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        start = -(-self.off // _ALIGN) * _ALIGN
        if start + n > self.buf.nbytes:  # planning error: never silently exceed
            raise AssertionError(f"gpuconv workspace arena overflow ({start + n} > "
                                 f"{self.buf.nbytes} bytes)")
        self.off = start + n
        return self.buf[start:start + n].view(dtype).reshape(shape)

    def reset(self):
        self.off = 0


def arena_bytes(sizes):
    """Bytes an arena needs to hold buffers of the given byte sizes (with alignment)."""
    return sum(-(-int(s) // _ALIGN) * _ALIGN for s in sizes if s) + _ALIGN


_pool_lock = threading.Lock()
_free_arenas: list = []


def acquire(nbytes):
    with _pool_lock:
        best = None
        for a in _free_arenas:
            if a.nbytes >= nbytes and (best is None or a.nbytes < best.nbytes):
                best = a
        if best is not None:
            _free_arenas.remove(best)
            best.reset()
            return best
    return _Arena(nbytes)


def release(arena):
    arena.reset()
    with _pool_lock:
        _free_arenas.append(arena)
        _free_arenas.sort(key=lambda a: -a.nbytes)
        limit = get_workspace_limit()
        total = 0
        keep = []
        for a in _free_arenas:  # keep the largest ones that fit the limit together
            if total + a.nbytes <= limit:
                keep.append(a)
                total += a.nbytes
        _free_arenas[:] = keep


def clear_workspace_cache() -> None:
    """Free the workspace buffers the CPU backend keeps between calls."""
    with _pool_lock:
        _free_arenas.clear()



def budget(workers):
    """Arena bytes one of `workers` workers may use."""
    return max(1, get_workspace_limit() // workers - _UFUNC_RESERVE)


def _after_fork_in_child():
    global _pool_lock
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
