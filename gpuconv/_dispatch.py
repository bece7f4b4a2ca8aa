"""Backend selection: by the arrays' type, overridable, never a silent host/device copy.

* numpy arrays run on the ``numpy`` backend (or on ``cudasim``, the CUDA kernels
  emulated on the CPU, when asked for);
* cupy arrays run on the ``cupy`` backend (the CUDA kernels on the GPU);
* ``GPUCONV_BACKEND=numpy|cupy|cudasim|auto`` (environment) or
  :func:`use_backend` (a context manager) or ``backend=`` (per call) forces one.
  A forced backend that cannot take the arrays raises instead of copying them.

CuPy is never imported just to look at an argument: an array is recognised as a
CuPy array through ``sys.modules``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys

import numpy as np

BACKENDS = ("numpy", "cupy", "cudasim")
_ENV = "GPUCONV_BACKEND"
_forced: contextvars.ContextVar = contextvars.ContextVar("gpuconv_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (the message says why)."""


def array_namespace(op: str, **arrays):
    """The array module of the given arrays: ``numpy`` or ``cupy`` itself (None
    entries ignored; no arrays: numpy), as array-api-compat's ``array_namespace``;
    with a Dask array among them, :data:`gpuconv.dask.namespace`.

    Raises TypeError for anything that is not a numpy/cupy ndarray and for a mix,
    ValueError for cupy arrays on different devices.
    """
    kinds = {}
    cp = sys.modules.get("cupy")
    for name, a in arrays.items():
        if a is None:
            continue
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{op}: {name} is a numpy.ma.MaskedArray; its mask would be ignored -- "
                            f"pass {name}.filled(0) (or the values you mean) instead")
        if isinstance(a, np.ndarray):
            kinds[name] = "numpy"
        elif cp is not None and isinstance(a, cp.ndarray):
            kinds[name] = "cupy"
        elif type(a).__module__.startswith("dask.array"):  # recognised without importing dask
            kinds[name] = "dask"
        else:
            raise TypeError(f"{op}: {name} must be a numpy.ndarray or cupy.ndarray, "
                            f"got {type(a).__module__}.{type(a).__qualname__}")
    found = set(kinds.values())
    if "dask" in found:  # lazy: gpuconv.dask checks the chunk types and returns its namespace
        from .dask import array_namespace as dask_namespace
        return dask_namespace(op, arrays)
    if found == {"cupy"}:
        devices = {n: a.device.id for n, a in arrays.items() if a is not None}
        if len(set(devices.values())) > 1:
            desc = ", ".join(f"{n} on GPU {d}" for n, d in devices.items())
            raise ValueError(f"{op}: arrays on different devices ({desc}); move them to one "
                             f"device first (cupy.asarray inside `with cupy.cuda.Device(i):`)")
    if len(found) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"{op}: numpy and cupy arrays mixed ({desc}); gpuconv never copies "
                        f"between host and device silently -- move them with cupy.asarray() "
                        f"or cupy.asnumpy() first")
    return cp if found == {"cupy"} else np


