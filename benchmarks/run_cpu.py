"""CPU benchmark: gpuconv's NumPy backend vs PyTorch CPU on the layer suite.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/run_cpu.py [--quick] [--json FILE]

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, set on some machines for older OpenBLAS
builds, make the current numpy wheel's OpenBLAS pick a slower kernel; unset them
for this command only.)  Prints the environment, the table and the geometric
means of the speed ratio (PyTorch time / gpuconv time) against the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from gpuconv import _bench  # noqa: E402

TARGETS = {("dense", "forward"): 0.6, ("dense", "input_grad"): 0.5,
           ("dense", "weight_grad"): 0.5, ("depthwise", "all"): 0.25}


def markdown_report(env, rows, summary, args):
    blas = env.get("blas")
    if isinstance(blas, list):
        blas = "; ".join(f"{b['internal_api']} {b['version']} kernel={b['architecture']} "
                         f"threads={b['num_threads']} ({b['threading_layer']})" for b in blas)
    lines = [
        f"- date: {env.get('date')}",
        f"- machine: {env.get('cpu_model')}, {env.get('cores_usable')} usable cores; "
        f"{env.get('platform')}",
        f"- commit: {env.get('commit')}",
        f"- numpy {env.get('numpy')}, BLAS: {blas}",
        f"- peer: torch {env.get('torch')} ({env.get('torch_threads')} threads); gpuconv "
        f"threads: {env.get('gpuconv_threads')}, workspace {env.get('workspace_mb')} MiB",
        f"- environment variables: {env.get('env')}",
        f"- other processes' CPU use: before {env.get('others_busy_before')}, after "
        f"{env.get('others_busy_after')}",
        f"- batch {args.batch}, {args.dtype}, median of {args.repeats or ('3' if args.quick else '7')} "
        f"runs after 1 warm-up; ratio = torch time / gpuconv time",
        "",
        _bench.format_table(rows),
        "",
        _bench.format_summary(summary, TARGETS),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few layers, about 30 s")
    ap.add_argument("--json", metavar="FILE", help="also write environment + rows as JSON")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the environment, table and summary as Markdown")
    ap.add_argument("--layers", nargs="*", help="layer names (default: the whole suite)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip PyTorch")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peak")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each layer wait up to S seconds for other processes to "
                         "leave the CPUs idle (shared machines); the busy fraction seen is "
                         "recorded per layer")
    args = ap.parse_args(argv)

    env = _bench.environment_info()
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if k in os.environ:
            print(f"warning: {k}={os.environ[k]} is set; it may slow OpenBLAS "
                  f"(run with env -u {k})", file=sys.stderr)
    print("# environment")
    for k, v in env.items():
        print(f"{k}: {v}")
    t0 = time.perf_counter()

    busy = {}

    def progress(i, n, name):
        if name is None:
            return
        if args.wait_idle > 0:
            busy[name] = _bench.wait_for_idle(args.wait_idle)
        b = f", others busy {busy[name]:.0%}" if busy.get(name) is not None else ""
        print(f"[{i + 1}/{n}] {name} ({time.perf_counter() - t0:.0f} s{b})", file=sys.stderr,
              flush=True)

    env["others_busy_before"] = _bench.cpu_busy(1.0)
    rows = _bench.run(args.layers or None, quick=args.quick, dtype=args.dtype, batch=args.batch,
                      repeats=args.repeats, peer="none" if args.no_peer else "auto",
                      memory=not args.no_memory, progress=progress)
    for r in rows:
        r["others_busy"] = busy.get(r["layer"])
    env["others_busy_after"] = _bench.cpu_busy(1.0)
    print(f"others_busy_before: {env['others_busy_before']}, after: {env['others_busy_after']}")
    print()
    print(_bench.format_table(rows))
    summary = _bench.summarize(rows)
    if summary:
        print()
        print(_bench.format_summary(summary, TARGETS))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(env, rows, summary, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "summary": summary,
                       "targets": {f"{g}.{p}": t for (g, p), t in TARGETS.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
