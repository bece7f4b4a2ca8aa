"""Host side of a CUDA call: planned once per geometry, capturable in a CUDA graph.

A counting runtime (kernels never run; every runtime call is recorded) drives the
unchanged CUDA backend: a repeated call with a freshly parsed (equal) geometry does
no planning (every plan cache only hits), and the hot path asks the runtime for
nothing but contiguous inputs, pool allocations and launches -- no build, no
function lookup, nothing that could synchronise the host.  A source scan keeps host
synchronisation out of the call path's modules.
"""
import contextlib
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest

from gpuconv import _geometry as geo
from gpuconv._cuda import depthwise as dw
from gpuconv._cuda import plans
from gpuconv._cuda.backend import CudaBackend
from gpuconv._runtimes import DeviceRuntime


class CountingRuntime(DeviceRuntime):
    name = "counting"
    xp = np

    def __init__(self):
        self.calls = []

    def device_key(self):
        return 0

    def device_scope(self, a):
        self.calls.append("device_scope")
        return contextlib.nullcontext()

    def build(self, source, names, options):
        self.calls.append("build")
        return object()

    def get_function(self, module, name):
        self.calls.append("get_function")
        return name

    def launch(self, fn, grid, block, args, shared_mem):
        self.calls.append("launch")

    def empty(self, shape, dtype):
        self.calls.append("empty")
        return np.empty(shape, dtype)

    def ascontiguous(self, a):
        self.calls.append("ascontiguous")
        return np.ascontiguousarray(a)


GEOMETRIES = {
    "depthwise s1": ((2, 8, 9, 9), (8, 1, 3, 3), dict(padding=1, groups=8)),
    "depthwise s2": ((2, 8, 9, 9), (16, 1, 3, 3), dict(stride=2, padding=1, groups=8)),
    "dense": ((2, 8, 9, 9), (16, 8, 3, 3), dict(padding=1)),
    "dense s2": ((2, 8, 9, 9), (16, 8, 3, 3), dict(stride=2, padding=1)),
}
CACHES = (plans.geo_args, plans.dgrad_phases, plans._use_tiled, geo.dgrad_as_forward,
          dw._plans, dw._geo, dw._phases, dw._wgrad_split)


def _round(be, algo, monkeypatch):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    for xs, ws, kw in GEOMETRIES.values():
        g = geo.conv_geometry("conv2d", xs, ws, dtype=np.float32, **kw)  # parsed anew
        x = np.ones(g.x_shape, np.float32)
        w = np.ones(g.w_shape, np.float32)
        gy = np.ones(g.y_shape, np.float32)
        be.forward(x, w, None, g)
        be.input_grad(gy, w, g)
        be.weight_grad(x, gy, g)


@pytest.mark.parametrize("algo", ["auto", "direct", "tiled"])
def test_repeated_call_does_no_planning_and_no_lookup(monkeypatch, algo):
    be = CudaBackend(CountingRuntime())
    _round(be, algo, monkeypatch)
    misses = [c.cache_info().misses for c in CACHES]
    hits = sum(c.cache_info().hits for c in CACHES)
    be.rt.calls.clear()
    _round(be, algo, monkeypatch)
    assert [c.cache_info().misses for c in CACHES] == misses
    assert sum(c.cache_info().hits for c in CACHES) > hits
    # the hot path: inputs made contiguous, outputs from the pool, launches
    assert set(be.rt.calls) <= {"device_scope", "ascontiguous", "empty", "launch"}, be.rt.calls
    assert be.rt.calls.count("launch") >= 3 * len(GEOMETRIES)


def test_depthwise_geometries_take_the_depthwise_kernels(monkeypatch):
    be = CudaBackend(CountingRuntime())
    names = []
    orig = be.modules.function
    be.modules.function = lambda p, n: names.append(n) or orig(p, n)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    for key in ("depthwise s1", "depthwise s2"):
        xs, ws, kw = GEOMETRIES[key]
        g = geo.conv_geometry("conv2d", xs, ws, dtype=np.float32, **kw)
        be.forward(np.ones(g.x_shape, np.float32), np.ones(g.w_shape, np.float32), None, g)
        be.input_grad(np.ones(g.y_shape, np.float32), np.ones(g.w_shape, np.float32), g)
        be.weight_grad(np.ones(g.x_shape, np.float32), np.ones(g.y_shape, np.float32), g)
    assert names and all(n.startswith("gpuconv_dw_") for n in names), names


# host synchronisation or device->host copies: none of these may appear on the call path
SYNC = re.compile(r"\.get\(\s*\)|asnumpy|synchroni[sz]e|\.item\(\s*\)|\.tolist\(|"
                  r"np\.asarray|numpy\.asarray|__array__|\.to_host|\.get\(stream")


@pytest.mark.parametrize("module", ["gpuconv/_api.py", "gpuconv/_cuda/backend.py",
                                    "gpuconv/_cuda/depthwise.py", "gpuconv/_cuda/launch.py",
                                    "gpuconv/_cuda/plans.py", "gpuconv/_cuda/sources.py",
                                    "gpuconv/_runtimes/cupy.py"])
def test_call_path_has_no_host_synchronisation(module):
    """The code only (tokenize drops comments, docstrings and string literals)."""
    root = Path(__file__).resolve().parents[1]
    src = (root / module).read_text()
    lines = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            lines.setdefault(tok.start[0], []).append(tok.string)
    code = ["".join(v) for v in lines.values()]
    hits = [ln for ln in code if SYNC.search(ln)]
    assert not hits, f"{module}: possible host synchronisation on the call path: {hits}"
