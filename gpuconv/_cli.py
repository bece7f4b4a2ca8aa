"""``python -m gpuconv`` / ``gpuconv``: info, selftest and bench.

``main(argv)`` returns the exit status instead of calling ``sys.exit`` so that
it can be tested in-process.  Exit status: 0 success, 1 a failed check or a
runtime problem (reported in one line, never a traceback), 2 bad arguments
(argparse's usage message).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import platform
import sys
import time

import numpy as np

from ._geometry import available_dtypes
from .testing import selftest

_HELP = """\
commands:
  gpuconv info                       versions, backends, devices, caches, workspace
  gpuconv selftest [--backend B]     randomized check of every pass against the reference
  gpuconv bench [--quick]            layer-suite benchmark beside PyTorch (if installed)
run `gpuconv COMMAND --help` for a command's options."""


class _Fail(Exception):
    """A problem to report in one line with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's behaviour, kept explicit: usage + message, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser():
    p = _Parser(prog="gpuconv", description="gpuconv: convolutions with gradients on NumPy "
                "and CuPy arrays.", epilog=_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    pi = sub.add_parser("info", help="versions, backends, devices, caches, workspace limit",
                        description="Show what gpuconv can use on this machine.")
    pi.add_argument("--json", action="store_true", help="print the information as JSON")

    ps = sub.add_parser("selftest", help="randomized correctness sweep against the reference",
                        description="Check forward (with bias), input grad, weight grad, bias "
                        "grad and transpose, ranks 1-3, every dtype, on every usable backend, "
                        "against the float64 reference.  Exit status 1 on any failure.")
    ps.add_argument("--backend", choices=("numpy", "cupy", "cudasim"), action="append",
                    help="backend to test (repeatable; default: every usable one)")
    ps.add_argument("--seed", type=_nonneg_int, default=None,
                    help="random seed (default: a fresh one, printed for reruns)")
    ps.add_argument("--cases", type=_pos_int, default=None,
                    help="random geometries per pass, rank and dtype (default: 8; 4 on cudasim)")

    pb = sub.add_parser("bench", help="benchmark the layer suite beside installed peers",
                        description="Time forward, input grad and weight grad over the "
                        "benchmark layer suite on one backend, beside PyTorch (CPU or CUDA) "
                        "when it is installed; prints GFLOP/s, GB/s and ratios.")
    pb.add_argument("--backend", choices=("numpy", "cupy", "cudasim"), default=None,
                    help="backend to time (default: the best usable one: cupy, else numpy)")
    pb.add_argument("--quick", action="store_true",
                    help="a few small layers, few repeats (under 30 s on 2 CPU cores)")
    pb.add_argument("--dtype", default=None, help="dtype to time (default: the suite's)")
    pb.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")
    pb.add_argument("--plot", metavar="FILE.png", default=None,
                    help="also plot throughput per layer (needs matplotlib)")
    pb.add_argument("--batch", type=_pos_int, default=None, help="batch size (default: the "
                    "suite's)")
    pb.add_argument("--layers", nargs="+", metavar="NAME", default=None,
                    help="layer names from the suite (default: all, or the quick subset)")
    pb.add_argument("--no-peers", action="store_true", help="skip the PyTorch comparison")
    pk = sub.add_parser("kernels", help="compile every kernel module (NVRTC, no GPU needed): "
                        "registers, spills, shared memory, occupancy, SASS main-loop counts",
                        description="Compile every CUDA module for an architecture through "
                        "NVRTC (CuPy; no GPU needed); print registers, spills, shared memory "
                        "and occupancy per entry point and, with cuobjdump, the main loop's "
                        "instruction counts.  Exit status 1 on any register spill.")
    pk.add_argument("--arch", default="sm_90", help="target architecture (default: sm_90)")
    pk.add_argument("--cubin-dir", metavar="DIR", default=None,
                    help="write one cubin per module into DIR")
    pk.add_argument("--json", action="store_true", help="print the reports as JSON")
    p._sub = {"info": pi, "selftest": ps, "bench": pb, "kernels": pk}
    return p


def _check_bench_args(pb, args):
    """Argument errors argparse cannot see (exit 2 through pb.error)."""
    if args.dtype is not None:
        names = [n for n, _ in available_dtypes()]
        if args.dtype not in names:
            pb.error(f"argument --dtype: invalid choice: {args.dtype!r} (choose from "
                     f"{', '.join(names)})")
    if args.layers:
        try:
            from . import _bench
            known = [L["name"] for L in _bench.LAYERS]
        except Exception:
            return
        bad = [L for L in args.layers if L not in known]
        if bad:
            pb.error(f"argument --layers: unknown layer(s) {', '.join(map(repr, bad))} "
                     f"(choose from {', '.join(known)})")


def _pos_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


# =============================================================================== info
def _blas_info():
    """[(name, version, threads or None, source)] for the BLAS numpy uses."""
    out = []
    try:
        import threadpoolctl
        for lib in threadpoolctl.threadpool_info():
            if lib.get("user_api") == "blas":
                out.append({"name": lib.get("internal_api"), "version": lib.get("version"),
                            "threads": lib.get("num_threads"),
                            "threading_layer": lib.get("threading_layer"),
                            "architecture": lib.get("architecture"),
                            "source": "threadpoolctl"})
    except ImportError:
        pass
    if not out:
        try:
            cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            out.append({"name": cfg.get("name"), "version": cfg.get("version"),
                        "threads": None, "source": "numpy build config"})
        except Exception:
            pass
    return out


def _cupy_cache_dir():
    d = os.environ.get("CUPY_CACHE_DIR")
    if d:
        return d, "CUPY_CACHE_DIR"
    return os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"), "CuPy's default"


def _cudasim_cache_dir():
    try:
        from ._runtimes import cudasim
        return os.fspath(cudasim.cache_dir())
    except Exception:  # the emulator cannot import or has no writable cache here
        return None


def collect_info():
    """Everything `gpuconv info` shows, as a JSON-able dict."""
    import gpuconv
    from . import _dispatch
    binfo = gpuconv.backend_info()
    backends = binfo["backends"]
    cupy_details = backends.get("cupy", {})
    cupy_dir, cupy_dir_src = _cupy_cache_dir()
    try:
        import threadpoolctl
        tpc = threadpoolctl.__version__
    except ImportError:
        tpc = None
    try:
        import ml_dtypes
        mld = ml_dtypes.__version__
    except ImportError:
        mld = None
    return {
        "gpuconv": {"version": gpuconv.__version__,
                    "location": os.path.dirname(os.path.abspath(gpuconv.__file__))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "ml_dtypes": mld,
        "threadpoolctl": tpc,
        "cupy": cupy_details.get("cupy_version"),
        "cuda_runtime_version": cupy_details.get("cuda_runtime_version"),
        "cuda_driver_version": cupy_details.get("driver_version"),
        "blas": _blas_info(),
        "backends": {n: {"usable": b["usable"], "reason": b["reason"]}
                     for n, b in backends.items()},
        "forced_backend": binfo.get("forced"),
        "forced_by": ("GPUCONV_BACKEND" if os.environ.get(_dispatch._ENV, "").strip()
                      not in ("", "auto") else None),
        "devices": cupy_details.get("devices", []),
        "kernel_cache": {"cupy": {"dir": cupy_dir, "source": cupy_dir_src},
                         "cudasim": _cudasim_cache_dir()},
        "workspace_limit_bytes": gpuconv.get_workspace_limit(),
        "cpu_native_kernels": backends.get("numpy", {}).get("native_kernels"),
    }


def _cuda_version(v):
    if not v:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def format_info(info):
    lines = [f"gpuconv {info['gpuconv']['version']}  ({info['gpuconv']['location']})"]
    lines.append(f"Python {info['python']} on {info['platform']}, {info['cpu_count']} CPUs")
    vers = [f"NumPy {info['numpy']}"]
    vers.append(f"CuPy {info['cupy']}" if info["cupy"] else "CuPy not installed")
    if info["cuda_runtime_version"]:
        vers.append(f"CUDA runtime {_cuda_version(info['cuda_runtime_version'])}, driver "
                    f"{_cuda_version(info['cuda_driver_version'])}")
    vers.append(f"ml_dtypes {info['ml_dtypes']}" if info["ml_dtypes"]
                else "ml_dtypes not installed (no bfloat16)")
    lines.append(", ".join(vers))
    for b in info["blas"] or [{"name": "unknown", "version": None, "threads": None,
                                "source": "-"}]:
        s = f"BLAS: {b['name']} {b['version'] or ''}".rstrip()
        extra = []
        if b.get("threads"):
            extra.append(f"{b['threads']} threads")
        if b.get("threading_layer"):
            extra.append(b["threading_layer"])
        if b.get("architecture"):
            extra.append(b["architecture"])
        if extra:
            s += f" ({', '.join(extra)})"
        s += f"  [{b['source']}" + ("" if info["threadpoolctl"] or b["source"] != "numpy build "
                                     "config" else "; pip install threadpoolctl for threads") + "]"
        lines.append(s)
    lines.append("")
    lines.append("Backends")
    for name, b in info["backends"].items():
        lines.append(f"  {name:8s} " + ("usable" if b["usable"] else f"not usable: {b['reason']}"))
    if info["forced_backend"]:
        lines.append(f"  forced: {info['forced_backend']}"
                     + (" (GPUCONV_BACKEND)" if info["forced_by"] else ""))
    else:
        lines.append("  selection: by array type (numpy -> numpy, cupy -> cupy); "
                     "GPUCONV_BACKEND or backend= to force one")
    lines.append("")
    lines.append("Devices")
    if info["devices"]:
        for d in info["devices"]:
            lines.append(f"  {d['id']}: {d['name']}, compute capability "
                         f"{d['compute_capability']}, {d['memory_bytes'] / 2**30:.1f} GiB")
    else:
        lines.append("  none (no usable CUDA device)")
    lines.append("")
    lines.append("Kernel caches")
    kc = info["kernel_cache"]
    lines.append(f"  cupy:    {kc['cupy']['dir']}  ({kc['cupy']['source']})")
    lines.append(f"  cudasim: {kc['cudasim'] or 'none reported by the emulator'}")
    nk = info.get("cpu_native_kernels") or {}
    if nk:
        lines.append(f"  native:  {nk.get('library') or '-'}")
        lines.append("CPU depthwise kernels: " + (
            f"native ({nk.get('compiler')})" if nk.get("usable")
            else f"NumPy (native kernels not usable: {nk.get('reason')})"))
    lines.append("")
    lim = info["workspace_limit_bytes"]
    lines.append(f"CPU workspace limit: {lim / 2**20:g} MiB "
                 "(GPUCONV_WORKSPACE_MB or gpuconv.set_workspace_limit)")
    return "\n".join(lines)


def _cmd_info(args):
    info = collect_info()
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


# =============================================================================== selftest
def run_selftest(backends, seed, cases=None, out=print):
    """Run the sweep (:func:`gpuconv.testing.selftest.run`); print the table through
    `out`; return the number of failed rows."""
    rows, errors, seconds = selftest.run(backends, seed, cases)
    header = f"{'backend':8s} {'pass':12s} {'dtype':9s} {'1-d':>9s} {'2-d':>9s} {'3-d':>9s}" \
             f" {'tol':>9s}  result"
    out(header)
    out("-" * len(header))
    for backend, pass_name, dname, errs, tol, failed in rows:
        cells = " ".join(f"{'ERROR' if np.isnan(errs[n]) else f'{errs[n]:.1e}':>9s}"
                         for n in (1, 2, 3))
        out(f"{backend:8s} {pass_name:12s} {dname:9s} {cells} {tol:9.1e}  "
            f"{'FAIL' if failed else 'ok'}")
    nfail = sum(r[-1] for r in rows)
    for (backend, pass_name, dname), (msg, count) in errors.items():
        more = f" (and {count - 1} more case(s) in this row)" if count > 1 else ""
        out(f"error: {backend} {pass_name} {dname} {msg}{more}")
    out(f"{len(rows) - nfail}/{len(rows)} rows passed (worst relative error per rank, "
        f"max|result - reference| / max|reference|) in {seconds:.1f} s; "
        f"seed {seed}")
    return nfail


def _cmd_selftest(args):
    import gpuconv
    usable = gpuconv.available_backends()
    if args.backend:
        backends = list(dict.fromkeys(args.backend))
        info = gpuconv.backend_info()["backends"]
        for b in backends:
            if b not in usable:
                raise _Fail(f"backend {b!r} cannot run here: {info[b]['reason']}")
    else:
        backends = usable
        skipped = [b for b in ("cupy", "cudasim") if b not in usable]
        if skipped:
            print(f"skipping unusable backends: {', '.join(skipped)} (see `gpuconv info`)")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 10**6)
    print(f"gpuconv {gpuconv.__version__} selftest on {', '.join(backends)}; seed {seed} "
          f"(rerun with --seed {seed})")
    nfail = run_selftest(backends, seed, args.cases)
    if nfail:
        print(f"SELFTEST FAILED: {nfail} row(s)")
        return 1
    print("selftest passed")
    return 0


# =============================================================================== bench
class _Progress:
    """A progress bar on stderr (redrawn in place on a terminal, one line per step otherwise)."""

    def __init__(self, stream=None, width=24):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, i, n, name):
        el = time.perf_counter() - self.t0
        fill = int(self.width * i / max(n, 1))
        bar = "#" * fill + "." * (self.width - fill)
        what = name if name is not None else "done"
        line = f"bench [{bar}] {i}/{n} {what} ({el:.0f} s)"
        if self.tty:
            self.stream.write("\r" + line.ljust(78) + ("\n" if name is None else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _default_bench_backend():
    import gpuconv
    return "cupy" if "cupy" in gpuconv.available_backends() else "numpy"


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    passes = [p for p in selftest.PASSES if any(r["pass"] == p for r in rows)]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(6, 0.8 * len(layers) + 2),
                                                      2.8 * len(passes)), squeeze=False)
    for ax, p in zip(axes[:, 0], passes):
        sel = {r["layer"]: r for r in rows if r["pass"] == p}
        xs = np.arange(len(layers))
        ours = [sel[L]["gflops"] if L in sel else 0 for L in layers]
        peers = [sel[L]["flops"] / (sel[L]["peer_time_ms"] / 1e3) / 1e9
                 if L in sel and sel[L].get("peer_time_ms") else 0 for L in layers]
        be = rows[0]["backend"]
        if any(peers):
            ax.bar(xs - 0.2, ours, 0.4, label=f"gpuconv ({be})")
            ax.bar(xs + 0.2, peers, 0.4, label=rows[0].get("peer") or "peer")
        else:
            ax.bar(xs, ours, 0.6, label=f"gpuconv ({be})")
        ax.set_ylabel("GFLOP/s (log)")
        ax.set_yscale("log")
        ax.set_title(p)
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_bench(args):
    import gpuconv
    try:
        from . import _bench
    except ImportError as e:
        raise _Fail(f"the benchmark module is missing ({e})") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Fail("--plot needs matplotlib: pip install matplotlib "
                        "(or pip install 'gpuconv[bench]')") from None
    backend = args.backend or _default_bench_backend()
    if backend not in gpuconv.available_backends():
        reason = gpuconv.backend_info()["backends"][backend]["reason"]
        raise _Fail(f"backend {backend!r} cannot run here: {reason}")
    kw = dict(quick=args.quick, backend=backend, progress=_Progress(),
              peer="none" if args.no_peers else "auto")
    if args.dtype is not None:
        kw["dtype"] = args.dtype
    if args.batch is not None:
        kw["batch"] = args.batch
    layers = args.layers or None
    busy_before = _bench.cpu_busy()
    t0 = time.perf_counter()
    rows = _bench.run(layers, **kw)
    elapsed = time.perf_counter() - t0
    busy_after = _bench.cpu_busy()
    print(f"gpuconv {gpuconv.__version__} bench on {backend}"
          + (" (quick)" if args.quick else "") + f": {len(rows)} rows in {elapsed:.1f} s")
    print(_bench.load_text(busy_before, busy_after))
    print("ratio = peer time / gpuconv time (> 1: gpuconv is faster); GFLOP/s counts a "
          "multiply-add as 2; GB/s from the minimum bytes moved; gpuconv and the peer are "
          "timed in alternating rounds (one discarded call after each switch, median)")
    if not args.no_peers and rows and all(r["peer"] is None for r in rows):
        print("peer columns are '-': PyTorch is not installed here"
              + (" or sees no CUDA device" if backend == "cupy" else "")
              + " -- pip install torch to compare (the CPU wheel: "
              "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    print()
    print(_bench.format_table(rows))
    summary = _bench.summarize(rows)
    if summary:
        print()
        print(_bench.format_summary(summary))
    if args.json:
        doc = {"environment": _bench.environment_info(), "backend": backend,
               "quick": args.quick, "seconds": elapsed, "rows": rows, "summary": summary}
        try:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
        except OSError as e:
            raise _Fail(f"--json {args.json}: {e.strerror or e}") from None
        print(f"\nwrote {args.json}")
    if args.plot:
        try:
            _plot(rows, args.plot)
        except OSError as e:
            raise _Fail(f"--plot {args.plot}: {e.strerror or e}") from None
        print(f"wrote {args.plot}")
    return 0


def _cmd_kernels(args):
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", args.arch):
        raise _Fail(f"--arch {args.arch!r}: expected an architecture like sm_90")
    from ._cuda import report as _kernel_report
    try:
        _kernel_report.nvrtc_compiler()
    except RuntimeError as e:
        raise _Fail(str(e)) from None
    return _kernel_report.main(args.arch, args.cubin_dir, args.json)


# =============================================================================== main
def main(argv=None) -> int:
    """Entry point of ``python -m gpuconv`` and the ``gpuconv`` console script.

    ``argv``: the arguments without the program name (default ``sys.argv[1:]``).
    Returns the exit status: 0 success, 1 a failed check or runtime problem,
    2 bad arguments.  With no arguments prints ``info`` and a short help.

    >>> from gpuconv.__main__ import main
    >>> main(["--version"])
    gpuconv 0.1.0
    0
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "bench":
            _check_bench_args(parser._sub["bench"], args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        if args.version:
            import gpuconv
            print(f"gpuconv {gpuconv.__version__}")
            return 0
        if args.command is None:
            rc = _cmd_info(args)
            print()
            print(_HELP)
            return rc
        return {"info": _cmd_info, "selftest": _cmd_selftest, "bench": _cmd_bench,
                "kernels": _cmd_kernels}[args.command](args)
    except _Fail as e:
        print(f"gpuconv {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` etc.
        return 1
    except Exception as e:  # one line, not a traceback (GPUCONV_DEBUG=1 shows it)
        if os.environ.get("GPUCONV_DEBUG"):
            raise
        print(f"gpuconv {args.command}: error: {type(e).__name__}: {e} "
              f"(set GPUCONV_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
