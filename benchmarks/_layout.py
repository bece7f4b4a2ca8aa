"""The CUDA backend's internals that the benchmark drivers time or plan with, named in
one place (``gpuconv/_cuda``: ``backend``, ``plans``, ``launch``, ``sources``), so a
move there is one edit here.  The drivers read these names only; they change nothing."""
from __future__ import annotations

import functools
import types

# dtype and index suffixes of the entry-point names (DESIGN.md: gpuconv_<family>_<dtype>_<idx>)
DTYPE_SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
INDEX_SUFFIXES = ("i32", "i64")


@functools.lru_cache(maxsize=None)
def cuda():
    """Namespace: CudaBackend, use_tiled, use_igemm, geo_args, dgrad_phases, wgrad_plan,
    dgrad_as_forward(g), flip_weight(xp, w, g), grid_1d, launch, all_entry_names."""
    from gpuconv import _geometry as geo
    from gpuconv._cuda import backend as B
    from gpuconv._cuda import launch as L
    from gpuconv._cuda import plans as P
    from gpuconv._cuda import sources as S
    return types.SimpleNamespace(
        CudaBackend=B.CudaBackend, use_tiled=P.use_tiled, use_igemm=P.use_igemm,
        geo_args=P.geo_args,
        dgrad_phases=P.dgrad_phases, wgrad_plan=P.wgrad_plan,
        dgrad_as_forward=geo.dgrad_as_forward,
        flip_weight=lambda xp, w, g: geo.flip_weight(w, g),
        grid_1d=L.grid_1d, launch=L.launch, all_entry_names=S.all_entry_names)


def grid_1d_of(be, work_items):
    """The backend's own 1-D grid for `work_items` (its runtime's block cap)."""
    return be._grid_1d(work_items)


def entry_family(name: str) -> str:
    """'gpuconv_fwdtile_f32_i32' -> 'fwdtile'; 'gpuconv_wgrad_reduce_bf16' -> 'wgrad_reduce'."""
    drop = set(DTYPE_SUFFIX.values()) | set(INDEX_SUFFIXES)
    parts = name.split("_")
    if parts and parts[0] == "gpuconv":
        parts = parts[1:]
    return "_".join(p for p in parts if p not in drop)
