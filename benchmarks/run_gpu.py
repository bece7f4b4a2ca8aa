#!/usr/bin/env python3
"""GPU layer suite: gpuconv's cupy backend vs PyTorch/cuDNN (TF32 off), CUDA events, medians.

    python benchmarks/run_gpu.py [--quick] [--dtype float32] [--json FILE]

Same layers as the CPU suite (gpuconv._bench.LAYERS), channels-first, batch 8.
Prints one row per (layer, pass) and the geometric mean of the ratio
torch time / gpuconv time per pass last.
"""
import argparse
import json
import math
import sys

import numpy as np


def torch_cuda_fns(g, dtype, rng):
    import torch
    import torch.nn.functional as F
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    tdt = getattr(torch, np.dtype(dtype).name)

    def t(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to("cuda", tdt)

    x, w, gy = t(g.x_shape), t(g.w_shape), t(g.y_shape)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[g.nd]
    kw = dict(stride=g.stride, padding=g.pad_lo, dilation=g.dilation, groups=g.groups)
    gin = getattr(torch.nn.grad, f"conv{g.nd}d_input")
    gwt = getattr(torch.nn.grad, f"conv{g.nd}d_weight")

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    return {"forward": nograd(lambda: conv(x, w, **kw)),
            "input_grad": nograd(lambda: gin(g.x_shape, w, gy, **kw)),
            "weight_grad": nograd(lambda: gwt(x, g.w_shape, gy, **kw))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import cupy
    import gpuconv
    from gpuconv import _bench as B

    if "cupy" not in gpuconv.available_backends():
        print("run_gpu: no usable CUDA device:", gpuconv.backend_info()["backends"]["cupy"]["reason"])
        return 1
    try:
        import torch
        has_torch = torch.cuda.is_available()
    except Exception:
        has_torch = False
    gpuconv.precompile()
    names = B.QUICK_LAYERS if a.quick else [L["name"] for L in B.LAYERS]
    layers = {L["name"]: L for L in B.LAYERS}
    dtype = np.dtype(a.dtype)
    rows = []
    for name in names:
        L = layers[name]
        g = B.layer_geometry(L, 8, dtype)
        rng = np.random.default_rng(0)
        ours = B._gpuconv_fns(L, g, "cupy", dtype, rng)
        theirs = torch_cuda_fns(g, dtype, rng) if has_torch else {}
        for p in B.PASSES:
            t = B._median_time(ours[p], a.repeats, 3, timer="cuda")
            row = {"layer": name, "group": L["group"], "pass": p, "dtype": dtype.name,
                   "time_ms": t * 1e3, "gflops": g.flops / t / 1e9,
                   "gbps": B._min_bytes(g, p) / t / 1e9, "torch_ms": None, "ratio": None}
            if theirs:
                tt = B._median_time(theirs[p], a.repeats, 3, timer="cuda")
                row.update(torch_ms=tt * 1e3, ratio=tt / t)
            rows.append(row)
            print(f"{name:22s} {p:11s} {row['time_ms']:9.3f} ms {row['gflops']:9.1f} GFLOP/s "
                  f"torch {row['torch_ms'] or float('nan'):9.3f} ms ratio "
                  f"{row['ratio'] or float('nan'):6.3f}", file=sys.stderr, flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": B.environment_info(), "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                       "rows": rows}, f, indent=1)
    print("\n| layer | pass | gpuconv ms | GFLOP/s | GB/s | torch ms | ratio (torch/gpuconv) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tms = "-" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| {r['layer']} | {r['pass']} | {r['time_ms']:.3f} | {r['gflops']:.0f} | "
              f"{r['gbps']:.0f} | {tms} | {ratio} |")
    for grp in sorted({r["group"] for r in rows}):
        for p in B.PASSES:
            v = [r["ratio"] for r in rows if r["group"] == grp and r["pass"] == p and r["ratio"]]
            if v:
                gm = math.exp(sum(map(math.log, v)) / len(v))
                print(f"geomean ratio {grp:9s} {p:11s} {gm:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
