"""The device runtime on a real GPU, through CuPy (RawModule, NVRTC, CuPy's disk cache)."""
from __future__ import annotations

import os

from . import DeviceRuntime


class CupyRuntime(DeviceRuntime):
    """Device runtime on a real GPU through CuPy (RawModule, NVRTC, disk cache)."""

    name = "cupy"

    def __init__(self):
        import cupy
        self.xp = cupy
        self._cp = cupy
        # GPUCONV_POISON_OUTPUTS=1 (tests, benchmarks/gpu_check.sh): every array made by
        # empty() is filled with all-ones bytes (NaN in every float type) before a
        # kernel writes it, as the emulator does, so an unwritten element shows up.
        self.poison_outputs = os.environ.get("GPUCONV_POISON_OUTPUTS", "").strip() == "1"

    def device_key(self):
        return self._cp.cuda.Device().id

    def build(self, source, names, options):
        mod = self._cp.RawModule(code=source, options=tuple(options))
        mod.compile()
        return mod

    def get_function(self, module, name):
        return module.get_function(name)

    def launch(self, fn, grid, block, args, shared_mem):
        fn(grid, block, args, shared_mem=shared_mem)

    def empty(self, shape, dtype):
        a = self._cp.empty(shape, dtype=dtype)
        if self.poison_outputs:
            a.reshape(-1).view(self._cp.uint8).fill(0xFF)  # on the current stream: capturable
        return a

    def ascontiguous(self, a):
        return self._cp.ascontiguousarray(a)

    def device_scope(self, a):  # noqa: D102
        """Run on the device that holds `a` (arrays on GPU 1 run on GPU 1)."""
        return a.device
