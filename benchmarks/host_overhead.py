#!/usr/bin/env python3
"""Per-call host (Python) overhead of the CUDA backend path, measured without a GPU.

What is timed: the real public call (``gpuconv.conv`` / ``conv_input_grad`` /
``conv_weight_grad``: argument checks, array-namespace detection, geometry,
backend dispatch, the CUDA backend's plan, output allocation and the launch
helper) driven through :class:`CountingRuntime`, a device
runtime that implements the runtime protocol on the host and *counts* launches
instead of running them.  Nothing is compiled or executed; the kernels' sources
are read once for the module cache.

What it is not: CuPy's own per-call costs.  Here ``empty`` hands out a cached
host buffer (like CuPy's memory pool hands out a cached block) and ``launch``
appends to a counter, where CuPy allocates from its pool (a few us) and packs the
kernel arguments for cuLaunchKernel (several us).  Those are measured on the GPU
by ``benchmarks/gpu_check.sh`` (the ``host_us`` column: the Python call with the
real CuPy runtime, no synchronisation) and by ``--runtime cupy`` here.

Where the time goes: each stage is also timed on its own (the same calls the
public function makes, in a loop of their own), and cProfile's top functions for
the whole call are listed.  Every call is timed on its own; numbers are medians
(10th-90th percentiles beside them) of rounds x calls single calls.

Usage (repository root)::

    python benchmarks/host_overhead.py [--quick] [--json FILE] [--runtime counting|cupy]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _layout import DTYPE_SUFFIX, cuda, entry_family, grid_1d_of  # noqa: E402,F401


class CountingRuntime:
    """Device-runtime protocol on the host: launches are counted, never run.

    ``empty`` returns an uninitialised view of a cached host buffer per (shape, dtype):
    no page faults or mmap per call, as a warm device memory pool.  ``launches``
    counts entry-point names (and 'copy' for the copies ``ascontiguous`` stands in
    for); ``last`` keeps the last launch (grid, block, shared).
    """

    name = "counting"

    def __init__(self):
        self.xp = np
        self.launches = collections.Counter()
        self.last = None
        self._buffers = {}

    max_blocks_1d = 65535 * 8  # the grid-stride kernels' cap (as on a device)

    def device_key(self):
        return 0

    def device_scope(self, a):
        return contextlib.nullcontext()

    def build(self, source, names, options):
        return {"names": frozenset(names)}

    def get_function(self, module, name):
        if name not in module["names"]:
            raise KeyError(f"entry point {name!r} is not in its module")
        return name

    def launch(self, fn, grid, block, args, shared_mem):
        self.launches[fn] += 1
        self.last = (fn, grid, block, shared_mem)

    def empty(self, shape, dtype):
        key = (tuple(shape), np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf.view()

    def ascontiguous(self, a):
        """As on the device: a contiguous array passes through; anything else is copied
        by a kernel, so here it is counted as a launch ('copy') and a cached buffer is
        returned (never a host copy, whose cost would be the array's size)."""
        if a.flags.c_contiguous:
            return a
        self.launches["copy"] += 1
        return self.empty(a.shape, a.dtype)


@contextlib.contextmanager
def counting_backend():
    """Route ``backend='cudasim'`` calls through a CudaBackend on a CountingRuntime for
    the duration (the dispatcher's instance table is patched and restored).  Yields
    the backend."""
    from gpuconv import _dispatch
    be = cuda().CudaBackend(CountingRuntime())
    saved = _dispatch._instances.get("cudasim", None)
    _dispatch._instances["cudasim"] = be
    try:
        yield be
    finally:
        if saved is None:
            _dispatch._instances.pop("cudasim", None)
        else:
            _dispatch._instances["cudasim"] = saved


def launched_families(layer_kwargs, pass_name, x_shape, w_shape, dtype, env=None):
    """Entry-point families (names without dtype/index suffix) that one call launches,
    found by running the CUDA backend's plan on the counting runtime."""
    import gpuconv
    env = env or {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with counting_backend() as be:
            x, w, gy = _arrays(x_shape, w_shape, layer_kwargs, dtype)
            _call(gpuconv, pass_name, x, w, gy, layer_kwargs, "cudasim")()
            return sorted({entry_family(n) for n in be.rt.launches})
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _arrays(x_shape, w_shape, kw, dtype, xp=np, rng=None):
    from gpuconv import _geometry
    rng = rng or np.random.default_rng(0)
    g = _geometry.conv_geometry("overhead", tuple(x_shape), tuple(w_shape), dtype=np.dtype(dtype),
                                **kw)

    def make(shape):
        return xp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))
    return make(g.x_shape), make(g.w_shape), make(g.y_shape)


def _call(gpuconv, pass_name, x, w, gy, kw, backend):
    if pass_name == "forward":
        return lambda: gpuconv.conv(x, w, backend=backend, **kw)
    if pass_name == "input_grad":
        return lambda: gpuconv.conv_input_grad(gy, w, x.shape, backend=backend, **kw)
    return lambda: gpuconv.conv_weight_grad(x, gy, w.shape, backend=backend, **kw)


