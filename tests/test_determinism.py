"""CPU determinism: the same bits from any calling thread (issue 9 item 4).

The numpy backend runs its chunks on worker threads with single-threaded BLAS.
OpenBLAS (0.3.31) ignores ``openblas_set_num_threads`` coming from a thread other
than the one that first used it, so a call from a ``threading.Thread`` used to run a
differently partitioned multi-threaded sgemm: other bits.  The layer here is large
enough that BLAS's partition changes float32 bits (checked first, so the test can
bite), and the test runs under the environment's OPENBLAS settings as CI has them.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import gpuconv
from gpuconv._cpu.parallel import get_num_threads

threadpoolctl = pytest.importorskip("threadpoolctl")


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["r"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["r"]


def test_float32_bits_do_not_depend_on_the_calling_thread():
    if get_num_threads() < 2:
        pytest.skip("one worker thread here: no partition to differ")
    rng = np.random.default_rng(3)
    # GEMM (64 x 2000) @ (2000 x 3000) per image: OpenBLAS's 2-thread sgemm of this
    # size gives other bits than its 1-thread one
    x = rng.standard_normal((2, 80, 60, 50)).astype(np.float32)
    w = rng.standard_normal((64, 80, 5, 5)).astype(np.float32)
    a = rng.standard_normal((64, 2000)).astype(np.float32)
    b = rng.standard_normal((2000, 3000)).astype(np.float32)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        one = a @ b
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        two = a @ b
    if np.array_equal(one, two):
        pytest.skip("this BLAS gives the same bits with 1 and 2 threads: the test cannot bite")
    np.dot(a, b)  # the main thread has used BLAS (the case OpenBLAS treats differently)
    y = gpuconv.conv(x, w, padding=2, backend="numpy")
    gy = rng.standard_normal(y.shape).astype(np.float32)
    calls = {
        "conv": lambda: gpuconv.conv(x, w, padding=2, backend="numpy"),
        "input grad": lambda: gpuconv.conv_input_grad(gy, w, x.shape, padding=2, backend="numpy"),
        "weight grad": lambda: gpuconv.conv_weight_grad(x, gy, w.shape, padding=2,
                                                        backend="numpy"),
    }
    for name, fn in calls.items():
        main = fn()
        other = _in_thread(fn)
        assert np.array_equal(main, other), (
            f"{name}: a call from a threading.Thread gave other bits than from the main thread "
            f"(max diff {np.abs(main.astype(np.float64) - other).max():.3g})")
        assert np.array_equal(main, fn())  # and run to run
