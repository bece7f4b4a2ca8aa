"""CUDA plans: which kernel family runs a geometry, its grid, its shared memory, its scalars.

Sizes come from :mod:`gpuconv._geometry`; limits from :mod:`gpuconv._runtimes.limits`;
tile constants from :mod:`gpuconv._cuda.sources` (which writes them into the kernels).
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from .. import _geometry as geo
from .._runtimes.limits import INT32_LIMIT, MAX_BLOCKS_1D, MAX_GRID
from .launch import DEFAULT_THREADS as THREADS  # every kernel's block size
from .sources import TILE_K, TILE_M, TILE_N

# the tiled forward keeps a per-tap offset table (16 bytes a tap) in shared memory
MAX_TAPS = 512


# Plans are pure functions of the frozen geometry: cached, so a repeated call does no
# planning (the environment that forces an algorithm is part of the key).
@functools.lru_cache(maxsize=1024)
def geo_args(g):
    """The GC_GEO_PARAMS scalars of common.cuh: 3 spatial dims, leading dims padded with 1."""
    pad = 3 - g.nd

    def three(t, fill):
        return (fill,) * pad + tuple(t)

    vals = ((g.N, g.C, g.K, g.groups) + three(g.in_spatial, 1) + three(g.kernel, 1)
            + three(g.out_spatial, 1) + three(g.stride, 1) + three(g.dilation, 1)
            + three(g.pad_lo, 0))
    return tuple(np.int32(v) for v in vals)


@functools.lru_cache(maxsize=1024)
def dgrad_phases(g):
    """The stride phases of :func:`gpuconv._geometry.stride_phases` as kernel scalars."""
    return tuple(np.int32(v) for v in geo.stride_phases(g))


def split_reduction(blocks: int, red: int, target_blocks: int, min_per_split: int, align: int):
    """(splits, chunk): cut a reduction of length `red` into `splits` slices of `chunk`
    (a multiple of `align`) so that blocks*splits approaches target_blocks; never an
    empty slice, never more than the grid-dimension limit 65535."""
    want = max(1, -(-target_blocks // max(blocks, 1)))
    splits = max(1, min(want, red // max(min_per_split, 1), MAX_GRID[1]))
    chunk = -(-red // splits)
    chunk = max(align, -(-chunk // align) * align)
    splits = max(1, -(-red // chunk))
    return splits, chunk


def wgrad_plan(welems: int, red: int, target_blocks: int = 2048,
               min_per_split: int = 4 * THREADS, max_blocks: int = MAX_BLOCKS_1D):
    """(grid_x, splits, chunk) for the direct split weight-gradient reduction.

    welems weight elements (one block each, grid-stride), each reduced over
    `red` positions; splits over the reduction (grid y) are added until about
    `target_blocks` blocks exist, keeping at least `min_per_split` positions each.
    """
    grid_x = max(1, min(welems, max_blocks))
    splits, chunk = split_reduction(grid_x, red, target_blocks, min_per_split, 1)
    return grid_x, splits, chunk


def _algo():
    """GPUCONV_CUDA_ALGO: 'auto' (default), 'direct', 'tiled' (the 64x64 tiled kernels),
    'depthwise', 'igemm' (the implicit-GEMM engine, its default policy: tensor ops for
    the half types' forward) or 'simt' (the engine, SIMT policy only); tests force each
    ('depthwise' sends every geometry the depthwise kernels fit to them)."""
    a = os.environ.get("GPUCONV_CUDA_ALGO", "auto").strip().lower() or "auto"
    if a not in ("auto", "direct", "tiled", "depthwise", "igemm", "simt"):
        raise ValueError(f"GPUCONV_CUDA_ALGO={a!r}: expected auto, direct, tiled, depthwise, "
                         f"igemm or simt")
    return a


def use_igemm(g) -> bool:
    return _use_igemm(g, _algo())


@functools.lru_cache(maxsize=1024)
def _use_igemm(g, algo) -> bool:
    """The implicit-GEMM engine takes dense and grouped layers ('auto'); depthwise-like
    layers (few channels per group) and problems it does not fit go to the direct
    kernels."""
    from . import igemm
    if algo in ("direct", "tiled") or not igemm.fits(g):
        return False
    if algo in ("igemm", "simt"):
        return True
    return g.Kg >= 8 and g.Cg * g.taps >= 8


def m_tiles(g) -> int:
    """Grid y of the tiled kernels: groups * M tiles of the output channels."""
    return g.groups * -(-g.Kg // TILE_M)


def use_tiled(g) -> bool:
    return _use_tiled(g, _algo())


@functools.lru_cache(maxsize=1024)
def _use_tiled(g, algo) -> bool:
    """Implicit-GEMM tiles pay off for dense/grouped layers; depthwise-like layers
    (few channels per group) use the direct kernels.  Grid y = groups * M tiles
    must fit 65535."""
    fits = (m_tiles(g) <= MAX_GRID[1] and g.taps <= MAX_TAPS
            and math.prod(g.in_spatial) <= INT32_LIMIT)  # tap offsets are 32-bit
    if algo in ("direct", "igemm", "simt") or not fits:
        return False
    if algo == "tiled":
        return True
    return g.Kg >= 8 and g.Cg * g.taps >= 8


def tile_smem(g) -> int:
    """Bytes of the A tile (rows padded to TILE_M + 1) and B tile of the tiled kernels."""
    return (TILE_K * (TILE_M + 1) + TILE_K * TILE_N) * g.accumulate_dtype.itemsize