def _per_call_us(fn, calls, rounds):
    """(median, 10th, 90th percentile) microseconds of `calls * rounds` calls, each timed
    on its own: on a shared machine a preemption lands in few of the ~50 us calls, so
    the median of single calls is robust where the mean of a loop is not."""
    fn()
    ts = []
    clock = time.perf_counter
    for _ in range(rounds):
        for _ in range(calls):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    ts.sort()
    n = len(ts)
    return ts[n // 2] * 1e6, ts[n // 10] * 1e6, ts[(9 * n) // 10] * 1e6


def _stages(gpuconv, be, pass_name, x, w, gy, kw, backend):
    """(name, callable) for each stage of one call, in the order the call runs them."""
    from gpuconv import _api, _dispatch
    from gpuconv import _geometry as geo
    CB = cuda()
    op = {"forward": "conv", "input_grad": "conv_input_grad",
          "weight_grad": "conv_weight_grad"}[pass_name]
    a, b = (x, w) if pass_name == "forward" else ((gy, w) if pass_name == "input_grad"
                                                  else (x, gy))
    g = _api._geometry(op, x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"],
                       kw["groups"], x.dtype)
    geo_args = CB.geo_args(g)
    cfg = CB.grid_1d(math.prod(g.y_shape))
    fn_name = f"gpuconv_fwd_{DTYPE_SUFFIX[np.dtype(g.dtype).name]}_i32"
    rt = be.rt
    ns = _dispatch.array_namespace(op, a=a, b=b)  # a name or a module, by layout
    backend_pass = {"forward": lambda: be.forward(x, w, None, g),
                    "input_grad": lambda: be.input_grad(gy, w, g),
                    "weight_grad": lambda: be.weight_grad(x, gy, g)}[pass_name]
    st = [
        ("array_namespace", lambda: _dispatch.array_namespace(op, a=a, b=b)),
        ("check_dtype", lambda: geo.check_dtype(op, {"a": a, "b": b})),
        ("conv_geometry", lambda: _api._geometry(op, x.shape, w.shape, kw["stride"],
                                                 kw["padding"], kw["dilation"], kw["groups"],
                                                 x.dtype)),
        ("get_backend", lambda: _dispatch.get_backend(op, ns, backend)),
        ("backend pass (plan + alloc + launch)", backend_pass),
        ("  use_tiled(g)", lambda: CB.use_tiled(g)),
        ("  geo_args(g)", lambda: CB.geo_args(g)),
        ("  _fn (env + index width + name + lookup)",
         lambda: be._fn("fwd", g, a.size, b.size, math.prod(g.y_shape))),
        ("  module function lookup", lambda: be.modules.function("fwd", fn_name)),
        ("  grid_1d", lambda: grid_1d_of(be, math.prod(g.y_shape))),
        ("  runtime.empty(out)", lambda: rt.empty(g.y_shape, g.dtype)),
        ("  launch helper (checks + runtime.launch)",
         lambda: CB.launch(_NullLaunch, fn_name, cfg, (a, b) + geo_args)),
    ]
    if pass_name == "input_grad":
        st.append(("  dgrad_as_forward(g)", lambda: CB.dgrad_as_forward(g)))
        st.append(("  dgrad_phases(g)", lambda: CB.dgrad_phases(g)))
    if pass_name == "weight_grad":
        red = g.N * math.prod(g.out_spatial)
        st.append(("  wgrad_plan", lambda: CB.wgrad_plan(math.prod(g.w_shape), red)))
    g2 = CB.dgrad_as_forward(g) if pass_name == "input_grad" else None
    if g2 is not None and CB.use_tiled(g2):
        st.append(("  flip_weight + ascontiguous (the copy is a kernel on the GPU)",
                   lambda: rt.ascontiguous(CB.flip_weight(be.xp, w, g))))
    return st


class _NullLaunch:
    """Runtime stand-in for timing the launch helper alone (runtime.launch is free)."""

    @staticmethod
    def launch(fn, grid, block, args, shared_mem):
        return None


def measure(layers=None, *, dtype="float32", batch=32, calls=300, rounds=7, runtime="counting",
            profile=True, wait_idle=0.0):
    """Rows (dicts): per layer and pass the full-call microseconds, each stage's, the
    launches per call and cProfile's top functions."""
    import gpuconv
    from gpuconv import _bench
    by_name = {L["name"]: L for L in _bench.LAYERS}
    names = layers or ["r50.res2.3x3", "r50.res5.1x1", "mbv2.dw3x3.56", "convnext.dw7x7.56"]
    rows = []
    if runtime == "cupy":
        import cupy
        from gpuconv import _dispatch
        be = _dispatch._instance("cupy")
        ctx, xp, backend = contextlib.nullcontext(be), cupy, None
    else:
        ctx, xp, backend = counting_backend(), np, "cudasim"
    with ctx as be:
        for name in names:
            L = by_name[name]
            kw = dict(stride=L["stride"], padding=L["padding"], dilation=L["dilation"],
                      groups=L["groups"])
            x, w, gy = _arrays((batch,) + tuple(L["x"]), L["w"], kw, _np_dtype(dtype), xp=xp)
            for p in _bench.PASSES:
                busy = _bench.wait_for_idle(wait_idle) if wait_idle else None
                wp = _weight_for(p, w, kw, x.shape, runtime)
                fn = _call(gpuconv, p, x, wp, gy, kw, backend)
                if runtime == "counting":
                    be.rt.launches.clear()
                    fn()
                    launches = dict(be.rt.launches)
                else:
                    launches = None
                med, lo, hi = _per_call_us(fn, calls, rounds)
                if runtime == "cupy":
                    xp.cuda.Device().synchronize()
                stages = []
                for sname, sfn in _stages(gpuconv, be, p, x, wp, gy, kw, backend):
                    smed, sp10, _ = _per_call_us(sfn, calls, rounds)
                    stages.append({"stage": sname, "us": smed, "us_p10": sp10})
                    if runtime == "cupy":
                        xp.cuda.Device().synchronize()
                top = sum(s["us"] for s in stages if not s["stage"].startswith("  "))
                row = {"layer": name, "pass": p, "dtype": dtype, "batch": batch,
                       "runtime": runtime, "call_us": med, "call_us_p10": lo, "call_us_p90": hi,
                       "unattributed_us": med - top, "other_cpu_busy": busy,
                       "launches": launches, "stages": stages}
                if profile:
                    row["profile_top"] = _profile(fn, calls)
                    if runtime == "cupy":
                        xp.cuda.Device().synchronize()
                rows.append(row)
    return rows


def _weight_for(pass_name, w, kw, x_shape, runtime):
    """The weight to pass.  Where the input gradient runs as a forward convolution of
    the flipped weight, numpy would make the flipped copy on the host (its cost grows
    with the weight: 7 ms for 4 MB), where CuPy queues a copy kernel.  So on the
    counting runtime that weight is a zero-stride view: the flip stays a view and the
    backend's ascontiguous() counts the copy as a launch."""
    if runtime != "counting" or pass_name != "input_grad":
        return w
    from gpuconv import _geometry
    CB = cuda()
    g = _geometry.conv_geometry("overhead", x_shape, w.shape, dtype=w.dtype, **kw)
    if CB.use_igemm(g):  # the implicit-GEMM engine reads the weight as it is: no flip
        return w
    g2 = CB.dgrad_as_forward(g)
    if g2 is None or not CB.use_tiled(g2):
        return w
    return np.lib.stride_tricks.as_strided(w.reshape(-1)[:1],
                                           shape=w.shape, strides=(0,) * w.ndim,
                                           writeable=False)


def _np_dtype(dtype):
    if str(dtype) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _profile(fn, calls, top=8):
    """[(function, tottime us per call, ncalls per call)] of the top functions by tottime."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    out = []
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        where = f"{Path(file).name}:{line}({func})" if file != "~" else func
        out.append((where, tt / calls * 1e6, nc / calls))
    out.sort(key=lambda r: -r[1])
    return [{"function": f, "tottime_us": round(t, 2), "calls": round(n, 2)} for f, t, n in out[:top]]


def format_rows(rows):
    lines = ["| layer | pass | runtime | call us, median (p10-p90) | launches | "
             "biggest stages, median us |"
             " unattributed us |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        st = sorted((s for s in r["stages"] if not s["stage"].startswith("  ")),
                    key=lambda s: -s["us"])
        sub = sorted((s for s in r["stages"] if s["stage"].startswith("  ")),
                     key=lambda s: -s["us"])
        desc = "; ".join(f"{s['stage']} {s['us']:.1f}" for s in st[:3])
        desc += " | inside: " + "; ".join(f"{s['stage'].strip()} {s['us']:.1f}" for s in sub[:3])
        la = "-" if r["launches"] is None else sum(r["launches"].values())
        lines.append(f"| {r['layer']} | {r['pass']} | {r['runtime']} | {r['call_us']:.1f} "
                     f"({r['call_us_p10']:.1f}-{r['call_us_p90']:.1f}) | {la} | {desc} | "
                     f"{r['unattributed_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", choices=("counting", "cupy"), default="counting")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="fewer calls (a few seconds)")
    ap.add_argument("--layers", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each row wait up to this many seconds for other processes "
                         "to use < 10%% of the CPUs")
    args = ap.parse_args(argv)
    calls, rounds = (100, 2) if args.quick else (200, 10)
    rows = measure(args.layers, dtype=args.dtype, batch=args.batch, calls=calls, rounds=rounds,
                   runtime=args.runtime, wait_idle=args.wait_idle)
    if args.json:
        from gpuconv import _bench
        doc = {"environment": _bench.environment_info(), "calls": calls, "rounds": rounds,
               "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    print(format_rows(rows))
    for r in rows[:1] + rows[-1:]:
        print(f"\ncProfile top (us per call) for {r['layer']} {r['pass']}:")
        for f in r.get("profile_top", []):
            print(f"  {f['tottime_us']:7.2f}  x{f['calls']:<5g} {f['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
