"""CPU backend (NumPy): chunked im2col + BLAS GEMM, tap loops for depthwise."""
from .dense import (NumpyBackend, clear_workspace_cache, get_num_threads, get_workspace_limit,
                    set_workspace_limit)

__all__ = ["NumpyBackend", "get_workspace_limit", "set_workspace_limit", "clear_workspace_cache",
           "get_num_threads"]