def namespace_name(xp) -> str:
    """'numpy', 'cupy' or 'dask' for an array module returned by :func:`array_namespace`."""
    return "numpy" if xp is np else getattr(xp, "gpuconv_namespace", "cupy")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None`` or ``'auto'``: by array type)."""
    _check_name(name, "use_backend")
    token = _forced.set(None if name in (None, "auto") else name)
    try:
        yield
    finally:
        _forced.reset(token)


def _check_name(name, where):
    if name not in (None, "auto") + BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of "
                         f"{', '.join(('auto',) + BACKENDS)}")


def requested_backend(explicit=None) -> str | None:
    """The forced backend name, or None for dispatch by array type."""
    if explicit not in (None, "auto"):
        _check_name(explicit, "backend")
        return explicit
    if explicit == "auto":
        return None
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(_ENV, "").strip().lower()
    if env in ("", "auto"):
        return None
    _check_name(env, f"environment variable {_ENV}")
    return env


# --------------------------------------------------------------------------- probes
@functools.lru_cache(maxsize=None)
def _probe_cupy():
    """(usable, reason, details) for the cupy backend."""
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"CuPy is not installed or failed to import ({type(e).__name__}: {e})", {}
    details = {"cupy_version": cupy.__version__}
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: insufficient driver, no driver, ...
        return False, f"CuPy {cupy.__version__} is installed but CUDA is not usable: {e}", details
    if n < 1:
        return False, f"CuPy {cupy.__version__} is installed but no CUDA device was found", details
    devices = []
    try:
        for i in range(n):
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            devices.append({"id": i, "name": name,
                            "compute_capability": f"{p['major']}.{p['minor']}",
                            "memory_bytes": int(p["totalGlobalMem"])})
        details["cuda_runtime_version"] = cupy.cuda.runtime.runtimeGetVersion()
        details["driver_version"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as e:
        return False, f"CUDA device query failed: {e}", details
    details["devices"] = devices
    return True, None, details


@functools.lru_cache(maxsize=None)
def _probe_cudasim():
    try:
        from ._runtimes import cudasim
    except Exception as e:
        return False, f"the CUDA emulator failed to import ({type(e).__name__}: {e})", {}
    try:
        return cudasim.probe()
    except Exception as e:  # not built yet, no C++ compiler, ...: unusable, never a crash
        return False, f"the CUDA emulator is not usable ({type(e).__name__}: {e})", {}


def _probe(name):
    if name == "numpy":
        return True, None, {"numpy_version": np.__version__}
    if name == "cupy":
        return _probe_cupy()
    return _probe_cudasim()


def backend_info() -> dict:
    """Which backends can run here and, for each one that cannot, why.

    Returns ``{"backends": {name: {"usable": bool, "reason": str|None, ...}},
    "default": ..., "forced": ...}``.  Probing CuPy imports it (once).
    """
    out = {}
    for name in BACKENDS:
        ok, reason, details = _probe(name)
        out[name] = {"usable": ok, "reason": reason, **details}
    # the numpy backend's compiled depthwise kernels (built here on first use)
    from ._cpu import native
    out["numpy"]["native_kernels"] = native.status()
    from ._precision import get_float32_precision
    return {"backends": out, "forced": requested_backend(),
            # 'high' lets the CUDA backend run float32's dense passes on TF32 tensor
            # cores (gpuconv_igemm_fptc_f32_*, _wgtc_f32_*); 'highest' and the CPU stay exact
            "float32_precision": get_float32_precision(), "tf32_kernels": True}


def available_backends() -> list:
    """Names of the backends usable on this machine, e.g. ['numpy', 'cudasim']."""
    return [n for n in BACKENDS if _probe(n)[0]]


# --------------------------------------------------------------------------- selection
_instances = {}


def _instance(name):
    be = _instances.get(name)
    if be is None:
        ok, reason, _ = _probe(name)
        if not ok:
            raise BackendUnavailableError(f"gpuconv backend {name!r} cannot run here: {reason}")
        if name == "numpy":
            from ._cpu import NumpyBackend
            be = NumpyBackend()
        elif name == "cupy":
            from ._cuda.backend import CudaBackend
            from ._runtimes.cupy import CupyRuntime
            be = CudaBackend(CupyRuntime())
        else:
            from ._cuda.backend import CudaBackend
            from ._runtimes.cudasim import SimRuntime
            be = CudaBackend(SimRuntime())
        _instances[name] = be
    return be


def get_backend(op: str, xp, explicit=None):
    """The backend object that runs arrays of the array module `xp` (numpy/cupy)."""
    namespace = namespace_name(xp)
    name = requested_backend(explicit)
    if namespace == "dask":  # a lazy graph; each chunk then dispatches by its own type
        return xp.backend(name)
    if name is None:
        name = namespace
    host_backend = name in ("numpy", "cudasim")
    if host_backend and namespace == "cupy":
        raise TypeError(f"{op}: backend {name!r} runs on host (numpy) arrays but got cupy arrays; "
                        f"gpuconv never copies between device and host silently")
    if name == "cupy" and namespace == "numpy":
        raise TypeError(f"{op}: backend 'cupy' was requested but the inputs are numpy arrays; "
                        f"move them to the GPU with cupy.asarray() first")
    return _instance(name)


# --------------------------------------------------------------------------- precompile
def precompile(backend: str = "cupy") -> list:
    """Build every kernel entry point ahead of time for the current device.

    ``backend='cupy'`` (default) compiles with NVRTC for the current CUDA device
    (CuPy's disk cache makes this cheap after the first time); ``'cudasim'``
    builds the emulator's shared libraries.  Returns the entry-point names.
    Raises BackendUnavailableError, with the reason, where the backend cannot run.
    """
    if backend not in ("cupy", "cudasim"):
        raise ValueError(f"precompile: backend must be 'cupy' or 'cudasim', got {backend!r}")
    from ._cuda.sources import all_entry_names
    _instance(backend).precompile()
    return all_entry_names()


def _driver_has_device() -> bool:
    """Cheap check, without importing CuPy, that a CUDA driver with a device exists."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    try:
        if lib.cuInit(0) != 0:
            return False
        n = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
    except Exception:
        return False


def _precompile_on_import() -> None:
    """On a machine with CuPy and a working CUDA device, build the modules at import
    (GPUCONV_PRECOMPILE=0 turns this off).  CPU-only machines pay nothing: no CuPy
    import, no compilation.  A failure here never breaks the import; the first
    call on a CuPy array builds the modules again and raises that error then."""
    if os.environ.get("GPUCONV_PRECOMPILE", "1").strip() == "0":
        return
    import importlib.util
    if importlib.util.find_spec("cupy") is None or not _driver_has_device():
        return
    try:
        precompile("cupy")
    except Exception:  # nothing is cached: the first use builds again and raises
        pass
