"""Device runtimes: where the CUDA backend's kernels run (cupy: a real GPU; cudasim: the CPU emulator)."""
