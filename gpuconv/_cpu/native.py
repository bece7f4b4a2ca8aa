"""Native CPU kernels: ``dwconv.cpp`` compiled on first use by the host C++ compiler.

The depthwise passes are memory- and load-bound loops that NumPy can only run as one
ufunc pass per tap; the compiled kernel keeps an output row's accumulators in vector
registers over all taps instead (see dwconv.cpp).  It is built once per source text,
compiler and CPU (``-march=native``) into ``$GPUCONV_CACHE_DIR/native`` (default
``~/.cache/gpuconv/native``) and loaded with ctypes; ctypes releases the GIL during
each call, so the backend's worker threads run it in parallel.

Where there is no C++ compiler (or it fails), the NumPy passes run instead: same
results within the dtype's tolerance, slower.  ``GPUCONV_CPU_NATIVE=0`` turns the
native kernels off; ``GPUCONV_CXX`` (else ``CXX``, else ``g++``) names the compiler.
:func:`status` says which is in use and why.
"""
from __future__ import annotations

import ctypes
import os
import platform
import tempfile
import threading
from pathlib import Path

import numpy as np

from .. import _hostcc

SOURCE = Path(__file__).resolve().parent / "dwconv.cpp"
BUILD_VERSION = "1"
ABI_VERSION = 1
_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-fno-math-errno"]
_lock = threading.Lock()
_state = {"lib": None, "reason": None, "key": None, "path": None, "compiler": None}


def _after_fork_in_child():
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NativeBuildError(RuntimeError):
    """The native CPU kernels could not be built (the message holds the compiler output)."""


def _compiler_command():
    return os.environ.get("GPUCONV_CXX") or os.environ.get("CXX") or "g++"


def enabled() -> bool:
    v = os.environ.get("GPUCONV_CPU_NATIVE", "").strip().lower()
    return v not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(cxx, ver):
    src = SOURCE.read_bytes()
    d = _hostcc.cache_subdir("native")
    for arch in (["-march=native"], []):  # a compiler without -march=native: portable code
        key = _hostcc.content_hash(BUILD_VERSION, ver, platform.machine(), _cpu_flags(), src,
                                   *(_FLAGS + arch))
        out = d / f"dwconv-{key}.so"
        if out.is_file():
            return out
        try:
            with tempfile.TemporaryDirectory(dir=d, prefix="tmp-dw-") as tmp:
                so = Path(tmp) / "dwconv.so"
                _hostcc.run_compiler([cxx] + _FLAGS + arch + [str(SOURCE), "-o", str(so)],
                                     "building the native CPU kernels", NativeBuildError)
                os.replace(so, out)
            return out
        except NativeBuildError:
            if not arch:
                raise
    raise AssertionError("unreachable")


def _bind(lib):
    i64p = ctypes.POINTER(ctypes.c_longlong)
    vp = ctypes.c_void_p
    for t in ("f32", "f64"):
        f = getattr(lib, f"gc_dw_scratch_{t}")
        f.restype, f.argtypes = ctypes.c_longlong, [ctypes.c_int, i64p]
        getattr(lib, f"gc_dw_forward_{t}").argtypes = [i64p, vp, vp, vp, vp, vp, ctypes.c_longlong]
        for name in ("input_grad", "weight_grad"):
            getattr(lib, f"gc_dw_{name}_{t}").argtypes = [i64p, vp, vp, vp, vp, ctypes.c_longlong]
        for name in ("forward", "input_grad", "weight_grad"):
            getattr(lib, f"gc_dw_{name}_{t}").restype = ctypes.c_int
    if lib.gc_dw_abi_version() != ABI_VERSION:
        raise NativeBuildError(f"native kernels: ABI {lib.gc_dw_abi_version()} != {ABI_VERSION}")
    if lib.gc_dw_param_count() != N_PARAMS:
        raise NativeBuildError("native kernels: parameter layout differs from native.py")
    return lib


def library():
    """The loaded kernel library, or None (see :func:`status` for why)."""
    if not enabled():
        return None
    cxx_cmd = _compiler_command()
    with _lock:
        if _state["key"] == cxx_cmd:
            return _state["lib"]
        lib, reason, path = None, None, None
        cxx, ver = _hostcc.compiler_info(cxx_cmd, "GPUCONV_CXX")
        if cxx is None:
            reason = ver
        else:
            try:
                path = _build(cxx, ver)
                lib = _bind(ctypes.CDLL(str(path)))
            except (OSError, NativeBuildError) as e:
                reason = f"{type(e).__name__}: {e}"
        _state.update(lib=lib, reason=reason, key=cxx_cmd, path=path and str(path),
                      compiler=ver if cxx else None)
        return lib


def status() -> dict:
    """``{"usable", "reason", "compiler", "library"}`` of the native CPU kernels (builds
    them if they are not built yet)."""
    if not enabled():
        return {"usable": False, "reason": "turned off by GPUCONV_CPU_NATIVE=" +
                os.environ.get("GPUCONV_CPU_NATIVE", ""), "compiler": None, "library": None}
    lib = library()
    return {"usable": lib is not None, "reason": _state["reason"],
            "compiler": _state["compiler"], "library": _state["path"]}


# --------------------------------------------------------------------------- calls
N_PARAMS = 24
_PASS = {"forward": 0, "input_grad": 1, "weight_grad": 2}
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def supports(*arrays) -> bool:
    """The native kernels take C-contiguous float32/float64 arrays of one dtype."""
    dt = arrays[0].dtype
    return (dt in _SUFFIX and all(a.dtype == dt and a.flags.c_contiguous for a in arrays))


def params(N, G, Ks, Ko, xsp, ysp, kernel, stride, dil, lo, begin=0, end=0):
    """The int64 parameter block of one call; spatial tuples of 1-3 dims (1-D and 2-D are
    padded in front with sizes 1, strides 1, no padding)."""
    pad = 3 - len(xsp)

    def f(t, v):
        return (v,) * pad + tuple(t)

    p = ((N, G, Ks, Ko) + f(xsp, 1) + f(ysp, 1) + f(kernel, 1) + f(stride, 1) + f(dil, 1)
         + f(lo, 0) + (begin, end))
    return np.array(p, dtype=np.int64)


def _ptr(a):
    return None if a is None else a.ctypes.data


def scratch_elems(pass_, dtype, p) -> int:
    lib = library()
    fn = getattr(lib, f"gc_dw_scratch_{_SUFFIX[np.dtype(dtype)]}")
    return int(fn(_PASS[pass_], p.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong))))


def call(pass_, p, *arrays, scratch):
    """Run one pass over the work range in p (forward: x, w, bias|None, y; input_grad:
    gy, w, gx; weight_grad: x, gy, gw); scratch: a 1-D array of the compute dtype."""
    lib = library()
    fn = getattr(lib, f"gc_dw_{pass_}_{_SUFFIX[scratch.dtype]}")
    rc = fn(p.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)), *map(_ptr, arrays),
            scratch.ctypes.data, scratch.size)
    if rc != 0:
        raise AssertionError(f"gpuconv native {pass_}: scratch of {scratch.size} elements is "
                             f"too small (planning error)")
