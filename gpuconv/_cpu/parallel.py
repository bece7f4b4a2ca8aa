"""CPU parallel execution: the one scheduler of the numpy backend, and BLAS thread control.

Chunks are spread statically over a small pool of threads (one per core the
BLAS library would use), each running single-threaded BLAS; NumPy releases the
GIL in its copies, ufuncs and BLAS calls, so the copies use every core too.
Static assignment keeps every reduction in a fixed order: results are identical
from run to run.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import workspace

_executor = None
_exec_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_state = {"depth": 0, "saved": None}
_blas_libs = None


def _blas_controllers():
    """threadpoolctl controllers of the BLAS library NumPy uses ([] without threadpoolctl)."""
    global _blas_libs
    if _blas_libs is None:
        libs = []
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController()
            blas = [lc for lc in ctl.lib_controllers if lc.user_api == "blas"]
            mine = [lc for lc in blas if "numpy" in str(getattr(lc, "filepath", "")).lower()]
            libs = mine or blas
        except Exception:
            libs = []
        _blas_libs = libs
    return _blas_libs


# A host framework with its own thread pool can take over the GEMMs of the calls made
# from one thread (gpuconv.torch runs them on PyTorch's pool): that thread's calls then
# start no worker threads and no multi-threaded BLAS of their own, so the two pools
# never oversubscribe the cores.  gemm(a, b, out) computes out = a @ b.  The host may
# also take the large copies (im2col gathers, padding, staging) and the col2im adds:
# copy(dst, src, window) sets dst = src, or = the window view (shape, byte strides)
# of src; add(dst, src) sets dst += src; each returns False where it declines (then
# NumPy does it in this thread).
_host = threading.local()


class host_gemm:
    """Context manager: the GEMMs (and, given ``copy`` / ``add``, the copies and
    scatter-adds) of the calls made from this thread go to the host's functions, and
    the backend runs them with one thread (:func:`get_num_threads` is 1)."""

    def __init__(self, gemm, copy=None, add=None):
        self.hooks = (gemm, copy, add)

    def __enter__(self):
        self.prev = tuple(getattr(_host, n, None) for n in ("gemm", "copy", "add"))
        _host.gemm, _host.copy, _host.add = self.hooks

    def __exit__(self, *exc):
        _host.gemm, _host.copy, _host.add = self.prev


def copyto(dst, src, window=None):
    """``dst[...] = src`` (any cast), or ``= as_strided(src, *window)``: the host's copy
    inside :class:`host_gemm` where it takes it, else NumPy's."""
    copy = getattr(_host, "copy", None)
    if copy is not None and copy(dst, src, window):
        return
    if window is not None:
        src = as_strided(src, shape=window[0], strides=window[1], writeable=False)
    np.copyto(dst, src, casting="unsafe")


def add_into(dst, src):
    """``dst += src``: the host's add inside :class:`host_gemm` where it takes it."""
    add = getattr(_host, "add", None)
    if add is None or not add(dst, src):
        np.add(dst, src, out=dst)


def hosted() -> bool:
    """True inside :class:`host_gemm` (a host framework runs this thread's GEMMs)."""
    return getattr(_host, "gemm", None) is not None


def matmul(a, b, out):
    """``out = a @ b`` (written in place): NumPy's BLAS, or the host's GEMM."""
    gemm = getattr(_host, "gemm", None)
    if gemm is None:
        np.matmul(a, b, out=out)
    else:
        gemm(a, b, out)


def get_num_threads() -> int:
    """Threads the CPU backend uses: 1 inside :class:`host_gemm`, else
    ``GPUCONV_NUM_THREADS``, else the BLAS thread count (as set by threadpoolctl or
    OPENBLAS_NUM_THREADS etc.), at most the usable cores."""
    if getattr(_host, "gemm", None) is not None:
        return 1
    env = os.environ.get("GPUCONV_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"environment variable GPUCONV_NUM_THREADS={env!r} is not an "
                             f"integer (a number of threads >= 1)") from None
        if n < 1:
            raise ValueError(f"environment variable GPUCONV_NUM_THREADS={env!r} must be >= 1 "
                             f"(a number of threads; unset it for the BLAS thread count)")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    libs = _blas_controllers()
    if not libs:
        return 1  # cannot make BLAS single-threaded per worker: let BLAS thread alone
    with _blas_lock:
        if _blas_state["depth"]:
            saved = _blas_state["saved"]
            blas = max(n for n in saved) if saved else 1
        else:
            blas = max(lc.num_threads for lc in libs)
    return max(1, min(cores, blas))


_local_setters = None


def _blas_local_setters():
    """OpenBLAS's ``openblas_set_num_threads_local`` (0.3.27+) of each BLAS library that
    has it: the thread count of the calling thread alone ([] where there is none)."""
    global _local_setters
    if _local_setters is None:
        import ctypes
        fns = []
        for lc in _blas_controllers():
            lib = getattr(lc, "dynlib", None)
            for name in ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local",
                         "scipy_openblas_set_num_threads_local64_"):
                fn = getattr(lib, name, None) if lib is not None else None
                if fn is not None:
                    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                    fns.append(fn)
                    break
        _local_setters = fns
    return _local_setters


