#!/usr/bin/env python3
"""Driver of ``benchmarks/gpu_check.sh``: plan, ceilings, benchmark, sanitizer cases, report.

Subcommands (repository root)::

    python benchmarks/gpu_check.py plan [--json F]   # the dry run: no GPU, no CuPy needed
    python benchmarks/gpu_check.py steps             # step budgets as shell assignments
    python benchmarks/gpu_check.py ceilings --out D  # copy bandwidth, matmul f32/bf16/f16
    python benchmarks/gpu_check.py bench --out D --deadline-s S
    python benchmarks/gpu_check.py sanitize-cases    # one small case per kernel family
    python benchmarks/gpu_check.py report --out D    # one JSON and one short table, last

Method (see /work/.library/device/METHOD.md):

* ceilings first: a 2 GiB device-to-device copy (bytes read + written) and an 8192^3
  matmul per dtype (CuPy/cuBLAS; float32 with TF32 off; "tf32" by torch/cuBLAS with TF32
  on); every row is reported as a
  fraction of them: ``frac = max(bytes / copy_rate, flops / matmul_rate) / time`` (the
  roofline bound that applies), 1.0 = at the ceiling;
* batch 32 or 64 (64 where one sample's x + y is small), inputs rotated among
  ``sets`` buffers totalling at least 2 x L2, fresh random data (normal, seed
  recorded), never zeros;
* steady state: one CUDA graph holding one call per buffer set, replayed >= 24 times
  in two rounds interleaved with PyTorch (cuDNN, TF32 off -- on for the "tf32" rows, where
  gpuconv runs precision="high" --, cudnn.benchmark on, also
  graph-replayed); per call = replay time / sets.  Eager numbers separately:
  ``eager_ms`` (one call after a synchronize: host overhead + kernel), ``stream_ms``
  (back-to-back eager calls, per call) and ``host_us`` (the Python call alone, no sync);
* every step has its own timeout; the bench stops starting rows at its deadline and
  appends one JSON line per row, so a killed step still leaves its rows; the report
  prints every planned row (missing ones marked) and the summary table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------- the plan (data)
# "tf32": float32 data under precision "high" -- gpuconv's TF32 tensor-op entries against
# cuDNN with TF32 on (torch.backends.cudnn.allow_tf32); "float32" has TF32 off on both
# sides.  TF32 rows for the dense layers only (the depthwise kernels have no TF32 path).
DTYPES = ("float32", "tf32", "bfloat16")
PASSES = ("forward", "input_grad", "weight_grad")
L2_BYTES = 50 * 2**20            # H100/H200 L2 (GPU-FACTS.md); read off the device when there
ROTATE_L2 = 2                    # rotated input sets hold at least this many L2s
MIN_SETS, MAX_SETS = 3, 16
REPLAYS = 24                     # graph replays per implementation (two rounds of 12)
ROUNDS = 2
EAGER = 20                       # synchronized eager calls (latency, host time)
STREAM_ROUNDS = 2                # back-to-back eager passes over the sets
BATCH_SMALL_SAMPLE = 400_000     # elements of x + y per sample under which batch is 64
# leads (KINDS.md, H200.md), replaced by the measured ceilings on the device
ASSUMED_CEILINGS = {"copy_GBps": 4300.0,
                    "matmul_GFLOPs": {"float32": 50_000.0, "tf32": 390_000.0,
                                      "bfloat16": 780_000.0, "float16": 780_000.0}}
# planning assumptions for the time budget (pessimistic fractions of the roofline)
ASSUMED_EFFICIENCY = {"gpuconv": 0.08, "torch": 0.3}
ROW_FIXED_S = {"gpuconv": 0.03, "torch": 0.25}   # capture, allocation; cuDNN autotuning
ROW_CAP_S = 10.0                 # a row whose remaining calls would take longer is cut short

# name, planned seconds, timeout seconds, what it does.  The shell script reads these
# (``steps``); the whole script never runs past GLOBAL_LIMIT_S.
STEPS = (
    ("env", 5, 20, "nvidia-smi, versions, compute-sanitizer present?"),
    ("ceilings", 20, 45, "2 GiB device copy; 8192^3 matmul f32 (no TF32), tf32, bf16, f16"),
    ("precompile", 30, 75, "import gpuconv + NVRTC build of every module, cold CuPy cache"),
    ("tests", 90, 120, "pytest -m gpu: NaN-poisoned outputs, fresh seed"),
    ("memcheck", 25, 45, "compute-sanitizer --tool memcheck on the sanitizer cases"),
    ("racecheck", 35, 60, "compute-sanitizer --tool racecheck on the sanitizer cases"),
    ("overhead", 10, 25, "host_overhead.py --runtime cupy --quick (per-call Python time)"),
    ("bench", 140, 170, "the layer suite vs PyTorch, graph replay + eager"),
    ("report", 3, 15, "JSON + tables (printed last)"),
)
GLOBAL_LIMIT_S = 470
CEIL_COPY_BYTES = 2 * 2**30      # the copy ceiling's buffer
CEIL_MATMUL_N = 8192             # the matmul ceiling's size (and a 2048 probe first)
CEIL_PROBE_N = 2048
WARM_N = 4096                    # matmuls for half a second before the bench: clocks up
PLANNED_LIMIT_S = 360


def gpu_batch(layer) -> int:
    """Batch that fills the chip: 64 where one sample's x + y is small, else 32; a layer
    dict may name its own (``gpu_batch``)."""
    if layer.get("gpu_batch"):
        return int(layer["gpu_batch"])
    from gpuconv import _bench
    g = _bench.layer_geometry(layer, 1, np.float32)
    per = math.prod(g.x_shape) + math.prod(g.y_shape)
    return 64 if per < BATCH_SMALL_SAMPLE else 32


def _layer(name, model, x, w, stride=1, padding=0, groups=1, dilation=1):
    group = "depthwise" if groups > 1 and w[1] == 1 else ("grouped" if groups > 1 else "dense")
    return {"name": name, "model": model, "x": tuple(x), "w": tuple(w), "stride": stride,
            "padding": padding, "groups": groups, "dilation": dilation, "group": group}


# GPU-only rows beside the suite's: depthwise shapes the suite lacks (a 5x5 stride-2 as in
# EfficientNet-B0's third stage, and a channel multiplier of 2, K = 2C)
EXTRA_LAYERS = (
    _layer("effnetb0.dw5x5s2.56", "efficientnet", (144, 56, 56), (144, 1, 5, 5), 2, 2, 144),
    _layer("mult2.dw3x3.56", "multiplier", (64, 56, 56), (128, 1, 3, 3), 1, 1, 64),
)


def suite_layers():
    """Every layer of the benchmark suite (gpuconv._bench.LAYERS: dense, grouped and
    depthwise alike, so layers added there are planned here), then EXTRA_LAYERS."""
    from gpuconv import _bench
    layers = list(_bench.LAYERS)
    names = {L["name"] for L in layers}
    return layers + [L for L in EXTRA_LAYERS if L["name"] not in names]


def _operands(pass_name):
    return {"forward": ("x", "w"), "input_grad": ("y", "w"), "weight_grad": ("x", "y")}[pass_name]


def _np_dtype(name):
    if name == "tf32":  # float32 data; TF32 arithmetic is asked for per call
        return np.dtype(np.float32)
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def plan_rows(layers=None, dtypes=DTYPES, ceilings=None, l2_bytes=L2_BYTES):
    """Every measurement, in run order: dicts with shapes, bytes, FLOPs, buffer sets,
    repeats and the planned seconds."""
    from gpuconv import _bench
    ceil = ceilings or ASSUMED_CEILINGS
    rows = []
    for dt in dtypes:
        npdt = _np_dtype(dt)
        for L in layers or suite_layers():
            if dt == "tf32" and L["group"] != "dense":
                continue
            batch = gpu_batch(L)
            g = _bench.layer_geometry(L, batch, npdt)
            it = npdt.itemsize
            sizes = {"x": math.prod(g.x_shape) * it, "w": math.prod(g.w_shape) * it,
                     "y": math.prod(g.y_shape) * it}
            for p in PASSES:
                set_bytes = sum(sizes[o] for o in _operands(p))
                sets = max(MIN_SETS, min(MAX_SETS, -(-ROTATE_L2 * l2_bytes // set_bytes)))
                min_bytes = sizes["x"] + sizes["w"] + sizes["y"]
                t_mem = min_bytes / (ceil["copy_GBps"] * 1e9)
                t_math = g.flops / (ceil["matmul_GFLOPs"][dt] * 1e9)
                floor = max(t_mem, t_math)
                calls = 2 * sets + EAGER + STREAM_ROUNDS * sets + sets + REPLAYS * sets
                est = sum(ROW_FIXED_S[k] + calls * floor / ASSUMED_EFFICIENCY[k]
                          for k in ("gpuconv", "torch"))
                out_bytes = sizes[{"forward": "y", "input_grad": "x", "weight_grad": "w"}[p]]
                rows.append({
                    "id": f"{L['name']}|{p}|{dt}", "layer": L["name"], "model": L["model"],
                    "group": L["group"], "pass": p, "dtype": dt, "batch": batch,
                    "x_shape": list(g.x_shape), "w_shape": list(g.w_shape),
                    "y_shape": list(g.y_shape), "stride": L["stride"], "padding": L["padding"],
                    "dilation": L["dilation"], "groups": L["groups"],
                    "flops": g.flops, "bytes": min_bytes, "set_bytes": set_bytes, "sets": sets,
                    "rotated_bytes": sets * set_bytes, "graph_out_bytes": sets * out_bytes,
                    "replays": REPLAYS, "eager": EAGER, "bound": "math" if t_math > t_mem else "mem",
                    "floor_ms": floor * 1e3, "planned_s": est,
                })
    return rows


def plan(layers=None, dtypes=DTYPES):
    rows = plan_rows(layers, dtypes)
    steps = [{"step": n, "planned_s": p, "timeout_s": t, "what": w} for n, p, t, w in STEPS]
    bench_planned = sum(r["planned_s"] for r in rows)
    return {"steps": steps, "rows": rows, "global_limit_s": GLOBAL_LIMIT_S,
            "planned_total_s": sum(s["planned_s"] for s in steps),
            "bench_rows_planned_s": bench_planned,
            "sanitizer_cases": sanitizer_plan(),
            "assumed_ceilings": ASSUMED_CEILINGS, "assumed_efficiency": ASSUMED_EFFICIENCY,
            "l2_bytes": L2_BYTES, "rotate_l2": ROTATE_L2}


# ----------------------------------------------------------------------------- sanitizer cases
# One small case per kernel family: forced algorithm, pass, geometry.  Which entry points
# each case launches is found by running the CUDA backend's plan on a counting runtime
# (host_overhead.CountingRuntime), so the coverage below is checked without a GPU.
SANITIZER_CASES = (
    {"name": "fwd direct s2", "algo": "direct", "pass": "forward",
     "x": (2, 3, 9, 10), "w": (5, 3, 3, 3), "stride": 2, "padding": 1, "groups": 1},
    {"name": "fwd tiled", "algo": "tiled", "pass": "forward",
     "x": (2, 8, 9, 10), "w": (16, 8, 3, 3), "stride": 1, "padding": 1, "groups": 1},
    {"name": "dgrad direct s2", "algo": "direct", "pass": "input_grad",
     "x": (2, 6, 9, 11), "w": (4, 3, 3, 3), "stride": 2, "padding": 1, "groups": 2},
    {"name": "dgrad as tiled fwd", "algo": "tiled", "pass": "input_grad",
     "x": (2, 8, 9, 10), "w": (16, 8, 3, 3), "stride": 1, "padding": 1, "groups": 1},
    {"name": "wgrad direct + reduce", "algo": "direct", "pass": "weight_grad",
     "x": (2, 6, 9, 11), "w": (4, 3, 3, 3), "stride": 2, "padding": 1, "groups": 2},
    {"name": "wgrad tiled + reduce", "algo": "tiled", "pass": "weight_grad",
     "x": (2, 8, 9, 10), "w": (16, 8, 3, 3), "stride": 1, "padding": 1, "groups": 1},
    {"name": "depthwise 3x3 (all passes)", "algo": "auto", "pass": "all",
     "x": (2, 8, 11, 9), "w": (8, 1, 3, 3), "stride": 1, "padding": 1, "groups": 8},
    {"name": "depthwise 7x7 s2 (all passes)", "algo": "auto", "pass": "all",
     "x": (2, 8, 13, 12), "w": (8, 1, 7, 7), "stride": 2, "padding": 3, "groups": 8},
    {"name": "channel multiplier 2, 3x3 (all passes)", "algo": "auto", "pass": "all",
     "x": (2, 4, 10, 9), "w": (8, 1, 3, 3), "stride": 1, "padding": 1, "groups": 4},
    # the implicit-GEMM engine: each tile, split-K (+ its reduce), stride phases, C % 8 != 0
    {"name": "igemm 64x64 split-K s2 (all passes)", "algo": "igemm", "pass": "all",
     "env": {"GPUCONV_IGEMM_CONFIG": "s", "GPUCONV_IGEMM_SPLITS": "3"},
     "x": (2, 5, 9, 10), "w": (12, 5, 3, 3), "stride": 2, "padding": 1, "groups": 1},
    {"name": "igemm 128x128 grouped (all passes)", "algo": "igemm", "pass": "all",
     "env": {"GPUCONV_IGEMM_CONFIG": "l", "GPUCONV_IGEMM_SPLITS": "1"},
     "x": (2, 12, 9, 10), "w": (20, 6, 3, 3), "stride": 1, "padding": 1, "groups": 2},
)
SANITIZER_DTYPES = ("float32", "bfloat16")


def _case_passes(case):
    return PASSES if case["pass"] == "all" else (case["pass"],)


def _case_kw(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=1, groups=case["groups"])


def sanitizer_plan():
    """[{case, passes, families}] plus the kernel families nothing covers."""
    from _layout import cuda, entry_family
    from host_overhead import launched_families
    out, covered = [], set()
    for c in SANITIZER_CASES:
        fams = set()
        for p in _case_passes(c):
            for dt in SANITIZER_DTYPES:  # bfloat16 reaches the tensor-op forward
                fams |= set(launched_families(_case_kw(c), p, c["x"], c["w"], dt,
                                              env={"GPUCONV_CUDA_ALGO": c["algo"],
                                                   **c.get("env", {})}))
        covered |= fams
        out.append({"case": c["name"], "passes": list(_case_passes(c)), "families": sorted(fams)})
    every = sorted({entry_family(n) for n in cuda().all_entry_names()})
    return {"cases": out, "families": every,
            "uncovered": sorted(set(every) - covered)}


def sanitize_cases(argv=None):
    """Run every sanitizer case (float32 and bfloat16) on the GPU, check against the float64
    reference, print one line each and a closing sentinel.  CuPy's memory pool is off so
    that every array is its own allocation (memcheck sees overruns into neighbours)."""
    import cupy
    import gpuconv
    from gpuconv import reference as ref
    cupy.cuda.set_allocator(None)
    rng = np.random.default_rng(int(os.environ.get("GPUCONV_TEST_SEED", "0")))
    bad = 0
    n = 0
    for c in SANITIZER_CASES:
        os.environ["GPUCONV_CUDA_ALGO"] = c["algo"]
        for k in ("GPUCONV_IGEMM_CONFIG", "GPUCONV_IGEMM_SPLITS"):
            os.environ.pop(k, None)
        os.environ.update(c.get("env", {}))
        kw = _case_kw(c)
        for dt in SANITIZER_DTYPES:
            npdt = _np_dtype(dt)
            x = rng.standard_normal(c["x"]).astype(np.float32).astype(npdt)
            w = rng.standard_normal(c["w"]).astype(np.float32).astype(npdt)
            y_shape = gpuconv.conv_output_shape(x.shape, w.shape, **kw)
            gy = rng.standard_normal(y_shape).astype(np.float32).astype(npdt)
            xd, wd, gyd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(gy)
            x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
            for p in _case_passes(c):
                if p == "forward":
                    got, want = gpuconv.conv(xd, wd, **kw), ref.conv(x64, w64, **kw)
                elif p == "input_grad":
                    got = gpuconv.conv_input_grad(gyd, wd, x.shape, **kw)
                    want = ref.conv_input_grad(gy64, w64, x.shape, **kw)
                else:
                    got = gpuconv.conv_weight_grad(xd, gyd, w.shape, **kw)
                    want = ref.conv_weight_grad(x64, gy64, w.shape, **kw)
                cupy.cuda.Device().synchronize()
                g64 = cupy.asnumpy(got).astype(np.float64)
                rel = float(np.max(np.abs(g64 - want)) / max(np.max(np.abs(want)), 1e-300))
                tol = 1e-4 if dt == "float32" else 5e-2
                ok = bool(np.isfinite(g64).all()) and rel < tol
                bad += not ok
                n += 1
                print(f"CASE {c['name']} | {p} | {dt} | rel {rel:.2e} | {'ok' if ok else 'WRONG'}",
                      flush=True)
    for k in ("GPUCONV_CUDA_ALGO", "GPUCONV_IGEMM_CONFIG", "GPUCONV_IGEMM_SPLITS"):
        os.environ.pop(k, None)
    print(f"SANITIZE-CASES-DONE {n} cases, {bad} wrong", flush=True)
    return 1 if bad else 0


# ----------------------------------------------------------------------------- ceilings
def _median_spread(ts):
    ts = sorted(ts)
    med = statistics.median(ts)
    q = lambda f: ts[min(len(ts) - 1, max(0, int(round(f * (len(ts) - 1)))))]  # noqa: E731
    return {"median": med, "p10": q(0.1), "p90": q(0.9), "min": ts[0], "max": ts[-1],
            "n": len(ts), "spread": (q(0.9) - q(0.1)) / med if med else None}


def _time_cupy(fn, stream, repeats, warmup=3):
    import cupy
    for _ in range(warmup):
        fn()
    stream.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) / 1e3)
    return ts


def ceilings(out_dir):
    """Measured ceilings -> out_dir/ceilings.json (also printed)."""
    import cupy
    res = {"copy": {}, "matmul": {}, "errors": {}}
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    res["device"] = {"name": props["name"].decode() if isinstance(props["name"], bytes)
                     else str(props["name"]), "sm_count": props["multiProcessorCount"],
                     "l2_bytes": props["l2CacheSize"], "memory_bytes": props["totalGlobalMem"],
                     "clock_khz": props.get("clockRate")}
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        nbytes = CEIL_COPY_BYTES
        a = cupy.random.default_rng(1).standard_normal(nbytes // 4, dtype=cupy.float32)
        b = cupy.empty_like(a)
        ts = _time_cupy(lambda: cupy.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes,
                                                             3, s.ptr), s, 20)
        r = _median_spread(ts)
        res["copy"]["memcpy_d2d"] = {"bytes_moved": 2 * nbytes, **r,
                                     "GBps": 2 * nbytes / r["median"] / 1e9}
        ts = _time_cupy(lambda: cupy.copyto(b, a), s, 20)
        r = _median_spread(ts)
        res["copy"]["copy_kernel"] = {"bytes_moved": 2 * nbytes, **r,
                                      "GBps": 2 * nbytes / r["median"] / 1e9}
        del a, b
        n = CEIL_MATMUL_N
        flops = 2 * n**3
        for dt in ("float32", "bfloat16", "float16"):
            try:
                npdt = _np_dtype(dt)
                rg = cupy.random.default_rng(2)
                # probe at 2048^3 first: a half-type product that is not a tensor-core
                # cuBLAS call would take seconds at 8192^3
                pn = CEIL_PROBE_N
                A = rg.standard_normal((pn, pn), dtype=cupy.float32).astype(npdt)
                pt = min(_time_cupy(lambda: cupy.matmul(A, A), s, 2, warmup=1))
                rate = 2 * pn**3 / pt
                if dt != "float32" and rate < 100e12:
                    raise RuntimeError(f"CuPy's {dt} matmul runs at {rate / 1e12:.1f} TFLOP/s "
                                       f"(not a tensor-core GEMM)")
                A = rg.standard_normal((n, n), dtype=cupy.float32).astype(npdt)
                B = rg.standard_normal((n, n), dtype=cupy.float32).astype(npdt)
                C = cupy.empty((n, n), dtype=npdt)
                ts = _time_cupy(lambda: cupy.matmul(A, B, out=C), s, 12 if dt == "float32" else 20)
                r = _median_spread(ts)
                res["matmul"][dt] = {"lib": "cupy", "n": n, **r,
                                     "GFLOPs": flops / r["median"] / 1e9}
                del A, B, C
            except Exception as e:  # bf16 matmul unsupported by this CuPy: try torch
                res["errors"][f"cupy matmul {dt}"] = f"{type(e).__name__}: {e}"
                try:
                    res["matmul"][dt] = _torch_matmul(dt, n)
                except Exception as e2:
                    res["errors"][f"torch matmul {dt}"] = f"{type(e2).__name__}: {e2}"
        try:  # the TF32 ceiling: cuBLAS through torch with TF32 allowed
            res["matmul"]["tf32"] = _torch_matmul("float32", n, tf32=True)
        except Exception as e:
            res["errors"]["torch matmul tf32"] = f"{type(e).__name__}: {e}"
    s.synchronize()
    res["tf32"] = os.environ.get("CUPY_TF32", "0")
    res["copy_GBps"] = max(v["GBps"] for v in res["copy"].values())
    res["matmul_GFLOPs"] = {dt: v["GFLOPs"] for dt, v in res["matmul"].items()}
    Path(out_dir, "ceilings.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({"copy_GBps": res["copy_GBps"], "matmul_GFLOPs": res["matmul_GFLOPs"],
                      "device": res["device"], "errors": res["errors"]}, default=str))
    return 0


def _torch_matmul(dt, n, tf32=False):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = tf32
    tdt = getattr(torch, dt)
    a = torch.randn(n, n, device="cuda").to(tdt)
    b = torch.randn(n, n, device="cuda").to(tdt)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    r = _median_spread(ts)
    return {"lib": "torch", "n": n, **r, "GFLOPs": 2 * n**3 / r["median"] / 1e9}


# ----------------------------------------------------------------------------- benchmark
class _Impl:
    """One implementation of one row: its calls (one per buffer set) and its timings."""

    def __init__(self, name, calls, kind):
        self.name, self.calls, self.kind = name, calls, kind  # kind: 'cupy' | 'torch'
        self.graph = None
        self.graph_error = None
        self.outs = None
        self.replay_s = []
        self.res = {}
        self.tol = None  # graph-vs-eager tolerance of a peer whose algorithms vary


class _TooSlow(Exception):
    pass


def _cupy_prepare(impl, stream):
    """Warm up, eager timings, then capture one graph of one call per set on `stream`."""
    import cupy
    calls = impl.calls
    with stream:
        outs = [f() for f in calls]  # warm-up; fills the pool on this stream
        stream.synchronize()
        t0 = time.perf_counter()
        outs += [f() for f in calls]
        stream.synchronize()
        per_call = (time.perf_counter() - t0) / len(calls)
        del outs
        left_calls = EAGER + (STREAM_ROUNDS + 1 + REPLAYS) * len(calls)
        if per_call * left_calls > ROW_CAP_S:
            raise _TooSlow(f"{per_call * 1e3:.1f} ms per call: {left_calls} more calls would "
                           f"pass the row cap of {ROW_CAP_S:.0f} s")
        eager, host = [], []
        for i in range(EAGER):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record(stream)
            t0 = time.perf_counter()
            o = calls[i % len(calls)]()
            t1 = time.perf_counter()
            b.record(stream)
            b.synchronize()
            eager.append(cupy.cuda.get_elapsed_time(a, b) / 1e3)
            host.append(t1 - t0)
            del o
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        for _ in range(STREAM_ROUNDS):
            for f in calls:
                f()
        b.record(stream)
        b.synchronize()
        stream_s = cupy.cuda.get_elapsed_time(a, b) / 1e3 / (STREAM_ROUNDS * len(calls))
        ref0 = calls[0]()
        try:
            stream.begin_capture()
            try:
                impl.outs = [f() for f in calls]
            finally:
                impl.graph = stream.end_capture()
            impl.graph.launch(stream)
            stream.synchronize()
            same = bool(cupy.array_equal(impl.outs[0].view(cupy.uint8), ref0.view(cupy.uint8)))
            finite = bool(cupy.isfinite(impl.outs[0].astype(cupy.float32)).all())
            impl.res.update(graph_matches_eager=same, finite=finite)
        except Exception as e:
            impl.graph, impl.graph_error = None, f"{type(e).__name__}: {e}"
            try:
                if stream.is_capturing():
                    stream.end_capture()
            except Exception:
                pass
            impl.res.update(finite=bool(cupy.isfinite(ref0.astype(cupy.float32)).all()))
    impl.ref0 = ref0
    impl.res.update(eager_ms=_median_spread([t * 1e3 for t in eager]),
                    host_us=_median_spread([t * 1e6 for t in host]),
                    stream_ms=stream_s * 1e3, graph_error=impl.graph_error)


def _cupy_replays(impl, stream, n):
    import cupy
    calls = impl.calls
    for _ in range(n):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        if impl.graph is not None:
            impl.graph.launch(stream)
        else:
            with stream:
                for f in calls:
                    f()
        b.record(stream)
        b.synchronize()
        impl.replay_s.append(cupy.cuda.get_elapsed_time(a, b) / 1e3 / len(calls))


def _torch_prepare(impl, stream):
    import torch
    calls = impl.calls
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(2):
                for f in calls:
                    f()
            stream.synchronize()
            eager, host = [], []
            for i in range(EAGER):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record(stream)
                t0 = time.perf_counter()
                o = calls[i % len(calls)]()
                t1 = time.perf_counter()
                b.record(stream)
                b.synchronize()
                eager.append(a.elapsed_time(b) / 1e3)
                host.append(t1 - t0)
                del o
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record(stream)
            for _ in range(STREAM_ROUNDS):
                for f in calls:
                    f()
            b.record(stream)
            b.synchronize()
            stream_s = a.elapsed_time(b) / 1e3 / (STREAM_ROUNDS * len(calls))
            impl.ref0 = calls[0]()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                impl.outs = [f() for f in calls]
            impl.graph = g
            g.replay()
            stream.synchronize()
            # cuDNN's algorithms need not be deterministic run to run: compare with a
            # tolerance (gpuconv's own replay must match its eager call bit for bit)
            a64, b64 = impl.outs[0].double(), impl.ref0.double()
            rel = float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-300))
            tol = impl.tol or (1e-4 if impl.ref0.dtype == torch.float32 else 2e-2)
            impl.res.update(graph_rel_diff=rel, graph_matches_eager=rel <= tol,
                            finite=bool(torch.isfinite(impl.outs[0]).all()))
        except Exception as e:
            impl.graph, impl.graph_error = None, f"{type(e).__name__}: {e}"
    impl.res.update(eager_ms=_median_spread([t * 1e3 for t in eager]),
                    host_us=_median_spread([t * 1e6 for t in host]),
                    stream_ms=stream_s * 1e3, graph_error=impl.graph_error)


def _torch_replays(impl, stream, n):
    import torch
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        with torch.no_grad(), torch.cuda.stream(stream):  # replay() runs on the current stream
            a.record(stream)
            if impl.graph is not None:
                impl.graph.replay()
            else:
                for f in impl.calls:
                    f()
            b.record(stream)
        b.synchronize()
        impl.replay_s.append(a.elapsed_time(b) / 1e3 / len(impl.calls))


def _torch_data(row, seed):
    """Input sets made by torch (fresh normal data) and shared with CuPy through DLPack,
    so both libraries read the same buffers; None when torch has no CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    tf32 = row["dtype"] == "tf32"  # TF32 on both sides, or off on both
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    tdt = getattr(torch, "float32" if tf32 else row["dtype"])
    shapes = {"x": row["x_shape"], "w": row["w_shape"], "y": row["y_shape"]}
    out = [{k: torch.randn(shapes[k], device="cuda", generator=gen).to(tdt)
            for k in _operands(row["pass"])} for _ in range(row["sets"])]
    torch.cuda.synchronize()  # CuPy's streams do not wait for torch's
    return out


