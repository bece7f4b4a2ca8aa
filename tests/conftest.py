"""Shared fixtures: one test body, three runtimes.

* ``backend`` -- parametrized over ``numpy``, ``cudasim`` and ``cupy``; forces the
  backend with :func:`gpuconv.use_backend` for the test and yields its name.
  ``cudasim`` runs automatically as soon as the emulator reports itself usable;
  ``cupy`` is marked ``gpu`` and skipped unless a CUDA device works.
* ``to_backend`` / ``to_host`` -- move numpy test data to the backend's array type
  and back (``cupy.asarray`` / ``cupy.asnumpy`` for cupy, identity otherwise).
* While a numpy-backend test runs, every ``np.empty``/``np.empty_like`` made by
  the library is poisoned with NaN (raw uint8 workspaces with 0xFF bytes, NaN in
  every float type), so an element a backend forgets to write shows up (fresh
  memory from the OS is zero and would hide it).  The emulator poisons its own
  allocations.
* Any test marked ``gpu`` is skipped when no CUDA device works.
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest

# Every cudasim launch in the suite rotates through the thread schedules
# (forward, reverse, random, one warp at a time): a missing barrier shows under
# some orders and not others.  An explicit GPUCONV_CUDASIM_SCHEDULE wins.
os.environ.setdefault("GPUCONV_CUDASIM_SCHEDULE", "cycle")
# On a GPU, every array the cupy runtime allocates for a kernel to write is filled with
# NaN bytes first (read once, when the runtime is made), as the emulator does.
os.environ.setdefault("GPUCONV_POISON_OUTPUTS", "1")

import gpuconv
from gpuconv import testing as gt

BACKENDS = ("numpy", "cudasim", "cupy")


@functools.lru_cache(maxsize=None)
def backend_status(name):
    """(usable, reason) from gpuconv's own probes (cached for the session)."""
    info = gpuconv.backend_info()["backends"][name]
    return bool(info["usable"]), info.get("reason")


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    ok, reason = backend_status("cupy")
    if ok:
        return
    skip = pytest.mark.skip(reason=f"no working CUDA device: {reason}")
    for it in gpu_items:
        it.add_marker(skip)


# ----------------------------------------------------------------------------- poisoning
class _PoisonedNumpy:
    """Stands in for the ``np`` global of the library modules: numpy, except that
    ``empty``/``empty_like`` come back filled with NaN (floating dtypes)."""

    def __init__(self, np_module):
        self._np = np_module

    def __getattr__(self, name):
        return getattr(self._np, name)

    @staticmethod
    def _poison(a):
        try:
            if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
                a.fill(np.nan)
            elif a.dtype == np.uint8:  # raw workspace: all-ones bytes read as NaN in any float type
                a.fill(0xFF)
        except (TypeError, ValueError):
            pass
        return a

    def empty(self, *args, **kwargs):
        return self._poison(self._np.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(self._np.empty_like(*args, **kwargs))


@contextlib.contextmanager
def poisoned_numpy_allocations():
    """Patch the ``np`` global of gpuconv's numpy-side modules for the duration."""
    import gpuconv._cpu as cpu
    from gpuconv import _api
    from gpuconv._cpu import dense, depthwise, parallel, workspace
    mods = [_api, cpu, dense, depthwise, parallel, workspace]
    saved = [m.np for m in mods]
    acquire = workspace.acquire

    def poisoned_acquire(nbytes):
        # workspace arenas are reused between calls: poison them on every hand-out,
        # not only when first allocated
        arena = acquire(nbytes)
        arena.buf.fill(0xFF)
        return arena

    try:
        for m in mods:
            m.np = _PoisonedNumpy(np)
        workspace.acquire = poisoned_acquire
        yield
    finally:
        workspace.acquire = acquire
        for m, old in zip(mods, saved):
            m.np = old


# ----------------------------------------------------------------------------- fixtures
def _backend_params():
    params = []
    for name in BACKENDS:
        marks = [pytest.mark.gpu] if name == "cupy" else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Name of the backend this test runs on, forced for the test's duration."""
    name = request.param
    ok, reason = backend_status(name)
    if not ok:
        pytest.skip(f"backend {name!r} is not usable here: {reason}")
    poison = poisoned_numpy_allocations() if name == "numpy" else contextlib.nullcontext()
    with gpuconv.use_backend(name), poison:
        yield name


@pytest.fixture
def to_backend(backend):
    """Callable: numpy array -> the backend's array type (None passes through)."""
    def move(a):
        return None if a is None else gt.as_backend_array(a, backend)
    return move


@pytest.fixture
def to_host():
    """Callable: backend array -> numpy array."""
    return gt.to_numpy


@pytest.fixture
def array_type(backend):
    """The array type results on ``backend`` must have."""
    if backend == "cupy":
        import cupy
        return cupy.ndarray
    return np.ndarray


# --------------------------------------------------------------------- the emulated CUDA backend
@pytest.fixture(scope="module")
def sim_backend():
    """A CUDA backend on the emulator runtime (one per test module); ``be.called`` lists
    the entry points it fetched, in order, so tests can check which kernels ran."""
    if "cudasim" not in gpuconv.available_backends():
        pytest.skip(gpuconv.backend_info()["backends"]["cudasim"]["reason"])
    from gpuconv._cuda.backend import CudaBackend
    from gpuconv.testing.cudasim import SimRuntime
    be = CudaBackend(SimRuntime())
    called = []
    orig = be.modules.function

    def spy(pass_name, name):
        called.append(name)
        return orig(pass_name, name)

    be.modules.function = spy
    be.called = called
    return be


@pytest.fixture
def igemm_env(monkeypatch):
    """The implicit-GEMM engine forced (GPUCONV_CUDA_ALGO=igemm); call it with (tile config,
    index width '32'/'64', split-K slices or None for the automatic rule)."""
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")

    def set_(cfg, index, splits):
        monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", cfg)
        monkeypatch.setenv("GPUCONV_CUDA_INDEX", "64" if index == "64" else "")
        if splits is None:
            monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
        else:
            monkeypatch.setenv("GPUCONV_IGEMM_SPLITS", str(splits))
    return set_


def np_dtype(name):
    """The NumPy dtype of a dtype name; bfloat16 needs ml_dtypes (skips without it).
    Test modules import it with ``from conftest import np_dtype``."""
    if name == "bfloat16":
        ml = pytest.importorskip("ml_dtypes")
        return np.dtype(ml.bfloat16)
    return np.dtype(name)
