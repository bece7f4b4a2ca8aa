"""NumPy-backend specific tests: every fast path and chunking path against the
float64 reference, the workspace memory bound, inputs left untouched, fresh outputs.

Timings are never asserted here (see benchmarks/ for speed).
"""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import gpuconv
import gpuconv._cpu as nb
from gpuconv._cpu import dense, parallel, workspace
from gpuconv import reference as ref
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(autouse=True)
def _restore_workspace():
    old = nb.get_workspace_limit()
    yield
    nb.set_workspace_limit(old / (1 << 20))


@pytest.fixture(params=["1", "2"], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setenv("GPUCONV_NUM_THREADS", request.param)
    return int(request.param)


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    scale = max(np.linalg.norm(want), 1e-30)
    return np.linalg.norm(got - want) / scale


def _check_all(x, w, bias=None, dtype=np.float32, *, stride=1, padding=0, dilation=1, groups=1,
               rng=None):
    """Forward, input grad and weight grad of gpuconv (numpy backend) vs the reference."""
    rng = rng or np.random.default_rng(0)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    xd, wd = x.astype(dtype), w.astype(dtype)
    bd = None if bias is None else bias.astype(dtype)
    x64, w64 = xd.astype(np.float64), wd.astype(np.float64)
    b64 = None if bd is None else bd.astype(np.float64)
    tol = TOL[np.dtype(dtype).name]

    y = gpuconv.conv(xd, wd, bd, backend="numpy", **kw)
    y_ref = ref.conv(x64, w64, b64, **kw)
    assert y.shape == y_ref.shape and y.dtype == np.dtype(dtype)
    assert _rel_err(y, y_ref) <= tol, ("forward", _rel_err(y, y_ref))

    gy = _rand(rng, y_ref.shape, dtype)
    gy64 = gy.astype(np.float64)
    gx = gpuconv.conv_input_grad(gy, wd, x.shape, backend="numpy", **kw)
    gx_ref = ref.conv_input_grad(gy64, w64, x.shape, **kw)
    assert gx.shape == x.shape and gx.dtype == np.dtype(dtype)
    assert _rel_err(gx, gx_ref) <= tol, ("input_grad", _rel_err(gx, gx_ref))

    gw = gpuconv.conv_weight_grad(xd, gy, w.shape, backend="numpy", **kw)
    gw_ref = ref.conv_weight_grad(x64, gy64, w.shape, **kw)
    assert gw.shape == w.shape and gw.dtype == np.dtype(dtype)
    assert _rel_err(gw, gw_ref) <= tol, ("weight_grad", _rel_err(gw, gw_ref))


# ----------------------------------------------------------------------------- paths
CASES = {
    # name: (x shape, w shape, kwargs)
    "dense3x3": ((3, 5, 9, 8), (7, 5, 3, 3), dict(padding=1)),
    "1x1_direct": ((3, 6, 7, 5), (4, 6, 1, 1), dict()),
    "1x1_strided": ((2, 6, 9, 7), (5, 6, 1, 1), dict(stride=2)),
    "1x1_padded": ((2, 3, 4, 5), (4, 3, 1, 1), dict(padding=1)),
    "stem_like": ((2, 3, 17, 15), (4, 3, 7, 7), dict(stride=2, padding=3)),
    "strided3x3": ((2, 4, 11, 10), (6, 4, 3, 3), dict(stride=2, padding=1)),
    "stride_gt_kernel": ((2, 3, 11, 10), (4, 3, 2, 2), dict(stride=3)),
    "dilated": ((2, 3, 12, 11), (4, 3, 3, 2), dict(dilation=(2, 3), padding=2)),
    "asym_pad": ((2, 3, 8, 9), (5, 3, 3, 4), dict(padding=((0, 2), (3, 1)), stride=(1, 2))),
    "same": ((2, 3, 8, 7), (4, 3, 4, 3), dict(padding="same")),
    "grouped": ((2, 6, 8, 7), (9, 2, 3, 3), dict(groups=3, padding=1)),
    "depthwise": ((2, 5, 9, 8), (5, 1, 3, 3), dict(groups=5, padding=1)),
    "depthwise_mult2": ((2, 4, 9, 8), (8, 1, 3, 3), dict(groups=4, padding=1)),
    "depthwise_strided": ((2, 4, 11, 12), (4, 1, 3, 3), dict(groups=4, padding=1, stride=2)),
    "depthwise_7x7": ((2, 3, 10, 9), (3, 1, 7, 7), dict(groups=3, padding=3)),
    "depthwise_dil_asym": ((2, 3, 10, 9), (6, 1, 3, 2),
                           dict(groups=3, padding=((2, 0), (1, 2)), dilation=2)),
    "depthwise_nopad": ((2, 3, 8, 9), (3, 1, 3, 3), dict(groups=3)),
    # unequal strides: the generic windowed tap loop instead of the flat one
    "depthwise_mixed_stride": ((2, 3, 9, 10), (6, 1, 3, 3), dict(groups=3, padding=1,
                                                                 stride=(1, 2))),
    "depthwise_s3_dil2": ((2, 3, 13, 12), (3, 1, 3, 3), dict(groups=3, padding=2, stride=3,
                                                             dilation=2)),
    "depthwise_kernel_lt_stride": ((2, 3, 10, 9), (6, 1, 2, 2), dict(groups=3, stride=3,
                                                                      padding=1)),
    "depthwise_big_pad": ((2, 2, 5, 4), (2, 1, 3, 3), dict(groups=2, padding=4)),
    "tiny_image_batched": ((6, 8, 3, 3), (5, 8, 3, 3), dict(padding=1)),
    "conv1d": ((3, 4, 20), (5, 4, 5), dict(padding=2, stride=2)),
    "conv1d_dw": ((2, 4, 17), (4, 1, 3), dict(groups=4, padding=1, dilation=2)),
    "conv1d_1x1": ((3, 4, 11), (6, 4, 1), dict()),
    "conv3d": ((2, 3, 5, 6, 4), (4, 3, 3, 2, 3), dict(padding=1, stride=(1, 2, 1))),
    "conv3d_dw": ((2, 3, 5, 6, 5), (6, 1, 3, 3, 3), dict(groups=3, padding=1)),
    "conv3d_dw_strided": ((2, 3, 7, 6, 5), (3, 1, 3, 2, 3), dict(groups=3, padding=1, stride=2)),
    "conv1d_dw_strided": ((2, 4, 17), (8, 1, 4), dict(groups=4, padding=2, stride=3)),
    "conv3d_1x1": ((2, 3, 4, 3, 5), (2, 3, 1, 1, 1), dict()),
    "single_image": ((1, 4, 10, 9), (3, 4, 3, 3), dict(padding=1)),
    "out_1x1": ((2, 4, 3, 3), (3, 4, 3, 3), dict()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_paths_float32(name, threads):
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(1)
    K = ws[0]
    _check_all(_rand(rng, xs), _rand(rng, ws), _rand(rng, (K,)), np.float32, rng=rng, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_paths_tiny_workspace(name, threads):
    """A workspace of a few KiB forces row chunking (and one-image chunks) everywhere."""
    nb.set_workspace_limit(2 / 1024)  # 2 KiB
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(2)
    _check_all(_rand(rng, xs), _rand(rng, ws), _rand(rng, (ws[0],)), np.float32, rng=rng, **kw)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["dense3x3", "1x1_direct", "stem_like", "grouped", "depthwise",
                                  "depthwise_mult2", "conv1d", "conv3d", "tiny_image_batched"])
def test_paths_dtypes(name, dtype):
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(3)
    _check_all(_rand(rng, xs), _rand(rng, ws), _rand(rng, (ws[0],)), dt, rng=rng, **kw)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("name", ["stem_like", "depthwise_strided", "asym_pad"])
def test_dtypes_tiny_workspace(name, dtype):
    nb.set_workspace_limit(1 / 1024)
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(4)
    _check_all(_rand(rng, xs), _rand(rng, ws), None, np.dtype(dtype), rng=rng, **kw)


# ----------------------------------------------------------------------------- layouts
def _odd_layouts(a, rng):
    """Views of the same values with other layouts: Fortran order, negative strides,
    a strided slice of a larger buffer."""
    out = [np.asfortranarray(a)]
    flipped = np.ascontiguousarray(a[..., ::-1])[..., ::-1]  # values of a, last stride < 0
    out.append(flipped)
    big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    out.append(big[tuple(slice(None, None, 2) for _ in a.shape)])
    tr = np.ascontiguousarray(np.swapaxes(a, 0, 1)).swapaxes(0, 1)  # channel-major storage
    out.append(tr)
    return out


@pytest.mark.parametrize("name", ["dense3x3", "1x1_direct", "depthwise_mult2", "grouped",
                                  "conv1d_1x1"])
def test_noncontiguous_inputs_unmodified(name, threads):
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(5)
    x, w, b = _rand(rng, xs), _rand(rng, ws), _rand(rng, (ws[0],))
    y_ref = ref.conv(x, w, b, **kw)
    gy = _rand(rng, y_ref.shape)
    gx_ref = ref.conv_input_grad(gy, w, xs, **kw)
    gw_ref = ref.conv_weight_grad(x, gy, ws, **kw)
    for xv, wv, gyv in zip(_odd_layouts(x, rng), _odd_layouts(w, rng), _odd_layouts(gy, rng)):
        copies = [a.copy() for a in (xv, wv, gyv, b)]
        y = gpuconv.conv(xv, wv, b, backend="numpy", **kw)
        gx = gpuconv.conv_input_grad(gyv, wv, xs, backend="numpy", **kw)
        gw = gpuconv.conv_weight_grad(xv, gyv, ws, backend="numpy", **kw)
        assert _rel_err(y, y_ref) <= 1e-5
        assert _rel_err(gx, gx_ref) <= 1e-5
        assert _rel_err(gw, gw_ref) <= 1e-5
        for before, after in zip(copies, (xv, wv, gyv, b)):
            np.testing.assert_array_equal(before, after)
        for out in (y, gx, gw):
            assert out.flags.c_contiguous and out.flags.owndata or out.base is not None
            for inp in (xv, wv, gyv, b):
                assert not np.shares_memory(out, inp)


def test_outputs_fresh_and_independent():
    rng = np.random.default_rng(6)
    x, w = _rand(rng, (2, 4, 6, 6)), _rand(rng, (4, 4, 1, 1))
    y1 = gpuconv.conv(x, w, backend="numpy")
    y2 = gpuconv.conv(x, w, backend="numpy")
    assert not np.shares_memory(y1, y2) and not np.shares_memory(y1, x)
    y1[...] = np.nan  # results never alias the workspace: writing one leaves the other
    np.testing.assert_array_equal(y2, gpuconv.conv(x, w, backend="numpy"))


def test_deterministic(threads):
    rng = np.random.default_rng(7)
    x, gy = _rand(rng, (5, 6, 9, 9)), _rand(rng, (5, 8, 9, 9))
    nb.set_workspace_limit(0.01)
    a = gpuconv.conv_weight_grad(x, gy, (8, 6, 3, 3), padding=1, backend="numpy")
    b = gpuconv.conv_weight_grad(x, gy, (8, 6, 3, 3), padding=1, backend="numpy")
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- memory
def _peak_extra(fn):
    nb.clear_workspace_cache()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, out


@pytest.mark.parametrize("name,xs,ws,kw", [
    ("dense", (4, 16, 40, 40), (32, 16, 3, 3), dict(padding=1)),
    ("stem", (2, 3, 64, 64), (16, 3, 7, 7), dict(stride=2, padding=3)),
    ("dw", (3, 32, 40, 40), (32, 1, 3, 3), dict(padding=1, groups=32)),
    ("1x1", (4, 32, 30, 30), (64, 32, 1, 1), dict()),
])
@pytest.mark.parametrize("limit_mb", [0.25, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_bound(name, xs, ws, kw, limit_mb, dtype, threads):
    """Peak extra memory <= workspace + output (+ a cast copy of the weight, small slack)."""
    rng = np.random.default_rng(8)
    x, w = _rand(rng, xs, dtype), _rand(rng, ws, dtype)
    g = conv_geometry("t", xs, ws, dtype=np.dtype(dtype), **kw)
    gy = _rand(rng, g.y_shape, dtype)
    nb.set_workspace_limit(limit_mb)
    be = nb.NumpyBackend()
    limit = nb.get_workspace_limit()
    slack = 4 * math.prod(ws) * 3 + 64 * 1024
    it = np.dtype(dtype).itemsize
    for fn, out_elems in [
        (lambda: be.forward(x, w, None, g), math.prod(g.y_shape)),
        (lambda: be.input_grad(gy, w, g), math.prod(g.x_shape)),
        (lambda: be.weight_grad(x, gy, g), math.prod(g.w_shape)),
    ]:
        peak, _ = _peak_extra(fn)
        assert peak <= limit + out_elems * it + slack, (peak, limit, out_elems * it)


def test_workspace_cache_bounded():
    rng = np.random.default_rng(9)
    nb.set_workspace_limit(0.5)
    x, w = _rand(rng, (4, 16, 32, 32)), _rand(rng, (16, 16, 3, 3))
    gpuconv.conv(x, w, padding=1, backend="numpy")
    total = sum(a.nbytes for a in workspace._free_arenas)
    assert total <= nb.get_workspace_limit()
    nb.clear_workspace_cache()
    assert not workspace._free_arenas


def test_workspace_limit_validation():
    with pytest.raises(ValueError):
        nb.set_workspace_limit(0)
    with pytest.raises(ValueError):
        nb.set_workspace_limit(-3)


def test_blas_threads_restored(threads):
    libs = parallel._blas_controllers()
    before = [lc.num_threads for lc in libs]
    rng = np.random.default_rng(10)
    gpuconv.conv(_rand(rng, (4, 8, 16, 16)), _rand(rng, (8, 8, 3, 3)), padding=1, backend="numpy")
    assert [lc.num_threads for lc in libs] == before


def test_error_in_worker_propagates(monkeypatch):
    """An exception inside a worker reaches the caller, BLAS threads are restored."""
    monkeypatch.setenv("GPUCONV_NUM_THREADS", "2")
    libs = parallel._blas_controllers()
    before = [lc.num_threads for lc in libs]

    def boom(arena, state, c):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        parallel.run_parallel([1, 2, 3], 2, 1024, boom)
    assert [lc.num_threads for lc in libs] == before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_works_in_forked_child(monkeypatch):
    """The thread pool is rebuilt in a child process (threads do not survive fork)."""
    import multiprocessing as mp
    monkeypatch.setenv("GPUCONV_NUM_THREADS", "2")
    rng = np.random.default_rng(11)
    x, w = _rand(rng, (4, 4, 12, 12)), _rand(rng, (4, 4, 3, 3))
    want = gpuconv.conv(x, w, padding=1, backend="numpy")  # pool exists in the parent
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_conv, (x, w)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


def _child_conv(x, w):
    return gpuconv.conv(x, w, padding=1, backend="numpy")


@pytest.mark.parametrize("one_gemm,trans_min", [(0, 0), (0, 10 ** 9), (10 ** 9, 0)],
                         ids=["partials-transposed", "partials-direct", "one-gemm-transposed"])
@pytest.mark.parametrize("name", ["dense3x3", "1x1_direct", "grouped", "stem_like", "conv3d",
                                  "tiny_image_batched"])
def test_weight_grad_strategies(name, one_gemm, trans_min, monkeypatch, threads):
    """Every weight-gradient strategy (per-thread partial sums or one batched GEMM;
    gradient computed directly or transposed) on the small shapes."""
    monkeypatch.setattr(dense, "_WGRAD_ONE_GEMM_COLS", one_gemm)
    monkeypatch.setattr(dense, "_WGRAD_TRANS_MIN_COLS", trans_min)
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(12)
    x = _rand(rng, xs)
    g = conv_geometry("t", xs, ws, **kw)
    gy = _rand(rng, g.y_shape)
    gw = gpuconv.conv_weight_grad(x, gy, ws, backend="numpy", **kw)
    gw_ref = ref.conv_weight_grad(x, gy, ws, **kw)
    assert _rel_err(gw, gw_ref) <= 1e-5


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("workspace_kib", [None, 24, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_cropped_and_row_reversed_views(workspace_kib, kernel, n):
    """Views whose rows cannot merge (a crop of a larger array, a reversed row axis):
    whether BLAS can read them directly must be decided for whole images, not one
    row (a review found an arena overflow there)."""
    rng = np.random.default_rng(11)
    old = gpuconv.get_workspace_limit()
    if workspace_kib:
        gpuconv.set_workspace_limit(workspace_kib / 1024)
    try:
        x0 = rng.standard_normal((n, 4, 18, 19)).astype(np.float32)
        w = rng.standard_normal((8, 4, kernel, kernel)).astype(np.float32)
        x_views = [x0[:, :, 1:-1, 1:-2], np.ascontiguousarray(x0[:, :, ::-1])[:, :, ::-1]]
        assert all(not v.flags.c_contiguous for v in x_views)
        for x in x_views:
            g0 = rng.standard_normal((n, 8) + tuple(s - kernel + 3 for s in x.shape[2:]))
            g0 = g0.astype(np.float32)  # cast first: the views below must stay views
            gys = [g0[:, :, 1:-1, 1:-1],
                   np.ascontiguousarray(g0[:, :, 1:-1, 1:-1][:, :, ::-1])[:, :, ::-1]]
            assert all(not g.flags.c_contiguous for g in gys)
            for gy in gys:
                assert_close(gpuconv.conv(x, w), ref.conv(x, w), np.float32, "forward")
                assert_close(gpuconv.conv_input_grad(gy, w, x.shape),
                             ref.conv_input_grad(gy, w, x.shape), np.float32, "input grad")
                assert_close(gpuconv.conv_weight_grad(x, gy, w.shape),
                             ref.conv_weight_grad(x, gy, w.shape), np.float32, "weight grad")
    finally:
        gpuconv.set_workspace_limit(old / 2**20)


def test_calls_from_concurrent_user_threads_agree_bitwise():
    """Results do not depend on which user thread calls or on other concurrent calls
    (the backend's BLAS pinning may not take effect from a non-main thread: it then
    runs its chunks in the calling thread, same chunks, same order)."""
    import threading
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 33, 31)).astype(np.float32)
    w = rng.standard_normal((10, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((4, 10, 33, 31)).astype(np.float32)

    def run():
        return [gpuconv.conv(x, w, padding=1),
                gpuconv.conv_input_grad(gy, w, x.shape, padding=1),
                gpuconv.conv_weight_grad(x, gy, w.shape, padding=1)]

    results, errors = [], []

    def target():
        try:
            results.append(run())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert a.tobytes() == b.tobytes()
    want = [ref.conv(x, w, padding=1), ref.conv_input_grad(gy, w, x.shape, padding=1),
            ref.conv_weight_grad(x, gy, w.shape, padding=1)]
    for a, b, what in zip(results[0], want, ("forward", "input grad", "weight grad")):
        assert_close(a, b, np.float32, what)


# ----------------------------------------------------------------------------- large kernels
# One output row with the whole reduction exceeds the limit here: the passes split the
# reduction (channels x first- and second-dim taps); every temporary stays in the limit.
_LARGE = [
    ("31x31", (1, 4, 40, 40), (4, 4, 31, 31), dict(padding=15), 0.5),
    ("15x15-s2", (1, 4, 32, 32), (4, 4, 15, 15), dict(padding=7, stride=2), 0.25),
    ("7^3", (1, 4, 12, 12, 12), (4, 4, 7, 7, 7), dict(), 0.25),
    ("7^3-pad", (1, 4, 10, 10, 10), (4, 4, 7, 7, 7), dict(padding=3), 0.25),
    ("grouped", (1, 8, 32, 32), (8, 4, 15, 15), dict(padding=7, groups=2), 0.25),
]


@pytest.mark.parametrize("name,xs,ws,kw,limit_mb", _LARGE, ids=[c[0] for c in _LARGE])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_large_kernels_stay_within_the_workspace(name, xs, ws, kw, limit_mb, dtype, threads):
    rng = np.random.default_rng(11)
    x, w = _rand(rng, xs, dtype), _rand(rng, ws, dtype)
    g = conv_geometry("t", xs, ws, dtype=np.dtype(dtype), **kw)
    gy = _rand(rng, g.y_shape, dtype)
    be = nb.NumpyBackend()
    gpuconv.conv(x[:1, :1, :4], w[:1, :1, :1], backend="numpy")  # imports, outside the peak
    nb.set_workspace_limit(limit_mb)
    limit = nb.get_workspace_limit()
    it = np.dtype(dtype).itemsize
    slack = 64 * 1024 + math.prod(ws) * 4  # and one (cast) copy of the weight
    for what, fn, want, out_elems in [
        ("forward", lambda: be.forward(x, w, None, g), ref.conv(x, w, **kw), math.prod(g.y_shape)),
        ("input grad", lambda: be.input_grad(gy, w, g), ref.conv_input_grad(gy, w, xs, **kw),
         math.prod(g.x_shape)),
        # the weight gradient is computed in float32 before its one rounding: count that
        ("weight grad", lambda: be.weight_grad(x, gy, g), ref.conv_weight_grad(x, gy, ws, **kw),
         math.prod(g.w_shape) * (1 + 4 // it)),
    ]:
        peak, out = _peak_extra(fn)
        assert peak <= limit + out_elems * it + slack, (what, peak, limit, out_elems * it)
        assert_close(out, want, np.dtype(dtype), f"{name} {what}")


class _CountingMatmul:
    """The dense passes' GEMM (``parallel.matmul``), counting multiply-adds."""

    def __init__(self, matmul):
        import threading
        self._matmul, self.macs, self._lock = matmul, 0, threading.Lock()

    def __call__(self, a, b, out):
        n = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])) * \
            a.shape[-2] * a.shape[-1] * b.shape[-1]
        with self._lock:  # the workers count concurrently
            self.macs += n
        return self._matmul(a, b, out)


@pytest.mark.parametrize("limit_mb", [1.0, 256.0])
def test_large_kernel_input_grad_does_the_forward_work(monkeypatch, limit_mb, threads):
    """The stride-1 input gradient of a 31x31 kernel used to recompute every output row
    once per input row it touches (25x the forward's time); now it does the forward's
    multiply-adds (the GEMMs are counted, deterministic, instead of timed)."""
    rng = np.random.default_rng(12)
    xs, ws = (2, 8, 48, 48), (8, 8, 31, 31)
    x, w = _rand(rng, xs), _rand(rng, ws)
    g = conv_geometry("t", xs, ws, padding=15, dtype=np.dtype(np.float32))
    gy = _rand(rng, g.y_shape)
    nb.set_workspace_limit(limit_mb)
    be = nb.NumpyBackend()
    counter = _CountingMatmul(dense.matmul)
    monkeypatch.setattr(dense, "matmul", counter)
    be.forward(x, w, None, g)
    fwd, counter.macs = counter.macs, 0
    be.input_grad(gy, w, g)
    assert fwd == g.flops // 2
    assert counter.macs <= 1.05 * fwd, (counter.macs, fwd)
