"""Depthwise CPU benchmark: gpuconv's NumPy backend vs PyTorch CPU, interleaved rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/dw_cpu.py [--rounds 15]

Every depthwise layer of the suite (gpuconv._bench.LAYERS, group "depthwise"), each pass.
Per round the two sides alternate; after each switch one call is discarded, then
``--calls`` calls are timed one by one.  The medians over all rounds give the ratio
(PyTorch time / gpuconv time; > 1: gpuconv faster).  Both sides use the same thread
count (2 by default).  Before each layer the script waits (``--wait-idle`` seconds at
most) for other processes to leave the CPUs idle and records the busy fraction it saw,
and the 1-minute load average before and after.  The issue-12 floor is 0.5 for the
forward and input-grad rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import numpy as np  # noqa: E402

from gpuconv import _bench  # noqa: E402

FLOOR = {"forward": 0.5, "input_grad": 0.5, "weight_grad": None}


def _time_calls(fn, calls):
    fn()  # discarded: the first call after a switch
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per side per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--passes", nargs="*", default=list(_bench.PASSES))
    ap.add_argument("--layers", nargs="*", help="layer names (default: every depthwise layer)")
    ap.add_argument("--wait-idle", type=float, default=30.0, metavar="S")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    os.environ.setdefault("GPUCONV_NUM_THREADS", str(args.threads))
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads, user_api="blas")
    import torch
    torch.set_num_threads(args.threads)

    layers = [L for L in _bench.LAYERS if L["group"] == "depthwise"]
    if args.layers:
        layers = [L for L in _bench.LAYERS if L["name"] in args.layers]
    env = _bench.environment_info()
    env["loadavg_1m_before"] = os.getloadavg()[0]
    print("# environment")
    for k, v in env.items():
        print(f"{k}: {v}")
    dtype = np.dtype(args.dtype)
    rows = []
    for L in layers:
        busy = _bench.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        load = os.getloadavg()[0]
        g = _bench.layer_geometry(L, args.batch, dtype)
        rng = np.random.default_rng(0)
        ours = _bench._gpuconv_fns(L, g, "numpy", dtype, rng)
        peer = _bench._torch_fns(L, g, dtype, rng, args.threads)
        for p in args.passes:
            tg, tt = [], []
            for _ in range(args.rounds):
                tg += _time_calls(ours[p], args.calls)
                tt += _time_calls(peer[p], args.calls)
            mg, mt = statistics.median(tg), statistics.median(tt)
            row = {"layer": L["name"], "pass": p, "x": list(g.x_shape), "w": list(g.w_shape),
                   "stride": list(g.stride), "gpuconv_ms": mg * 1e3, "torch_ms": mt * 1e3,
                   "ratio": mt / mg, "gpuconv_iqr_ms": _iqr(tg) * 1e3,
                   "torch_iqr_ms": _iqr(tt) * 1e3, "others_busy": busy, "loadavg_1m": load,
                   "floor": FLOOR.get(p)}
            rows.append(row)
            f = row["floor"]
            mark = "" if f is None else (" ok" if row["ratio"] >= f else " BELOW FLOOR")
            print(f"{L['name']:20s} {p:12s} gpuconv {mg * 1e3:7.2f} ms (iqr {row['gpuconv_iqr_ms']:.2f})"
                  f"  torch {mt * 1e3:7.2f} ms (iqr {row['torch_iqr_ms']:.2f})  ratio "
                  f"{row['ratio']:5.2f}{mark}  [busy {busy if busy is None else round(busy, 2)},"
                  f" load {load:.2f}]", flush=True)
    env["loadavg_1m_after"] = os.getloadavg()[0]
    print(f"loadavg 1m before {env['loadavg_1m_before']:.2f}, after {env['loadavg_1m_after']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "args": vars(args)}, f, indent=1)
    return 0


def _iqr(ts):
    q = statistics.quantiles(ts, n=4)
    return q[2] - q[0]


if __name__ == "__main__":
    sys.exit(main())
