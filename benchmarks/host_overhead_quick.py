"""Per-call host overhead of the CUDA path, quick form: the public API and the backend
call on a runtime whose launch does nothing (so what is timed is Python work only:
argument parsing, dispatch, plan lookup, argument packing, the launch helper).

    python benchmarks/host_overhead_quick.py

Tiny shapes; best and median of 7 rounds of the per-call median over 2000 calls.
(branch gpucheck's benchmarks/host_overhead.py is the full measurement.)"""
import sys, time, statistics, os
import numpy as np
sys.path.insert(0, os.getcwd())  # run from the repository root
import gpuconv
from gpuconv import _dispatch
from gpuconv._runtimes import DeviceRuntime
from gpuconv._cuda.backend import CudaBackend

class Counting(DeviceRuntime):
    name = "cudasim"
    xp = np
    def __init__(self): self.launches = 0
    def device_key(self): return 0
    def device_scope(self, a):
        import contextlib; return contextlib.nullcontext()
    def build(self, source, names, options): return object()
    def get_function(self, module, name): return name
    def launch(self, fn, grid, block, args, shared_mem): self.launches += 1
    def empty(self, shape, dtype): return np.empty(shape, dtype)
    def ascontiguous(self, a): return np.ascontiguousarray(a)

rt = Counting()
be = CudaBackend(rt)
_dispatch._instances["cudasim"] = be
rng = np.random.default_rng(0)
cases = {
    "dw3x3": ((1, 8, 8, 8), (8, 1, 3, 3), dict(padding=1, groups=8)),
    "dw3x3s2": ((1, 8, 8, 8), (8, 1, 3, 3), dict(stride=2, padding=1, groups=8)),
    "dense3x3": ((1, 8, 8, 8), (8, 8, 3, 3), dict(padding=1)),
}
def timeit(f, n=2000, rounds=7):
    for _ in range(200): f()
    meds = []
    for _ in range(rounds):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        meds.append(statistics.median(ts))
    return min(meds) * 1e6, statistics.median(meds) * 1e6
print(f"{'case':10s} {'pass':6s} {'api us (best/med)':>20s} {'backend us':>16s} launches/call")
for name, (xs, ws, kw) in cases.items():
    x = rng.standard_normal(xs).astype(np.float32); w = rng.standard_normal(ws).astype(np.float32)
    g = gpuconv._geometry.conv_geometry("conv2d", xs, ws, dtype=np.float32, **kw)
    gy = rng.standard_normal(g.y_shape).astype(np.float32)
    for p, api, bk in (
        ("fwd", lambda: gpuconv.conv(x, w, backend="cudasim", **kw), lambda: be.forward(x, w, None, g)),
        ("dgrad", lambda: gpuconv.conv_input_grad(gy, w, xs, backend="cudasim", **kw), lambda: be.input_grad(gy, w, g)),
        ("wgrad", lambda: gpuconv.conv_weight_grad(x, gy, ws, backend="cudasim", **kw), lambda: be.weight_grad(x, gy, g))):
        rt.launches = 0; bk(); nl = rt.launches
        a = timeit(api); b = timeit(bk)
        print(f"{name:10s} {p:6s} {a[0]:9.1f} / {a[1]:7.1f} {b[0]:7.1f} / {b[1]:6.1f} {nl}")