class _ThreadSingleBlas:
    """In the calling thread, BLAS runs one thread (OpenBLAS's thread-local setting), then
    the thread's previous setting comes back.  Every thread that runs chunks of a
    parallel region enters it: the global setting alone is ignored by OpenBLAS 0.3.31
    when it comes from a thread other than the first that used BLAS, which made
    results depend on the calling thread."""

    def __enter__(self):
        self.prev = [fn(1) for fn in _blas_local_setters()]
        return self

    def __exit__(self, *exc):
        for fn, n in zip(_blas_local_setters(), self.prev):
            fn(n)


class _SingleThreadedBlas:
    """While any parallel region runs, BLAS runs one thread per caller (re-entrant)."""

    def __enter__(self):
        """Returns True when BLAS really runs one thread here.  OpenBLAS may ignore the
        setting when it comes from a thread other than the one that first used it
        (seen with 0.3.31 from a non-main Python thread): the caller then runs its
        chunks in this thread alone instead of oversubscribing the cores."""
        with _blas_lock:
            libs = _blas_controllers()
            if _blas_state["depth"] == 0:
                _blas_state["saved"] = [lc.num_threads for lc in libs]
                for lc in libs:
                    lc.set_num_threads(1)
            _blas_state["depth"] += 1
            if len(_blas_local_setters()) == len(libs):
                return True  # every chunk thread sets its own count (_ThreadSingleBlas)
            return all(lc.num_threads == 1 for lc in libs)

    def __exit__(self, *exc):
        with _blas_lock:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                for lc, n in zip(_blas_controllers(), _blas_state["saved"]):
                    lc.set_num_threads(n)
                _blas_state["saved"] = None



def _after_fork_in_child():
    # worker threads do not survive fork(); a child builds its own pool
    global _executor, _exec_lock, _blas_lock
    _executor = None
    _exec_lock, _blas_lock = threading.Lock(), threading.Lock()
    _blas_state.update(depth=0, saved=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _get_executor(n):
    global _executor
    with _exec_lock:
        if _executor is None or _executor._max_workers < n:
            _executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpuconv")
        return _executor


def run_parallel(chunks, nworkers, arena_bytes, work, init=None, keep=False):
    """Run ``work(arena, state, chunk)`` for every chunk; chunks spread round-robin over
    workers.  Each worker gets its own arena and ``state = init(arena)`` (None without
    `init`).  Returns the states in worker order (deterministic); with ``keep=True``,
    ``(state, arena)`` pairs: the caller reads what the states keep in the arenas, then
    releases them (:func:`run_parallel_sum` does).  On an error every arena is released
    and the first error (in worker order) is raised after all workers stopped."""
    nworkers = max(1, min(nworkers, len(chunks)))
    parts = [chunks[i::nworkers] for i in range(nworkers)]

    def job(part):
        if nworkers > 1:
            with _ThreadSingleBlas():
                return run(part)
        return run(part)

    def run(part):
        arena = workspace.acquire(arena_bytes)
        try:
            state = init(arena) if init is not None else None
            for c in part:
                work(arena, state, c)
        except BaseException:
            workspace.release(arena)
            raise
        if keep:
            return state, arena
        workspace.release(arena)
        return state

    if nworkers == 1:
        return [job(parts[0])]
    results, err = [], None
    with _SingleThreadedBlas() as single:
        if not single:  # same chunks, same order, one thread
            for p in parts:
                try:
                    results.append(job(p))
                except BaseException as e:
                    err = e
                    break
        else:
            ex = _get_executor(nworkers - 1)
            futs = [ex.submit(job, p) for p in parts[1:]]
            try:
                results.append(job(parts[0]))
            except BaseException as e:
                err = e
            for f in futs:  # wait for all before leaving the region
                try:
                    results.append(f.result())
                except BaseException as e:
                    err = err or e
    if err is not None:
        if keep:
            for _, arena in results:
                workspace.release(arena)
        raise err
    return results


def run_parallel_sum(chunks, nworkers, arena_bytes, work, init):
    """Run `work` over the chunks like :func:`run_parallel`, each worker accumulating into
    ``state["acc"]`` in its own arena; return the workers' sums added in worker order
    (a fixed order: deterministic for a given thread count) and release the arenas.  A
    single worker's ``acc`` outside its arena (a fresh array ``init`` made) is returned
    as it is."""
    states = run_parallel(chunks, nworkers, arena_bytes, work, init, keep=True)
    try:
        acc = states[0][0]["acc"]
        if len(states) == 1 and not np.may_share_memory(acc, states[0][1].buf):
            total = acc  # one worker summed into an array of its own: no copy out of the arena
        else:
            total = np.array(acc, copy=True)
        for st, _ in states[1:]:
            total += st["acc"]
    finally:
        for _, arena in states:
            workspace.release(arena)
    return total