def _cupy_data(row, seed):
    import cupy
    rg = cupy.random.default_rng(seed)
    npdt = _np_dtype(row["dtype"])
    shapes = {"x": row["x_shape"], "w": row["w_shape"], "y": row["y_shape"]}
    out = [{k: rg.standard_normal(tuple(shapes[k]), dtype=cupy.float32).astype(npdt)
            for k in _operands(row["pass"])} for _ in range(row["sets"])]
    cupy.cuda.Device().synchronize()  # made on the null stream; timed on a non-blocking one
    return out


def _gpuconv_calls(row, sets):
    import gpuconv
    kw = dict(stride=row["stride"], padding=row["padding"], dilation=row["dilation"],
              groups=row["groups"])
    if row["dtype"] == "tf32":
        kw["precision"] = "high"  # the TF32 tensor-op entries
    xs, ws = tuple(row["x_shape"]), tuple(row["w_shape"])
    p = row["pass"]
    out = []
    for d in sets:
        if p == "forward":
            out.append(lambda d=d: gpuconv.conv(d["x"], d["w"], **kw))
        elif p == "input_grad":
            out.append(lambda d=d: gpuconv.conv_input_grad(d["y"], d["w"], xs, **kw))
        else:
            out.append(lambda d=d: gpuconv.conv_weight_grad(d["x"], d["y"], ws, **kw))
    return out


