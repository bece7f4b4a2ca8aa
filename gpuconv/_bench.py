"""Benchmark machinery: the layer suite, timing of gpuconv and its peers, tables.

Used by ``benchmarks/run_cpu.py`` and by ``python -m gpuconv bench``.  Every
row is a plain dict (JSON-ready)::

    {"layer": "res2.3x3", "group": "dense", "pass": "forward", "backend": "numpy",
     "dtype": "float32", "x_shape": [...], "w_shape": [...], "stride": [...], ...,
     "time_ms": 4.1, "gflops": 380.2, "gbps": 12.3, "flops": ..., "bytes": ...,
     "peer": "torch", "peer_time_ms": 3.9, "ratio": 0.95, "peak_mb": ..., "out_mb": ...}

``ratio`` is peer time / gpuconv time (1.0 = as fast as the peer, > 1 faster).
FLOPs count a multiply-add as 2: ``2*N*K*(C/groups)*prod(kernel)*prod(out)``;
minimum bytes are the three tensors a pass must read or write once.

Timing: wall clock (``time.perf_counter``) around a synchronous call on the CPU;
for the ``cupy`` backend CUDA events around the call on the current stream.
Each entry is the median of ``repeats`` timed calls after ``warmup`` calls.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
import tracemalloc

import numpy as np

__all__ = ["LAYERS", "QUICK_LAYERS", "PASSES", "run", "bench_layer", "summarize",
           "format_table", "format_summary", "environment_info", "layer_geometry", "cpu_busy",
           "wait_for_idle"]

PASSES = ("forward", "input_grad", "weight_grad")


def _L(name, model, x, w, stride=1, padding=0, groups=1, dilation=1):
    group = "depthwise" if groups > 1 and w[1] == 1 else ("grouped" if groups > 1 else "dense")
    return {"name": name, "model": model, "x": tuple(x), "w": tuple(w), "stride": stride,
            "padding": padding, "groups": groups, "dilation": dilation, "group": group}


# Batch dimension is filled in by `run` (default 8).  Shapes follow the models'
# published architectures (ResNet-50 v1.5 puts the stride in the 3x3 conv).
LAYERS = [
    _L("r50.stem7x7s2", "resnet50", (3, 224, 224), (64, 3, 7, 7), 2, 3),
    _L("r50.res2.1x1a", "resnet50", (64, 56, 56), (64, 64, 1, 1)),
    _L("r50.res2.3x3", "resnet50", (64, 56, 56), (64, 64, 3, 3), 1, 1),
    _L("r50.res2.1x1b", "resnet50", (64, 56, 56), (256, 64, 1, 1)),
    _L("r50.res2.1x1c", "resnet50", (256, 56, 56), (64, 256, 1, 1)),
    _L("r50.res3.3x3s2", "resnet50", (128, 56, 56), (128, 128, 3, 3), 2, 1),
    _L("r50.res3.down1x1s2", "resnet50", (256, 56, 56), (512, 256, 1, 1), 2, 0),
    _L("r50.res3.3x3", "resnet50", (128, 28, 28), (128, 128, 3, 3), 1, 1),
    _L("r50.res3.1x1", "resnet50", (512, 28, 28), (128, 512, 1, 1)),
    _L("r50.res4.3x3", "resnet50", (256, 14, 14), (256, 256, 3, 3), 1, 1),
    _L("r50.res4.1x1", "resnet50", (256, 14, 14), (1024, 256, 1, 1)),
    _L("r50.res5.3x3", "resnet50", (512, 7, 7), (512, 512, 3, 3), 1, 1),
    _L("r50.res5.1x1", "resnet50", (512, 7, 7), (2048, 512, 1, 1)),
    _L("mbv2.dw3x3.56", "mobilenetv2", (144, 56, 56), (144, 1, 3, 3), 1, 1, 144),
    _L("mbv2.dw3x3s2.112", "mobilenetv2", (96, 112, 112), (96, 1, 3, 3), 2, 1, 96),
    _L("convnext.dw7x7.56", "convnext", (96, 56, 56), (96, 1, 7, 7), 1, 3, 96),
]
QUICK_LAYERS = ["r50.res2.3x3", "r50.res4.3x3", "r50.res5.1x1", "mbv2.dw3x3.56"]


def layer_geometry(layer, batch=8, dtype=np.float32):
    from ._geometry import conv_geometry
    return conv_geometry("bench", (batch,) + tuple(layer["x"]), layer["w"],
                         stride=layer["stride"], padding=layer["padding"],
                         dilation=layer["dilation"], groups=layer["groups"], dtype=dtype)


def _min_bytes(g, pass_):
    it = np.dtype(g.dtype).itemsize
    x, w, y = math.prod(g.x_shape), math.prod(g.w_shape), math.prod(g.y_shape)
    return it * (x + w + y)  # each pass touches the same three tensors once


# ----------------------------------------------------------------------------- timers
def _median_time(fn, repeats, warmup, sync=None, timer="wall"):
    """Median seconds of `repeats` calls of fn (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    ts = []
    if timer == "cuda":
        import cupy
        for _ in range(repeats):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cupy.cuda.get_elapsed_time(a, b) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _interleaved_times(fa, fb, repeats, warmup, sync=None):
    """Median seconds of fa and of fb timed in alternating rounds (the method of
    DESIGN.md, "Performance habits"): per round one discarded call after each switch
    (PyTorch's OpenMP threads keep spinning after a call, caches change hands), then
    one timed call; no sleeps.  Load that comes and goes hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fa, ta), (fb, tb)):
            fn()  # discarded: the first call after a switch
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _peak_bytes(fn, before=None):
    """Peak bytes allocated through tracemalloc-visible allocators during fn()."""
    if before is not None:
        before()
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    del out
    if not was:
        tracemalloc.stop()
    return peak


# ----------------------------------------------------------------------------- gpuconv
def _gpuconv_fns(layer, g, backend, dtype, rng):
    import gpuconv
    if backend == "cupy":
        import cupy as xp
    else:
        xp = np
    x = xp.asarray(rng.standard_normal(g.x_shape).astype(dtype))
    w = xp.asarray(rng.standard_normal(g.w_shape).astype(dtype))
    gy = xp.asarray(rng.standard_normal(g.y_shape).astype(dtype))
    kw = dict(stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"],
              groups=layer["groups"], backend=backend)
    return {
        "forward": lambda: gpuconv.conv(x, w, **kw),
        "input_grad": lambda: gpuconv.conv_input_grad(gy, w, g.x_shape, **kw),
        "weight_grad": lambda: gpuconv.conv_weight_grad(x, gy, g.w_shape, **kw),
    }


def _torch_fns(layer, g, dtype, rng, threads, device="cpu"):
    """PyTorch peer on the CPU (same thread count) or on CUDA (cuDNN, TF32 off)."""
    import torch
    import torch.nn.functional as F
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    elif threads:
        torch.set_num_threads(threads)
    tdt = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}[np.dtype(dtype).name]

    def t(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(device, tdt)

    x, w, gy = t(g.x_shape), t(g.w_shape), t(g.y_shape)
    nd = g.nd
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if g.pad_lo != g.pad_hi:
        raise ValueError("torch peer: asymmetric padding not supported")
    kw = dict(stride=g.stride, padding=g.pad_lo, dilation=g.dilation, groups=g.groups)
    gin = getattr(torch.nn.grad, f"conv{nd}d_input")
    gwt = getattr(torch.nn.grad, f"conv{nd}d_weight")

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    return {
        "forward": nograd(lambda: conv(x, w, **kw)),
        "input_grad": nograd(lambda: gin(g.x_shape, w, gy, **kw)),
        "weight_grad": nograd(lambda: gwt(x, g.w_shape, gy, **kw)),
    }


def _torch_available(device="cpu"):
    try:
        import torch
        return device == "cpu" or torch.cuda.is_available()
    except Exception:
        return False


def bench_layer(layer, *, backend="numpy", dtype="float32", batch=8, passes=PASSES, repeats=5,
                warmup=1, peer="auto", threads=None, memory=True, seed=0):
    """Rows (dicts) for one layer: one per pass."""
    dtype = _np_dtype(dtype)
    g = layer_geometry(layer, batch, dtype)
    rng = np.random.default_rng(seed)
    fns = _gpuconv_fns(layer, g, backend, dtype, rng)
    sync, timer = None, "wall"
    if backend == "cupy":
        timer = "cuda"
    device = "cuda" if backend == "cupy" else "cpu"
    use_peer = peer in ("auto", "torch") and _torch_available(device)
    if peer == "torch" and not use_peer:
        raise RuntimeError(f"peer='torch' requested but PyTorch ({device}) is not usable")
    pfns = _torch_fns(layer, g, dtype, rng, threads, device) if use_peer else {}
    rows = []
    for p in passes:
        if pfns and timer == "wall":
            t, tp = _interleaved_times(fns[p], pfns[p], repeats, warmup, sync)
        else:
            t = _median_time(fns[p], repeats, warmup, sync, timer)
            tp = _median_time(pfns[p], repeats, warmup, sync, timer) if pfns else None
        row = {
            "layer": layer["name"], "model": layer["model"], "group": layer["group"], "pass": p,
            "backend": backend, "dtype": np.dtype(dtype).name, "batch": batch,
            "x_shape": list(g.x_shape), "w_shape": list(g.w_shape), "y_shape": list(g.y_shape),
            "stride": list(g.stride), "padding": [list(a) for a in zip(g.pad_lo, g.pad_hi)],
            "dilation": list(g.dilation), "groups": g.groups,
            "flops": g.flops, "bytes": _min_bytes(g, p),
            "time_ms": t * 1e3, "gflops": g.flops / t / 1e9, "gbps": _min_bytes(g, p) / t / 1e9,
            "peer": None, "peer_time_ms": None, "ratio": None, "peak_mb": None, "out_mb": None,
        }
        if pfns:
            row.update(peer="torch", peer_time_ms=tp * 1e3, ratio=tp / t)
        if memory and backend == "numpy":
            from ._cpu import clear_workspace_cache
            row["peak_mb"] = _peak_bytes(fns[p], before=clear_workspace_cache) / 2 ** 20
            out_shape = {"forward": g.y_shape, "input_grad": g.x_shape,
                         "weight_grad": g.w_shape}[p]
            row["out_mb"] = math.prod(out_shape) * np.dtype(dtype).itemsize / 2 ** 20
        rows.append(row)
    return rows


def _np_dtype(dtype):
    from ._geometry import resolve_dtype
    return resolve_dtype(dtype)


def run(layers=None, *, quick=False, backend="numpy", dtype="float32", batch=8, passes=PASSES,
        repeats=None, warmup=1, peer="auto", threads=None, memory=True, progress=None):
    """Benchmark a list of layers (names or layer dicts; default: the whole suite, or
    QUICK_LAYERS with quick=True).  progress(i, n, layer_name) is called before each
    layer.  With a torch peer, torch runs with `threads` threads (default: as many
    as the gpuconv backend uses).  Returns a list of row dicts."""
    if layers is None:
        layers = QUICK_LAYERS if quick else [L["name"] for L in LAYERS]
    by_name = {L["name"]: L for L in LAYERS}
    todo = []
    for L in layers:
        if isinstance(L, str):
            if L not in by_name:
                raise ValueError(f"unknown layer {L!r}; known: {', '.join(by_name)}")
            L = by_name[L]
        todo.append(L)
    if repeats is None:
        repeats = 3 if quick else 7
    if threads is None and backend == "numpy":
        from ._cpu import get_num_threads
        threads = get_num_threads()
    rows = []
    for i, L in enumerate(todo):
        if progress is not None:
            progress(i, len(todo), L["name"])
        rows += bench_layer(L, backend=backend, dtype=dtype, batch=batch, passes=passes,
                            repeats=repeats, warmup=warmup, peer=peer, threads=threads,
                            memory=memory)
    if progress is not None:
        progress(len(todo), len(todo), None)
    return rows


# ----------------------------------------------------------------------------- machine load
def _cpu_times():
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals), idle


def cpu_busy(interval=0.5):
    """Fraction of all CPU time that was busy during `interval` seconds (Linux; None
    elsewhere).  Call it while this process is idle to see what others are using."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(interval)
        t1, i1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_idle(max_wait=60.0, threshold=0.1, interval=0.5):
    """Sleep until other processes use less than `threshold` of the CPUs (or
    `max_wait` seconds pass).  Returns the last busy fraction measured."""
    t_end = time.monotonic() + max_wait
    busy = cpu_busy(interval)
    while busy is not None and busy > threshold and time.monotonic() < t_end:
        busy = cpu_busy(interval)
    return busy


# ----------------------------------------------------------------------------- reports
def _geomean(vals):
    vals = [v for v in vals if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summarize(rows):
    """Geometric mean of the peer ratio per (group, pass), plus per group over all passes:
    ``{"dense": {"forward": 0.7, ..., "all": ...}, "depthwise": {...}}``."""
    out = {}
    groups = sorted({r["group"] for r in rows})
    for grp in groups:
        sel = [r for r in rows if r["group"] == grp and r["ratio"]]
        if not sel:
            continue
        d = {p: _geomean([r["ratio"] for r in sel if r["pass"] == p]) for p in PASSES}
        d = {p: v for p, v in d.items() if v is not None}
        d["all"] = _geomean([r["ratio"] for r in sel])
        out[grp] = d
    return out


def format_table(rows):
    """Plain-text (Markdown) table of rows."""
    head = ("| layer | pass | x | w | s/p/g | ms | GFLOP/s | GB/s | torch ms | ratio | "
            "peak MiB (out) |")
    sep = "|" + "---|" * 11
    lines = [head, sep]
    for r in rows:
        sp = f"{r['stride'][0]}/{r['padding'][0][0]}/{r['groups']}"
        peer = f"{r['peer_time_ms']:.2f}" if r["peer_time_ms"] is not None else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        mem = (f"{r['peak_mb']:.1f} ({r['out_mb']:.1f})" if r.get("peak_mb") is not None
               else "-")
        lines.append(
            f"| {r['layer']} | {r['pass']} | {'x'.join(map(str, r['x_shape']))} | "
            f"{'x'.join(map(str, r['w_shape']))} | {sp} | {r['time_ms']:.2f} | "
            f"{r['gflops']:.1f} | {r['gbps']:.2f} | {peer} | {ratio} | {mem} |")
    return "\n".join(lines)


def format_summary(summary, targets=None):
    """Markdown table of the geometric means.  With targets
    (``{("dense", "forward"): 0.6, ("depthwise", "all"): 0.25, ...}``, as
    benchmarks/run_cpu.py passes them) two more columns: the target ratio and
    whether the measured geomean meets it; without, no such columns."""
    if not targets:
        lines = ["| group | pass | geomean ratio (peer time / gpuconv time) |", "|---|---|---|"]
        for grp, d in summary.items():
            for p, v in d.items():
                lines.append(f"| {grp} | {p} | {v:.2f} |")
        return "\n".join(lines)
    lines = ["| group | pass | geomean ratio (peer time / gpuconv time) | target | met |",
             "|---|---|---|---|---|"]
    for grp, d in summary.items():
        for p, v in d.items():
            t = targets.get((grp, p))
            met = "-" if t is None else ("yes" if v >= t else "**no**")
            lines.append(f"| {grp} | {p} | {v:.2f} | {'-' if t is None else f'{t:.2f}'} | "
                         f"{met} |")
    return "\n".join(lines)


def load_text(busy_before, busy_after):
    """One line on the other processes' load around a run (None where unknown)."""
    def pct(v):
        return "?" if v is None else f"{100 * v:.0f} %"
    try:
        la = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        la = "?"
    return (f"other-process load: {pct(busy_before)} of the CPUs busy before the run, "
            f"{pct(busy_after)} after (measured while idle); load average 1/5/15 min {la}")


def environment_info():
    """Date, machine, CPU, library versions, BLAS (threadpoolctl), git commit, load."""
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "cpu_count": os.cpu_count()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                                "num_threads", "threading_layer", "filepath")}
                        for d in threadpool_info() if d.get("user_api") == "blas"]
    except Exception as e:
        info["blas"] = f"threadpoolctl unavailable ({type(e).__name__})"
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        info["torch"] = None
    try:
        from ._cpu import get_num_threads, get_workspace_limit
        info["gpuconv_threads"] = get_num_threads()
        info["workspace_mb"] = get_workspace_limit() / 2 ** 20
    except Exception:
        pass
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                               "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                               "GPUCONV_NUM_THREADS", "GPUCONV_WORKSPACE_MB")
                   if k in os.environ}
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                        capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    return info
