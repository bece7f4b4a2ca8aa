"""CUDA sources, module building, entry-point names and THE launch helper.

The CUDA backend (``backend.py``) is written once against a small
*device runtime* interface, implemented here for CuPy (real GPUs) and in
``gpuconv._runtimes.cudasim`` for the CPU emulator:

``name``               'cupy' or 'cudasim'
``xp``                 array module of results (cupy / numpy)
``device_key()``       hashable id of the current device (modules are cached per device)
``build(source, entry_names, options)``  compile one full source text -> module
``get_function(module, name)``           -> kernel handle
``launch(fn, grid, block, args, shared_mem)``  queue one launch; ``args`` are device
                       arrays and typed numpy scalars (np.int32 / np.int64 / np.float32 ...)
``empty(shape, dtype)``  fresh device array (the emulator poisons it with NaN)
``ascontiguous(a)``      device-contiguous array with a's values (never modifies a)

Only :func:`launch` in this module calls ``runtime.launch``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


# dtype name -> (suffix used in entry-point names, C++ storage type)
DTYPES = {
    "float16": ("f16", "gc_half"),
    "bfloat16": ("bf16", "gc_bf16"),
    "float32": ("f32", "float"),
    "float64": ("f64", "double"),
}
PASSES = ("fwd", "dgrad", "wgrad")
# source file of each pass and the entry points it defines (per dtype suffix)
SOURCES = {
    "fwd": ("conv_fwd.cu", ("gpuconv_fwd_{t}_i32", "gpuconv_fwd_{t}_i64",
                            "gpuconv_fwdtile_{t}_i32", "gpuconv_fwdtile_{t}_i64")),
    "dgrad": ("conv_dgrad.cu", ("gpuconv_dgrad_{t}_i32", "gpuconv_dgrad_{t}_i64")),
    "wgrad": ("conv_wgrad.cu", ("gpuconv_wgrad_{t}_i32", "gpuconv_wgrad_{t}_i64",
                                "gpuconv_wgradtile_{t}_i32", "gpuconv_wgradtile_{t}_i64",
                                "gpuconv_wgrad_reduce_{t}")),
}
COMMON = "common.cuh"
WARP = "warp.cuh"  # gc_mma_* / gc_ldmatrix_* / gc_cp_async_* (inline PTX; emulator calls)
INT32_LIMIT = 2**31 - 1

# launch limits of every CUDA device we target (sm_60+)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
DEFAULT_THREADS = 256
# grid-stride kernels never need more blocks than this to fill any current GPU
MAX_BLOCKS_1D = 65535 * 8
INT32_SAFE = INT32_LIMIT - MAX_BLOCKS_1D * MAX_THREADS_PER_BLOCK


def kernel_dir():
    """Directory (or Traversable) holding the .cu sources: package data when
    installed (``gpuconv.kernels``), the repository's ``kernels/`` otherwise."""
    try:
        from importlib.resources import files
        d = files("gpuconv.kernels")
        if d.joinpath(COMMON).is_file():
            return d
    except (ImportError, ModuleNotFoundError, TypeError, AttributeError):
        pass
    d = Path(__file__).resolve().parents[2] / "kernels"
    if (d / COMMON).is_file():
        return d
    raise FileNotFoundError("gpuconv: CUDA kernel sources not found (neither the package data "
                            "gpuconv.kernels nor a kernels/ directory beside the package)")


def list_sources() -> list:
    """Names of the shipped kernel source files."""
    d = kernel_dir()
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".cu", ".cuh")))


def read_source(filename: str) -> str:
    return kernel_dir().joinpath(filename).read_text(encoding="utf-8")


def full_source(pass_name: str) -> str:
    """common.cuh and warp.cuh prepended as text (CuPy's cache key covers the source text only)."""
    fname = SOURCES[pass_name][0]
    return "".join(f"// ---- {f}\n" + read_source(f) + "\n" for f in (COMMON, WARP, fname))


def entry_names(pass_name: str) -> list:
    return [n.format(t=suffix) for suffix, _ in DTYPES.values() for n in SOURCES[pass_name][1]]


