"""THE launch helper: grid/block computation and limit checks for every kernel launch.

Only :func:`launch` calls ``runtime.launch``; the limits are those of
:mod:`gpuconv._runtimes.limits`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .._runtimes.limits import (INT32_SAFE, MAX_BLOCK, MAX_BLOCKS_1D, MAX_GRID,
                                MAX_THREADS_PER_BLOCK, SHARED_MEM_PER_BLOCK)

DEFAULT_THREADS = 256


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


def check_config(cfg: LaunchConfig, shared_mem: int = 0, max_shared: int = SHARED_MEM_PER_BLOCK) -> None:
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