def _torch_calls(row, sets):
    import torch
    import torch.nn.functional as F
    nd = len(row["x_shape"]) - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    gin = getattr(torch.nn.grad, f"conv{nd}d_input")
    gwt = getattr(torch.nn.grad, f"conv{nd}d_weight")
    kw = dict(stride=row["stride"], padding=row["padding"], dilation=row["dilation"],
              groups=row["groups"])
    xs, ws = tuple(row["x_shape"]), tuple(row["w_shape"])
    p = row["pass"]
    out = []
    for d in sets:
        if p == "forward":
            out.append(lambda d=d: conv(d["x"], d["w"], **kw))
        elif p == "input_grad":
            out.append(lambda d=d: gin(xs, d["w"], d["y"], **kw))
        else:
            out.append(lambda d=d: gwt(d["x"], ws, d["y"], **kw))
    return out


def measure_row(row, seed):
    import cupy
    res = {"id": row["id"], "seed": seed, "status": "ok"}
    tsets = _torch_data(row, seed)
    if tsets is not None:
        try:
            csets = [{k: cupy.from_dlpack(v) for k, v in d.items()} for d in tsets]
            res["shared_inputs"] = True
        except Exception as e:  # e.g. no bf16 DLPack: separate (equally random) data
            csets = _cupy_data(row, seed)
            res["shared_inputs"] = False
            res["dlpack_error"] = f"{type(e).__name__}: {e}"
    else:
        csets = _cupy_data(row, seed)
    impls = [_Impl("gpuconv", _gpuconv_calls(row, csets), "cupy")]
    cs = cupy.cuda.Stream(non_blocking=True)
    try:
        _cupy_prepare(impls[0], cs)
    except _TooSlow as e:
        res["status"] = f"skipped: too slow ({e})"
        return res
    if tsets is not None:
        import torch
        ts = torch.cuda.Stream()
        impls.append(_Impl("torch", _torch_calls(row, tsets), "torch"))
        if row["dtype"] == "tf32":
            impls[1].tol = 5e-3  # cuDNN's TF32 algorithms round differently
        try:
            _torch_prepare(impls[1], ts)
        except Exception as e:
            res["torch_error"] = f"{type(e).__name__}: {e}"
            impls.pop()
    per_round = -(-REPLAYS // ROUNDS)
    for _ in range(ROUNDS):
        for im in impls:
            (_cupy_replays(im, cs, per_round) if im.kind == "cupy"
             else _torch_replays(im, ts, per_round))
    for im in impls:
        r = dict(im.res)
        r["timing"] = "graph" if im.graph is not None else "stream"
        r["device_ms"] = _median_spread([t * 1e3 for t in im.replay_s])
        half = len(im.replay_s) // 2
        r["round_medians_ms"] = [statistics.median(im.replay_s[:half]) * 1e3,
                                 statistics.median(im.replay_s[half:]) * 1e3]
        res[im.name] = r
    if len(impls) == 2 and res.get("shared_inputs"):
        try:  # same inputs: how far apart the two libraries' results are
            import torch
            tb = impls[1].ref0.float().contiguous()
            torch.cuda.synchronize()
            cs.synchronize()
            a = impls[0].ref0.astype(cupy.float64)
            b = cupy.from_dlpack(tb).astype(cupy.float64)
            res["rel_diff_vs_torch"] = float(cupy.abs(a - b).max()
                                             / max(float(cupy.abs(b).max()), 1e-300))
        except Exception as e:
            res["rel_diff_vs_torch"] = f"{type(e).__name__}: {e}"
    for im in impls:
        im.graph = im.outs = im.ref0 = None
    return res


def bench(out_dir, deadline_s, only=None, seed=None):
    """Measure every planned row (or those whose id contains one of `only`) until the
    deadline; one JSON line per row in out_dir/bench.jsonl."""
    import cupy
    t_start = time.monotonic()
    seed = int(seed if seed is not None else time.time_ns() % 2**31)
    ceil = _load_ceilings(out_dir)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    l2 = int(props.get("l2CacheSize") or L2_BYTES)
    rows = plan_rows(ceilings=ceil, l2_bytes=l2)
    if only:
        rows = [r for r in rows if any(o in r["id"] for o in only)]
    path = Path(out_dir, "bench.jsonl")
    # a few hundred ms of matmuls first so the clocks have ramped up
    a = cupy.ones((WARM_N, WARM_N), cupy.float32)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        a @ a
        cupy.cuda.Device().synchronize()
    del a
    done = 0
    with open(path, "a") as f:
        for i, row in enumerate(rows):
            left = deadline_s - (time.monotonic() - t_start)
            if left < min(row["planned_s"], 3.0):
                rec = {"id": row["id"], "status": "skipped: deadline"}
            else:
                t1 = time.monotonic()
                try:
                    rec = measure_row(row, seed + i)
                except Exception as e:
                    rec = {"id": row["id"], "status": f"error: {type(e).__name__}: {e}"}
                rec["wall_s"] = time.monotonic() - t1
                done += 1
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            if done and done % 8 == 0:
                cupy.get_default_memory_pool().free_all_blocks()
                try:
                    import torch
                    torch.cuda.empty_cache()
                except Exception:
                    pass
            print(f"[{time.monotonic() - t_start:6.1f} s] {row['id']}: {rec['status']}",
                  flush=True)
    return 0


def _load_ceilings(out_dir):
    try:
        c = json.loads(Path(out_dir, "ceilings.json").read_text())
        ceil = {"copy_GBps": c["copy_GBps"], "matmul_GFLOPs": dict(c["matmul_GFLOPs"]),
                "measured": True, "assumed": []}
        for dt, v in ASSUMED_CEILINGS["matmul_GFLOPs"].items():
            if dt not in ceil["matmul_GFLOPs"]:  # that matmul failed: the lead stands in
                ceil["matmul_GFLOPs"][dt] = v
                ceil["assumed"].append(f"matmul {dt}")
        return ceil
    except Exception:
        return dict(ASSUMED_CEILINGS, measured=False)


# ----------------------------------------------------------------------------- report
def _geomean(vals):
    vals = [v for v in vals if v and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def _derive(row, rec, ceil):
    """Per-implementation derived numbers for one measured row."""
    out = {}
    for name in ("gpuconv", "torch"):
        r = rec.get(name) if rec else None
        if not r:
            continue
        t = r["device_ms"]["median"] / 1e3
        t_mem = row["bytes"] / (ceil["copy_GBps"] * 1e9)
        t_math = row["flops"] / (ceil["matmul_GFLOPs"][row["dtype"]] * 1e9)
        out[name] = {"ms": t * 1e3, "spread": r["device_ms"]["spread"],
                     "GFLOPs": row["flops"] / t / 1e9, "GBps": row["bytes"] / t / 1e9,
                     "frac": max(t_mem, t_math) / t, "frac_bw": t_mem / t,
                     "frac_math": t_math / t, "timing": r["timing"],
                     "eager_ms": r["eager_ms"]["median"], "stream_ms": r["stream_ms"],
                     "host_us": r["host_us"]["median"]}
    if "gpuconv" in out and "torch" in out:
        out["ratio"] = out["torch"]["ms"] / out["gpuconv"]["ms"]
    return out


def _parse_tests(out_dir):
    import xml.etree.ElementTree as ET
    p = Path(out_dir, "gpu_tests.xml")
    if not p.exists():
        return {"status": "not run"}
    try:
        root = ET.parse(p).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        d = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        d["passed"] = d["tests"] - d["failures"] - d["errors"] - d["skipped"]
        d["failed_names"] = [tc.get("classname", "") + "::" + tc.get("name", "")
                             for tc in suite.iter("testcase")
                             if tc.find("failure") is not None or tc.find("error") is not None][:10]
        return d
    except Exception as e:
        return {"status": f"unreadable junit xml ({type(e).__name__}: {e})"}


def _parse_sanitizer(out_dir, tool):
    import re
    p = Path(out_dir, f"sanitizer_{tool}.log")
    if not p.exists():
        return {"status": "not run"}
    text = p.read_text(errors="replace")
    if text.startswith("SKIPPED"):
        return {"status": text.strip().splitlines()[0]}
    if re.search(r"device not supported|not supported on this device|Target application "
                 r"returned an error.*\n.*999", text, re.I):
        return {"status": "skipped: compute-sanitizer refused the device"}
    done = re.search(r"SANITIZE-CASES-DONE (\d+) cases, (\d+) wrong", text)
    summ = re.search(r"(ERROR|RACECHECK) SUMMARY: (\d+) (error|hazard)", text)
    cases = len(re.findall(r"^CASE ", text, re.M))
    if summ is None and done is None:
        tail = " / ".join(text.strip().splitlines()[-3:])[:300]
        return {"status": f"tool did not run the cases: {tail}", "cases": cases}
    d = {"cases": cases, "wrong": int(done.group(2)) if done else None,
         "reports": int(summ.group(2)) if summ else None,
         "complete": done is not None}
    d["status"] = ("clean" if d["reports"] == 0 and d["wrong"] == 0 and d["complete"]
                   else "PROBLEMS" if (d["reports"] or d["wrong"]) else "incomplete")
    return d


def _read_jsonl(path):
    recs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                recs[r["id"]] = r
            except Exception:
                pass
    return recs


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(out_dir, planned=None):
    """Full JSON (out_dir/gpu_check.json), the per-row table, then the compact JSON and
    the short table, printed last.  With no results this is the dry run's skeleton."""
    out_dir = Path(out_dir) if out_dir else None
    recs = _read_jsonl(out_dir / "bench.jsonl") if out_dir else {}
    ceil = _load_ceilings(out_dir) if out_dir else dict(ASSUMED_CEILINGS, measured=False)
    rows = planned if planned is not None else plan_rows(ceilings=ceil)
    derived = {}
    lines = ["| layer | pass | dtype | N | sets | gpuconv ms (spread) | torch ms | ratio | "
             "GFLOP/s | GB/s | frac | eager ms / host us | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = recs.get(r["id"])
        d = _derive(r, rec, ceil) if rec and rec.get("status") == "ok" else {}
        derived[r["id"]] = d
        g, t = d.get("gpuconv", {}), d.get("torch", {})
        status = rec["status"] if rec else "not run"
        if g and g["timing"] != "graph":
            status += " (not capturable: stream timing)"
        lines.append(
            f"| {r['layer']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['sets']} | "
            f"{_fmt(g.get('ms'), '.3f')} ({_fmt(g.get('spread') and 100 * g['spread'], '.0f')}%) | "
            f"{_fmt(t.get('ms'), '.3f')} | {_fmt(d.get('ratio'), '.2f')} | "
            f"{_fmt(g.get('GFLOPs'), '.0f')} | {_fmt(g.get('GBps'), '.0f')} | "
            f"{_fmt(g.get('frac'), '.3f')} | {_fmt(g.get('eager_ms'), '.3f')} / "
            f"{_fmt(g.get('host_us'), '.0f')} | {status} |")
    # summary per group, pass, dtype
    summary = []
    keys = []
    for r in rows:
        k = (r["group"], r["pass"], r["dtype"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        sel = [r for r in rows if (r["group"], r["pass"], r["dtype"]) == k]
        got = [(r, derived[r["id"]]) for r in sel if derived[r["id"]].get("gpuconv")]
        tg = sum(d["gpuconv"]["ms"] for _, d in got) / 1e3
        s = {"group": k[0], "pass": k[1], "dtype": k[2], "rows": len(sel), "measured": len(got),
             "ratio_geomean": _geomean([d.get("ratio") for _, d in got]),
             "GFLOPs": sum(r["flops"] for r, _ in got) / tg / 1e9 if got else None,
             "GBps": sum(r["bytes"] for r, _ in got) / tg / 1e9 if got else None,
             "frac_median": statistics.median([d["gpuconv"]["frac"] for _, d in got])
             if got else None,
             "torch_frac_median": statistics.median([d["torch"]["frac"] for _, d in got
                                                     if "torch" in d]) if any(
                 "torch" in d for _, d in got) else None,
             "host_us_median": statistics.median([d["gpuconv"]["host_us"] for _, d in got])
             if got else None,
             "torch_host_us_median": statistics.median([d["torch"]["host_us"] for _, d in got
                                                        if "torch" in d]) if any(
                 "torch" in d for _, d in got) else None,
             # back-to-back eager calls over graph replay: > 1 where the host is the limit
             "eager_over_graph_median": statistics.median(
                 [d["gpuconv"]["stream_ms"] / d["gpuconv"]["ms"] for _, d in got])
             if got else None}
        summary.append(s)
    steps = _read_steps(out_dir) if out_dir else {}
    checks = {"tests": _parse_tests(out_dir) if out_dir else {"status": "dry run"},
              "memcheck": _parse_sanitizer(out_dir, "memcheck") if out_dir else {"status": "dry run"},
              "racecheck": _parse_sanitizer(out_dir, "racecheck") if out_dir else {"status": "dry run"}}
    try:
        pre = json.loads(Path(out_dir, "precompile.json").read_text()) if out_dir else None
    except Exception:
        pre = None
    overhead = _overhead_summary(out_dir) if out_dir else None
    capture = {"gpuconv_not_capturable": [], "torch_not_capturable": [], "graph_mismatch": [],
               "non_finite": []}
    for rid, rec in recs.items():
        for name in ("gpuconv", "torch"):
            r = rec.get(name) or {}
            if r.get("graph_error"):
                capture[f"{name}_not_capturable"].append(f"{rid}: {r['graph_error'][:200]}")
            if r.get("graph_matches_eager") is False:
                capture["graph_mismatch"].append(f"{name} {rid}")
            if r.get("finite") is False:
                capture["non_finite"].append(f"{name} {rid}")
    env = _environment(out_dir, ceil)
    full = {"environment": env, "ceilings": ceil, "steps": steps, "checks": checks, "precompile": pre,
            "host_overhead": overhead, "capture": capture,
            "rows": [{**r, "result": recs.get(r["id"]), "derived": derived[r["id"]]}
                     for r in rows], "summary": summary}
    if out_dir:
        Path(out_dir, "gpu_check.json").write_text(json.dumps(full, indent=1, default=str))
        Path(out_dir, "gpu_check_rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print()
    compact = {"date": env.get("date"), "commit": env.get("commit"), "device": env.get("device"),
               "seed": env.get("seed"), "ceilings": {"copy_GBps": ceil["copy_GBps"], "matmul_GFLOPs": ceil["matmul_GFLOPs"],
                            "measured": ceil.get("measured", False),
                            "assumed": ceil.get("assumed")},
               "steps": steps, "checks": checks, "precompile": pre,
               "host_overhead_us": overhead,
               "capture": {k: (len(v), v[:2]) for k, v in capture.items()},
               "rows_measured": sum(1 for d in derived.values() if d.get("gpuconv")),
               "rows_planned": len(rows)}
    print("GPU-CHECK-JSON " + json.dumps(compact, default=str, separators=(",", ":")))
    print()
    print("| group | pass | dtype | rows | ratio vs torch (geomean) | GFLOP/s | GB/s | "
          "frac of ceiling (median; torch) | host us | eager/graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['group']} | {s['pass']} | {s['dtype']} | {s['measured']}/{s['rows']} | "
              f"{_fmt(s['ratio_geomean'], '.2f')} | {_fmt(s['GFLOPs'], '.0f')} | "
              f"{_fmt(s['GBps'], '.0f')} | {_fmt(s['frac_median'], '.3f')}; "
              f"{_fmt(s['torch_frac_median'], '.3f')} | {_fmt(s['host_us_median'], '.0f')} | "
              f"{_fmt(s['eager_over_graph_median'], '.2f')} |")
    return full


def _environment(out_dir, ceil):
    """Date, commit (GPUCONV_COMMIT or git), seed, device (from the ceilings step)."""
    import datetime
    import subprocess
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("GPUCONV_COMMIT") or None,
           "seed": os.environ.get("GPUCONV_TEST_SEED")}
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        except Exception:
            pass
    try:
        c = json.loads(Path(out_dir, "ceilings.json").read_text()) if out_dir else {}
        env["device"] = c.get("device", {}).get("name")
        env["device_props"] = c.get("device")
    except Exception:
        env["device"] = None
    try:
        env["versions"] = Path(out_dir, "env.txt").read_text()[:2000] if out_dir else None
    except Exception:
        env["versions"] = None
    return env


def _overhead_summary(out_dir):
    """{pass: median over layers of the median call microseconds} from the overhead step."""
    try:
        rows = json.loads(Path(out_dir, "overhead.json").read_text())["rows"]
    except Exception:
        return None
    out = {}
    for p in PASSES:
        v = [r["call_us"] for r in rows if r["pass"] == p]
        if v:
            out[p] = round(statistics.median(v), 1)
    return out


def _read_steps(out_dir):
    p = Path(out_dir, "steps.tsv")
    out = {}
    if p.exists():
        for line in p.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                out[parts[0]] = {"rc": parts[1], "wall_s": parts[2], "timeout_s": parts[3]}
    return out


# ----------------------------------------------------------------------------- CLI
def _print_plan(p):
    print("== GPU check plan (dry run: nothing runs on a GPU)")
    print("| step | planned s | timeout s | what |")
    print("|---|---|---|---|")
    for s in p["steps"]:
        print(f"| {s['step']} | {s['planned_s']} | {s['timeout_s']} | {s['what']} |")
    print(f"planned total {p['planned_total_s']} s (limit {PLANNED_LIMIT_S}); every step capped "
          f"so the script ends within {p['global_limit_s']} s")
    print(f"bench rows: {len(p['rows'])}, planned {p['bench_rows_planned_s']:.0f} s "
          f"(assumed ceilings {ASSUMED_CEILINGS}, efficiency {ASSUMED_EFFICIENCY})")
    print()
    print("| id | N | x | w | sets | rotated MB | GFLOP | min MB | floor ms | bound | "
          "replays | planned s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in p["rows"]:
        print(f"| {r['id']} | {r['batch']} | {'x'.join(map(str, r['x_shape']))} | "
              f"{'x'.join(map(str, r['w_shape']))} | {r['sets']} | {r['rotated_bytes'] / 1e6:.0f} | "
              f"{r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.1f} | {r['floor_ms']:.3f} | "
              f"{r['bound']} | {r['replays']} | {r['planned_s']:.2f} |")
    print()
    sp = p["sanitizer_cases"]
    print("sanitizer cases (memcheck, racecheck; dtypes " + ", ".join(SANITIZER_DTYPES) + "):")
    for c in sp["cases"]:
        print(f"  {c['case']}: {', '.join(c['passes'])} -> {', '.join(c['families'])}")
    print(f"  kernel families: {', '.join(sp['families'])}; uncovered: "
          f"{', '.join(sp['uncovered']) or 'none'}")
    print()
    print("== table skeleton")


def main(argv=None):
    ap = argparse.ArgumentParser(description="driver of benchmarks/gpu_check.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="the dry run: plan every measurement, print the skeleton")
    pp.add_argument("--json")
    sub.add_parser("steps", help="step budgets as shell assignments")
    pc = sub.add_parser("ceilings")
    pc.add_argument("--out", required=True)
    pb = sub.add_parser("bench")
    pb.add_argument("--out", required=True)
    pb.add_argument("--deadline-s", type=float, required=True)
    pb.add_argument("--only", nargs="*")
    pb.add_argument("--seed", type=int)
    sub.add_parser("sanitize-cases")
    pr = sub.add_parser("report")
    pr.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "plan":
        p = plan()
        if args.json:
            Path(args.json).write_text(json.dumps(p, indent=1, default=str))
        _print_plan(p)
        report(None, planned=p["rows"])
        return 0
    if args.cmd == "steps":
        for n, pl, t, _ in STEPS:
            print(f"PLAN_{n}={pl}; TIMEOUT_{n}={t}")
        print(f"GLOBAL_LIMIT={GLOBAL_LIMIT_S}")
        return 0
    if args.cmd == "ceilings":
        return ceilings(args.out)
    if args.cmd == "bench":
        return bench(args.out, args.deadline_s, args.only, args.seed)
    if args.cmd == "sanitize-cases":
        return sanitize_cases()
    if args.cmd == "report":
        report(args.out)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