def all_entry_names() -> list:
    return [n for p in PASSES for n in entry_names(p)]


# ---------------------------------------------------------------------------- launch geometry
@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple
    block: tuple


def grid_1d(work_items: int, threads: int = DEFAULT_THREADS,
            max_blocks: int = MAX_BLOCKS_1D) -> LaunchConfig:
    """1-D launch for a grid-stride kernel covering `work_items` items.

    Never exceeds the hardware grid limit: kernels loop (grid-stride) over
    whatever a capped grid does not cover.
    """
    if threads < 1 or threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"launch: threads={threads} outside 1..{MAX_THREADS_PER_BLOCK}")
    blocks = max(1, min(math.ceil(max(work_items, 0) / threads), max_blocks, MAX_GRID[0]))
    return LaunchConfig((blocks, 1, 1), (threads, 1, 1))


def check_config(cfg: LaunchConfig, shared_mem: int = 0, max_shared: int = 48 * 1024) -> None:
    gx, gy, gz = cfg.grid
    bx, by, bz = cfg.block
    for i, (v, lim) in enumerate(zip(cfg.grid, MAX_GRID)):
        if not 1 <= v <= lim:
            raise ValueError(f"launch: grid[{i}]={v} outside 1..{lim}")
    for i, (v, lim) in enumerate(zip(cfg.block, MAX_BLOCK)):
        if not 1 <= v <= lim:
            raise ValueError(f"launch: block[{i}]={v} outside 1..{lim}")
    if bx * by * bz > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"launch: block {cfg.block} has {bx * by * bz} threads, "
                         f"more than {MAX_THREADS_PER_BLOCK}")
    if not 0 <= shared_mem <= max_shared:
        raise ValueError(f"launch: shared_mem={shared_mem} bytes outside 0..{max_shared}")


def needs_int64(*sizes) -> bool:
    """True when 32-bit index math could overflow for tensors of these element counts.

    Grid-stride loops step past the last index by up to one grid's worth of
    threads, so the 32-bit variants are used only below 2^31 - (largest grid).
    """
    return any(int(s) > INT32_SAFE for s in sizes)


def launch(runtime, fn, cfg: LaunchConfig, args, shared_mem: int = 0) -> None:
    """The only place a kernel is launched (on cupy and on the emulator alike)."""
    check_config(cfg, shared_mem)
    for a in args:
        if isinstance(a, (bool, int, float)):
            raise TypeError(f"launch: untyped Python scalar {a!r}; pass np.int32/np.int64/"
                            f"np.float32 so the C signature is matched exactly")
    runtime.launch(fn, cfg.grid, cfg.block, tuple(args), shared_mem)


# ---------------------------------------------------------------------------- module cache
class ModuleCache:
    """Built modules per (runtime, device, pass); built on first use or by precompile()."""

    def __init__(self, runtime):
        self.runtime = runtime
        self._modules = {}

    def module(self, pass_name):
        key = (self.runtime.device_key(), pass_name)
        mod = self._modules.get(key)
        if mod is None:
            mod = self.runtime.build(full_source(pass_name), entry_names(pass_name),
                                     compile_options())
            self._modules[key] = mod
        return mod

    def function(self, pass_name, name):
        return self.runtime.get_function(self.module(pass_name), name)

    def precompile(self):
        for p in PASSES:
            mod = self.module(p)
            for n in entry_names(p):
                self.runtime.get_function(mod, n)


def compile_options() -> tuple:
    return ("--std=c++14",)


# ---------------------------------------------------------------------------- CuPy runtime
class CupyRuntime:
    """Device runtime on a real GPU through CuPy (RawModule, NVRTC, disk cache)."""

    name = "cupy"

    def __init__(self):
        import cupy
        self.xp = cupy
        self._cp = cupy

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
        return self._cp.empty(shape, dtype=dtype)

    def ascontiguous(self, a):
        return self._cp.ascontiguousarray(a)

    def device_scope(self, a):
        """Run on the device that holds `a` (arrays on GPU 1 run on GPU 1)."""
        return a.device
