"""A numpy stand-in for the few CuPy names benchmarks/gpu_check.py uses (tests only).

It lets tests/test_gpu_check.py run the GPU check's measuring code end to end on a
machine without a GPU: arrays are numpy arrays (so gpuconv runs its numpy backend),
events read the host clock, a captured graph replays nothing.  Nothing here is
imported unless a test puts this folder first on sys.path of a subprocess.
"""
import time
import types

import numpy as np
from numpy import abs, array_equal, copyto, float16, float32, float64, isfinite, matmul  # noqa
from numpy import uint8  # noqa

__version__ = "0.0-fake"


class ndarray:  # noqa: N801 - nothing is ever one: gpuconv sees numpy arrays
    pass


class _Arr(np.ndarray):
    """numpy array with a ``.data.ptr`` as a device array has."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _dev(a):
    return np.asarray(a).view(_Arr)


def ones(shape, dtype=np.float64):
    return _dev(np.ones(shape, dtype))


def empty(shape, dtype=np.float64):
    return _dev(np.empty(shape, dtype))


def empty_like(a):
    return _dev(np.empty_like(a))


def asarray(a):
    return _dev(a)


def from_dlpack(a):
    return _dev(np.from_dlpack(a))


class _Graph:
    launches = 0

    def launch(self, stream=None):
        _Graph.launches += 1

    def upload(self, stream=None):
        pass


class Stream:
    def __init__(self, non_blocking=False):
        self.ptr = 1
        self._capturing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        self._capturing = True

    def end_capture(self):
        self._capturing = False
        return _Graph()

    def is_capturing(self):
        return self._capturing

    def synchronize(self):
        pass


class Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def get_elapsed_time(a, b):
    return (b.t - a.t) * 1e3


class Device:
    def __init__(self, i=0):
        self.id = i

    def synchronize(self):
        pass


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(i):
        return {"name": b"Fake GPU", "multiProcessorCount": 1, "l2CacheSize": 2**20,
                "totalGlobalMem": 2**30, "major": 9, "minor": 0}

    @staticmethod
    def memcpyAsync(dst, src, size, kind, stream):
        pass


class _Rng:
    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def standard_normal(self, shape, dtype=np.float64):
        return _dev(self._g.standard_normal(shape).astype(dtype))


class _Pool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _Pool()


cuda = types.SimpleNamespace(Stream=Stream, Event=Event, Device=Device, runtime=_Runtime,
                             get_elapsed_time=get_elapsed_time,
                             set_allocator=lambda a=None: None)
random = types.SimpleNamespace(default_rng=_Rng)
