"""cudasim: gpuconv's CUDA emulator -- the unchanged .cu kernels on CPU fibers.

Kernel sources are compiled by the system C++ compiler with a shim header
(``cudasim.h``) and run one CUDA thread per fiber, blocks one after another,
fibers switching at every barrier and warp operation in a chosen order::

    from gpuconv.testing.cudasim import SimRuntime
    sim = SimRuntime()                       # schedule 'forward' (or $GPUCONV_CUDASIM_SCHEDULE)
    mod = sim.build(source, ["my_kernel"], ("--std=c++14",))
    fn = sim.get_function(mod, "my_kernel")
    x = sim.ascontiguous(host_array)         # guarded "device" memory
    y = sim.empty(x.shape, x.dtype)          # poisoned with NaN bytes
    sim.launch(fn, (blocks,), (256,), (x, y, np.int32(x.size)), 0)
    with sim.schedule("reverse"):            # or 'random', 'warp', 'cycle'
        sim.launch(...)

Strict by design: out-of-bounds accesses (guard pages + canaries), writes to
const inputs, barriers not reached by the whole block, warp operations whose
mask lanes do not all arrive, deadlocks, parameters that do not match the C
signature, and launches past the time limit are exceptions naming the kernel,
block, thread and source line.  See ``SCHEDULES`` and the error classes below.
"""
from ._build import CudaSimCompileError, cache_dir
from ._runtime import (SCHEDULES, AsyncCopyError, BankCounts, CudaSimError, KernelCrashError,
                       KernelTimeoutError, Kernel, LaunchArgumentError, LaunchConfigError,
                       MemoryAccessError, MmaOperandError, Module, SimRuntime, SyncError,
                       WarpSyncError, count_bank_conflicts, probe)

__all__ = ["probe", "SimRuntime", "SCHEDULES", "Kernel", "Module", "CudaSimError",
           "CudaSimCompileError", "LaunchArgumentError", "LaunchConfigError", "SyncError",
           "WarpSyncError", "MemoryAccessError", "KernelTimeoutError", "KernelCrashError",
           "AsyncCopyError", "MmaOperandError", "cache_dir", "count_bank_conflicts",
           "BankCounts"]
