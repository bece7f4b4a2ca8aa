"""Device runtimes: where the CUDA backend's kernels run.

The CUDA backend (:mod:`gpuconv._cuda`) is written once against
:class:`DeviceRuntime`; two runtimes implement it:

* :class:`gpuconv._runtimes.cupy.CupyRuntime` -- a real GPU (CuPy RawModule, NVRTC);
* :class:`gpuconv._runtimes.cudasim.SimRuntime` -- the same ``.cu`` sources compiled
  by g++ and run on CPU fibers with strict checks (the CPU emulator).

The CUDA launch limits every runtime and the launch helper check live in
:mod:`gpuconv._runtimes.limits`.
"""
from __future__ import annotations

import abc

from . import limits


class DeviceRuntime(abc.ABC):
    """What the CUDA backend needs from a device.  Every member is required.

    ``name``            'cupy' or 'cudasim'
    ``xp``              array module of results (cupy / numpy)
    ``max_blocks_1d``   cap of a grid-stride kernel's 1-D grid (the emulator's tests
                        lower it so that every grid-stride loop runs several passes)
    """

    name: str
    xp: object
    max_blocks_1d: int = limits.MAX_BLOCKS_1D

    @abc.abstractmethod
    def device_key(self):
        """Hashable id of the current device (built modules are cached per device)."""

    @abc.abstractmethod
    def device_scope(self, a):
        """Context manager running work on the device that holds array ``a``."""

    @abc.abstractmethod
    def build(self, source: str, entry_names, options):
        """Compile one full source text into a module."""

    @abc.abstractmethod
    def get_function(self, module, name: str):
        """The kernel handle of entry point ``name``."""

    @abc.abstractmethod
    def launch(self, fn, grid, block, args, shared_mem):
        """Queue one launch; ``args`` are device arrays and typed numpy scalars."""

    @abc.abstractmethod
    def empty(self, shape, dtype):
        """A fresh device array (the emulator poisons it with NaN bytes)."""

    @abc.abstractmethod
    def ascontiguous(self, a):
        """A device-contiguous array with ``a``'s values (never modifies ``a``)."""


__all__ = ["DeviceRuntime", "limits"]
