"""CUDA launch limits of every device gpuconv targets (sm_60 and newer): one home.

The launch helper (:func:`gpuconv._cuda.launch.check_config`) and the emulator
(:mod:`gpuconv._runtimes.cudasim`) both check against these.
"""
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
# dynamic shared memory per block: what a launch may use without raising the kernel's
# attribute, and the most any target device allows after raising it (sm_90: 227 KiB)
SHARED_MEM_PER_BLOCK = 48 * 1024
SHARED_MEM_PER_BLOCK_OPTIN = 227 * 1024
# grid-stride kernels never need more blocks than this to fill any current GPU
MAX_BLOCKS_1D = 65535 * 8
INT32_LIMIT = 2**31 - 1
# largest element count whose 32-bit index math survives a grid-stride loop's last step
INT32_SAFE = INT32_LIMIT - MAX_BLOCKS_1D * MAX_THREADS_PER_BLOCK
