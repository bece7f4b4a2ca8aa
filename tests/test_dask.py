"""Dask arrays: every pass against the float64 reference and the single-array NumPy
backend, on the threaded scheduler and on a real ``distributed.LocalCluster`` with
two worker processes; chunking rules, determinism, errors, laziness."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import gpuconv  # noqa: E402
from gpuconv import reference as ref  # noqa: E402
from gpuconv import testing as gt  # noqa: E402

from conftest import poisoned_numpy_allocations  # noqa: E402


# ----------------------------------------------------------------------------- cases
def _partition(rng, total, unit=1, small=True):
    """Random chunk sizes (multiples of `unit`) adding up to `total`; often with
    chunks of 1 (smaller than any halo) when `small`."""
    n = total // unit
    sizes, left = [], n
    while left:
        c = int(rng.integers(1, max(2, left // 2 + 2)))
        if small and rng.random() < 0.3:
            c = 1
        c = min(c, left)
        sizes.append(c * unit)
        left -= c
    return tuple(sizes)


def _padding(rng, nd, kernel, dilation):
    form = rng.choice(["int", "ints", "pairs", "same", "valid"])
    if form == "int":
        return int(rng.integers(0, 3))
    if form == "ints":
        return tuple(int(rng.integers(0, 3)) for _ in range(nd))
    if form == "pairs":  # asymmetric, sometimes wider than the kernel's reach
        return tuple((int(rng.integers(0, 4)), int(rng.integers(0, 4))) for _ in range(nd))
    return str(form)


def _case(seed):
    rng = np.random.default_rng(seed)
    nd = int(rng.integers(1, 4))
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        Cg, Kg = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        kernel = tuple(int(rng.integers(1, 4)) for _ in range(nd))
        stride = tuple(int(rng.integers(1, 4)) for _ in range(nd))
        dilation = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        padding = _padding(rng, nd, kernel, dilation)
        top = {1: 24, 2: 11, 3: 6}[nd]
        L = tuple(int(rng.integers(1, top)) for _ in range(nd))
        x_shape = (int(rng.integers(1, 4)), groups * Cg) + L
        w_shape = (groups * Kg, Cg) + kernel
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        try:
            y_shape = gpuconv.conv_output_shape(x_shape, w_shape, **kw)
        except ValueError:
            continue
        break
    x_chunks = (_partition(rng, x_shape[0]), _partition(rng, x_shape[1], Cg if groups > 1 else 1))
    x_chunks += tuple(_partition(rng, n) for n in L)
    y_chunks = (_partition(rng, y_shape[0]), _partition(rng, y_shape[1], Kg if groups > 1 else 1))
    y_chunks += tuple(_partition(rng, n) for n in y_shape[2:])
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    gy = rng.standard_normal(y_shape)
    return dict(x=x, w=w, b=b, gy=gy, kw=kw, x_chunks=x_chunks, y_chunks=y_chunks)


def _lazy_passes(c, dtype=np.float64):
    x = da.from_array(c["x"].astype(dtype), chunks=c["x_chunks"])
    gy = da.from_array(c["gy"].astype(dtype), chunks=c["y_chunks"])
    w, b, kw = c["w"].astype(dtype), c["b"].astype(dtype), c["kw"]
    return {
        "forward": gpuconv.conv(x, w, b, **kw),
        "input_grad": gpuconv.conv_input_grad(gy, w, c["x"].shape, **kw),
        "weight_grad": gpuconv.conv_weight_grad(x, gy, w.shape, **kw),
        "bias_grad": gpuconv.conv_bias_grad(gy),
    }


def _expected(c, dtype=np.float64):
    """(float64 reference, single-array NumPy backend result) for each pass."""
    x, w, b, gy, kw = c["x"], c["w"], c["b"], c["gy"], c["kw"]
    cast = [a.astype(dtype) for a in (x, w, b, gy)]
    xc, wc, bc, gyc = ([a.astype(np.float64) for a in cast])
    xd, wd, bd, gyd = cast
    return {
        "forward": (ref.conv(xc, wc, bc, **kw), gpuconv.conv(xd, wd, bd, backend="numpy", **kw)),
        "input_grad": (ref.conv_input_grad(gyc, wc, x.shape, **kw),
                       gpuconv.conv_input_grad(gyd, wd, x.shape, backend="numpy", **kw)),
        "weight_grad": (ref.conv_weight_grad(xc, gyc, w.shape, **kw),
                        gpuconv.conv_weight_grad(xd, gyd, w.shape, backend="numpy", **kw)),
        "bias_grad": (ref.conv_bias_grad(gyc), gpuconv.conv_bias_grad(gyd)),
    }


def _check(c, got, dtype=np.float64):
    exp = _expected(c, dtype)
    for name, arr in got.items():
        want_ref, want_np = exp[name]
        assert arr.shape == want_ref.shape and arr.dtype == np.dtype(dtype), (name, arr.shape)
        assert np.isfinite(arr.astype(np.float64)).all(), name
        gt.assert_close(arr, want_ref, dtype, f"dask {name} {c['kw']} chunks {c['x_chunks']}")
        # the single-array NumPy backend agrees within the same tolerance
        scale = max(float(np.abs(want_ref).max()), 1e-30)
        assert (np.abs(arr.astype(np.float64) - want_np.astype(np.float64)).max() / scale
                <= 2 * gt.tolerance(dtype)), name


def _check_chunks(c, got):
    """The documented result chunks: batch chunks kept; spatial boundaries on the stride."""
    y, gx = got["forward"], got["input_grad"]
    s = c["kw"]["stride"]
    assert y.chunks[0] == c["x_chunks"][0] and gx.chunks[0] == c["y_chunks"][0]
    for i, st in enumerate(s):
        gx_bounds = np.cumsum(gx.chunks[2 + i])[:-1]
        assert all(b % st == 0 for b in gx_bounds), (gx.chunks, s)
    assert got["weight_grad"].shape == c["w"].shape


# ----------------------------------------------------------------------------- threaded
@pytest.mark.parametrize("seed", range(40))
def test_random_geometry_threaded(seed):
    c = _case(seed)
    lazy = _lazy_passes(c)
    _check_chunks(c, lazy)
    with dask.config.set(scheduler="threads"), poisoned_numpy_allocations():
        got = dict(zip(lazy, dask.compute(*lazy.values())))
    _check(c, got)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", [3, 11])
def test_dtypes_threaded(seed, dtype):
    if dtype == "bfloat16":
        ml = pytest.importorskip("ml_dtypes")
        dtype = ml.bfloat16
    c = _case(seed)
    lazy = _lazy_passes(c, dtype)
    with dask.config.set(scheduler="threads"):
        got = dict(zip(lazy, dask.compute(*lazy.values())))
    _check(c, got, dtype)


@pytest.mark.parametrize("seed", range(8))
def test_conv_transpose_random(seed):
    rng = np.random.default_rng(100 + seed)
    nd = 1 + seed % 3
    while True:
        groups = int(rng.choice([1, 2]))
        Cin, Coutg = groups * int(rng.integers(1, 3)), int(rng.integers(1, 3))
        k = tuple(int(v) for v in rng.integers(1, 4, nd))
        s = tuple(int(v) for v in rng.integers(1, 4, nd))
        d = tuple(int(v) for v in rng.integers(1, 3, nd))
        pad = tuple((int(rng.integers(0, 2)), int(rng.integers(0, 2))) for _ in range(nd))
        opad = tuple(int(rng.integers(0, max(a, b))) for a, b in zip(s, d))
        L = tuple(int(v) for v in rng.integers(2, {1: 12, 2: 7, 3: 4}[nd], nd))
        kw = dict(stride=s, padding=pad, output_padding=opad, dilation=d, groups=groups)
        try:
            gpuconv.conv_transpose_output_shape((2, Cin) + L, (Cin, Coutg) + k, **kw)
        except ValueError:
            continue
        break
    x = rng.standard_normal((2, Cin) + L)
    w = rng.standard_normal((Cin, Coutg) + k)
    b = rng.standard_normal(Coutg * groups)
    want = gpuconv.conv_transpose(x, w, b, backend="numpy", **kw)
    chunks = (1, _partition(rng, Cin, Cin // groups)) + tuple(_partition(rng, n) for n in L)
    xd = da.from_array(x, chunks=chunks)
    y, y0 = gpuconv.conv_transpose(xd, w, b, **kw), gpuconv.conv_transpose(xd, w, **kw)
    assert isinstance(y, da.Array)
    with dask.config.set(scheduler="threads"):
        got, got0 = dask.compute(y, y0)
    # adjoint identity with the float64 reference forward: <T(x), z> = <x, conv(z)[:L]>
    z = rng.standard_normal(got0.shape)
    fz = ref.conv(z, w, stride=s, padding=pad, dilation=d, groups=groups)
    fz = fz[(slice(None), slice(None)) + tuple(slice(0, n) for n in L)]
    lhs, rhs = float((got0 * z).sum()), float((x * fz).sum())
    assert abs(lhs - rhs) <= 1e-11 * (np.abs(got0).sum() * np.abs(z).max() + 1)
    np.testing.assert_allclose(got, got0 + b.reshape((1, -1) + (1,) * nd), rtol=0, atol=1e-12)
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    # its gradients on Dask: the forward of the matching convolution (cropped to L) and
    # that convolution's weight gradient (x zero-extended), against the reference
    gy = rng.standard_normal(got0.shape)
    gyd = da.from_array(gy, chunks=(1, 1) + tuple(_partition(rng, n) for n in gy.shape[2:]))
    tk = dict(kw)
    tk.pop("output_padding")
    gx = gpuconv.conv_transpose_input_grad(gyd, w, x.shape, **kw)
    gw = gpuconv.conv_transpose_weight_grad(xd, gyd, w.shape, **kw)
    assert isinstance(gx, da.Array) and isinstance(gw, da.Array)
    with dask.config.set(scheduler="threads"):
        gx, gw = dask.compute(gx, gw)
    box = (slice(None), slice(None)) + tuple(slice(0, n) for n in L)
    gt.assert_close(gx, ref.conv(gy, w, **tk)[box], np.float64, "conv_transpose_input_grad")
    ext = ref.conv(gy, w, **tk).shape[2:]
    x_ext = np.zeros(x.shape[:2] + ext)
    x_ext[box] = x
    gt.assert_close(gw, ref.conv_weight_grad(gy, x_ext, w.shape, **tk), np.float64,
                    "conv_transpose_weight_grad")


def test_rank_specific_seed_forms():
    """Unbatched x and the shared-kernel weight form through the rank wrappers."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 11, 9))           # unbatched (C, H, W)
    ws = rng.standard_normal((2, 3, 2))           # shared kernels (K, kh, kw)
    xd = da.from_array(x, chunks=(2, 4, 3))
    kw = dict(stride=(2, 1), padding=((1, 0), (2, 1)))
    full = np.broadcast_to(ws[:, None], (2, 3, 3, 2))
    with dask.config.set(scheduler="threads"):
        y = gpuconv.conv2d(xd, ws, **kw)
        assert isinstance(y, da.Array) and y.ndim == 3
        yv = y.compute()
        gt.assert_close(yv, ref.conv(x[None], full, **kw)[0], np.float64, "conv2d shared")
        gy = rng.standard_normal(yv.shape)
        gx = gpuconv.conv2d_input_grad(da.from_array(gy, chunks=(1, 3, 4)), ws, x.shape, **kw)
        gt.assert_close(gx.compute(), ref.conv_input_grad(gy[None], full, (1,) + x.shape,
                                                          **kw)[0], np.float64, "input grad")
        gw = gpuconv.conv2d_weight_grad(xd, da.from_array(gy, chunks=(2, 2, 5)), ws.shape, **kw)
        gt.assert_close(gw.compute(), ref.conv_weight_grad(x[None], gy[None], full.shape,
                                                           **kw).sum(axis=1), np.float64, "wgrad")
        w1 = ws[:, :, 0]                          # shared 1-d kernels (K, k)
        y1 = gpuconv.conv1d(da.from_array(x[:, :, 0], chunks=(1, 3)), w1, padding="same")
        gt.assert_close(y1.compute(), ref.conv(x[None, :, :, 0], np.repeat(w1[:, None], 3, 1),
                                               padding="same")[0], np.float64, "conv1d")


# ----------------------------------------------------------------------------- chunk rules
def test_output_chunks_documented_rule():
    x = da.zeros((2, 3, 20, 10), chunks=(1, 3, (5, 5, 7, 3), 10))
    w = np.ones((4, 3, 3, 3))
    # stride 2, padding 1: input boundaries 5, 10, 17 move down to 4, 10, 16 (multiples of
    # 2), then the last chunk (20 - 16 = 4) is kept: output chunks 2, 3, 3, 2
    y = gpuconv.conv(x, w, stride=2, padding=1)
    assert y.chunks == ((1, 1), (4,), (2, 3, 3, 2), (5,))
    # stride 1, 'same': output chunks are the input chunks (3 >= the halo of 1)
    assert gpuconv.conv(x, w, padding="same").chunks[2:] == ((5, 5, 7, 3), (10,))
    # asymmetric padding (2, 0) keeps the size: halo of 2 on the left, none on the right
    xa = da.from_array(np.random.default_rng(0).standard_normal((1, 3, 20, 10)),
                       chunks=(1, 3, (5, 5, 7, 3), (4, 6)))
    ya = gpuconv.conv(xa, w, padding=((2, 0), (0, 2)))
    assert ya.chunks[2:] == ((5, 5, 7, 3), (4, 6))
    with dask.config.set(scheduler="threads"):
        gt.assert_close(ya.compute(), ref.conv(xa.compute(), w, padding=((2, 0), (0, 2))),
                        np.float64, "asymmetric padding")
    # chunks smaller than the halo (here 2 on each side) are merged with the chunks that
    # follow them until they reach it; a short last chunk goes into the one before
    x1 = da.zeros((1, 1, 12), chunks=(1, 1, (4, 1, 1, 5, 1)))
    y1 = gpuconv.conv(x1, np.ones((1, 1, 5)), padding=2)
    assert y1.chunks[2] == (4, 2, 6)
    # input gradient: result boundaries are stride * grad_out boundaries
    gy = da.zeros((2, 4, 10, 5), chunks=(2, 2, (3, 3, 4), 5))
    gx = gpuconv.conv_input_grad(gy, w, (2, 3, 20, 10), stride=2, padding=1)
    assert gx.chunks == ((2,), (3,), (6, 6, 8), (10,))


def test_zero_size_chunks():
    rng = np.random.default_rng(0)
    x, w, gy = (rng.standard_normal(s) for s in ((3, 4, 12), (2, 4, 3), (3, 2, 12)))
    xd = da.from_array(x, chunks=((1, 0, 2), (2, 0, 2), (5, 0, 7)))
    gyd = da.from_array(gy, chunks=((0, 3), (1, 0, 1), (4, 0, 8)))
    with dask.config.set(scheduler="threads"):
        gt.assert_close(gpuconv.conv(xd, w, padding=1).compute(), ref.conv(x, w, padding=1),
                        np.float64, "forward")
        gt.assert_close(gpuconv.conv_input_grad(gyd, w, x.shape, padding=1).compute(),
                        ref.conv_input_grad(gy, w, x.shape, padding=1), np.float64, "igrad")
        gt.assert_close(gpuconv.conv_weight_grad(xd, gyd, w.shape, padding=1).compute(),
                        ref.conv_weight_grad(x, gy, w.shape, padding=1), np.float64, "wgrad")


def test_grouped_chunks_and_channel_chunks():
    x = da.zeros((1, 6, 8), chunks=(1, (2, 4), 8))
    w = np.ones((9, 2, 3))
    y = gpuconv.conv(x, w, groups=3)           # whole groups of 2 channels per chunk
    assert y.chunks[1] == (3, 6)
    y1 = gpuconv.conv(x, np.ones((5, 6, 3)))   # groups=1: channel chunks summed, one chunk
    assert y1.chunks[1] == (5,)
    # weight gradient chunks follow the channel chunks
    x2 = da.ones((1, 4, 8), chunks=(1, 2, 8))
    gw = gpuconv.conv_weight_grad(x2, da.ones((1, 6, 6), chunks=(1, (2, 4), 6)), (6, 4, 3))
    assert gw.chunks == ((2, 4), (2, 2), (3,))
    gw = gpuconv.conv_weight_grad(x2, da.ones((1, 6, 6), chunks=(1, 1, 6)), (6, 2, 3), groups=2)
    assert gw.chunks == ((3, 3), (2,), (3,))


def test_chunks_run_on_the_backend_chosen(monkeypatch):
    """By chunk type (NumPy chunks: the numpy backend), or as forced with backend=: here
    the CUDA kernels on the emulator, chunk by chunk."""
    from conftest import backend_status
    from gpuconv import _dispatch
    used = []
    real = _dispatch._instance
    monkeypatch.setattr(_dispatch, "_instance", lambda name: used.append(name) or real(name))
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 2, 9, 7)), rng.standard_normal((3, 2, 3, 3))
    xd = da.from_array(x, chunks=(1, 1, 4, 3))
    kw = dict(stride=(2, 1), padding=((1, 0), 1))
    with dask.config.set(scheduler="threads"):
        gt.assert_close(gpuconv.conv(xd, w, **kw).compute(), ref.conv(x, w, **kw), np.float64,
                        "by chunk type")
        assert set(used) == {"numpy"} and len(used) > 4
        ok, reason = backend_status("cudasim")
        if not ok:
            pytest.skip(f"cudasim not usable: {reason}")
        used.clear()
        gt.assert_close(gpuconv.conv(xd, w, backend="cudasim", **kw).compute(),
                        ref.conv(x, w, **kw), np.float64, "forced cudasim")
        assert set(used) == {"cudasim"} and len(used) > 4


def test_lazy_and_chunk_kind_result():
    calls = []

    def boom(b):
        calls.append(1)
        raise RuntimeError("computed too early")

    x = da.ones((1, 2, 16), chunks=(1, 1, 4)).map_blocks(boom, dtype=np.float64,
                                                         meta=np.empty((0, 0, 0)))
    y = gpuconv.conv(x, np.ones((3, 2, 3)), padding=1)
    gw = gpuconv.conv_weight_grad(x, da.ones((1, 3, 16), chunks=4), (3, 2, 3), padding=1)
    assert isinstance(y, da.Array) and isinstance(gw, da.Array) and not calls
    assert type(y._meta) is np.ndarray


def test_import_gpuconv_does_not_import_dask():
    code = ("import sys, numpy as np, gpuconv; "
            "gpuconv.conv(np.ones((1, 1, 5)), np.ones((1, 1, 3))); "
            "print(any(m == 'dask' or m.startswith(('dask.', 'distributed')) "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- determinism
def test_fixed_order_reductions_bit_identical_threaded():
    rng = np.random.default_rng(5)
    x = da.from_array(rng.standard_normal((4, 6, 30, 20)).astype(np.float32),
                      chunks=(1, 2, 7, 6))
    gy = da.from_array(rng.standard_normal((4, 5, 30, 20)).astype(np.float32),
                       chunks=(2, 5, 9, 5))
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    outs = []
    for _ in range(3):
        with dask.config.set(scheduler="threads", num_workers=2):
            outs.append(dask.compute(gpuconv.conv_weight_grad(x, gy, w.shape, padding=1),
                                     gpuconv.conv_bias_grad(gy),
                                     gpuconv.conv(x, w, padding=1)))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- errors
def test_error_multi_chunk_weight():
    x = da.ones((1, 2, 10), chunks=5)
    w = da.ones((4, 2, 3), chunks=(2, 2, 3))
    with pytest.raises(ValueError, match=r"weight.chunks=\(\(2, 2\), \(2,\), \(3,\)\).*"
                                         r"rechunk\(-1\)"):
        gpuconv.conv(x, w)
    with pytest.raises(ValueError, match=r"bias.chunks"):
        gpuconv.conv(x, w.rechunk(-1), da.ones(4, chunks=2))
    y = gpuconv.conv(x, w.rechunk(-1), da.ones(4, chunks=4))   # one chunk: fine
    np.testing.assert_allclose(y.compute(), gpuconv.conv(np.ones((1, 2, 10)), np.ones((4, 2, 3)),
                                                         np.ones(4)))


def test_error_group_split_names_chunks():
    x = da.ones((1, 6, 8), chunks=(1, (3, 3), 8))
    with pytest.raises(ValueError, match=r"x.chunks\[1\]=\(3, 3\).*groups=3.*2 channels"):
        gpuconv.conv(x, np.ones((3, 2, 3)), groups=3)
    gy = da.ones((1, 6, 6), chunks=(1, (1, 5), 6))
    with pytest.raises(ValueError, match=r"grad_out.chunks\[1\]=\(1, 5\).*groups=3"):
        gpuconv.conv_input_grad(gy, np.ones((6, 2, 3)), (1, 6, 8), groups=3)
    with pytest.raises(ValueError, match=r"x.chunks\[1\]=\(3, 3\)"):
        gpuconv.conv_weight_grad(x, da.ones((1, 6, 6), chunks=2), (6, 2, 3), groups=3)


def test_error_chunk_types():
    x = da.from_array(np.ma.masked_array(np.ones((1, 1, 8))), chunks=4)
    with pytest.raises(TypeError, match=r"MaskedArray chunks"):
        gpuconv.conv(x, np.ones((1, 1, 3)))
    x = da.ones((1, 1, 8), chunks=4)
    with pytest.raises(TypeError, match=r"weight"):
        gpuconv.conv(x, [[[1.0, 2.0]]])
    with pytest.raises(TypeError, match=r"backend 'cupy'.*numpy"):  # raised before any compute
        gpuconv.conv(x, np.ones((1, 1, 3)), backend="cupy")
    xq = da.ones(8, chunks=4)
    xq = xq[xq > 0][None, None]  # unknown chunk sizes: no geometry can be derived
    with pytest.raises(ValueError, match=r"x has unknown chunk sizes.*compute_chunk_sizes"):
        gpuconv.conv(xq, np.ones((1, 1, 3)))


# ----------------------------------------------------------------------------- LocalCluster
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    cl = distributed.Client(cluster)
    try:
        yield cl
    finally:
        cl.close()
        cluster.close()


@pytest.mark.parametrize("seed", [1, 4, 13, 21])
def test_random_geometry_local_cluster(client, seed):
    c = _case(seed)
    lazy = _lazy_passes(c)
    futures = client.compute(list(lazy.values()))
    got = dict(zip(lazy, client.gather(futures)))
    _check(c, got)


def test_local_cluster_two_processes_and_bit_identical(client):
    info = client.scheduler_info()
    assert len(info["workers"]) == 2
    pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert len(pids) == 2
    rng = np.random.default_rng(8)
    x = da.from_array(rng.standard_normal((2, 4, 10, 9, 8)).astype(np.float32),
                      chunks=(1, 2, 5, 5, 4))
    gy = da.from_array(rng.standard_normal((2, 3, 5, 9, 8)).astype(np.float32),
                       chunks=(1, 3, 3, 4, 4))
    kw = dict(stride=(2, 1, 1), padding=((1, 0), 1, (2, 0)))
    w_shape = (3, 4, 2, 3, 3)
    runs = [client.compute(gpuconv.conv_weight_grad(x, gy, w_shape, **kw)).result()
            for _ in range(2)]
    with dask.config.set(scheduler="threads"):
        runs.append(gpuconv.conv_weight_grad(x, gy, w_shape, **kw).compute())
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()
    exp = ref.conv_weight_grad(x.compute().astype(np.float64), gy.compute().astype(np.float64),
                               w_shape, **kw)
    gt.assert_close(runs[0], exp, np.float32, "weight grad on the cluster")


# ----------------------------------------------------------------------------- CuPy chunks
@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 5, 17])
def test_random_geometry_cupy_chunks(seed):
    cp = pytest.importorskip("cupy")
    c = _case(seed)
    x = da.from_array(cp.asarray(c["x"]), chunks=c["x_chunks"], asarray=False)
    gy = da.from_array(cp.asarray(c["gy"]), chunks=c["y_chunks"], asarray=False)
    w, b, kw = cp.asarray(c["w"]), cp.asarray(c["b"]), c["kw"]
    lazy = {"forward": gpuconv.conv(x, w, b, **kw),
            "input_grad": gpuconv.conv_input_grad(gy, w, c["x"].shape, **kw),
            "weight_grad": gpuconv.conv_weight_grad(x, gy, w.shape, **kw),
            "bias_grad": gpuconv.conv_bias_grad(gy)}
    assert all(isinstance(v._meta, cp.ndarray) for v in lazy.values())
    try:
        from dask_cuda import LocalCUDACluster
        from distributed import Client
    except ImportError:
        with dask.config.set(scheduler="threads"):
            vals = dask.compute(*lazy.values())
    else:
        with LocalCUDACluster() as cluster, Client(cluster) as cl:
            vals = cl.gather(cl.compute(list(lazy.values())))
    got = {k: cp.asnumpy(v) for k, v in zip(lazy, vals)}
    _check(c, got)


# ----------------------------------------------------------------------------- docs, packaging
def test_readme_dask_example_runs(capsys):
    """The README's cluster example, run as a script would (it starts its own cluster)."""
    pytest.importorskip("distributed")
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sec = text[text.index("## Dask arrays"):]
    block = re.search(r"```py\n(.*?)```", sec, flags=re.S).group(1)
    import warnings
    with warnings.catch_warnings():  # e.g. "Port 8787 is already in use" (the dashboard)
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md dask example", "exec"), {"__name__": "__main__"})
    assert "(8, 1, 3, 3, 3)" in capsys.readouterr().out


def test_dask_extra_declared():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    extra = meta["project"]["optional-dependencies"]["dask"]
    assert any(e.startswith("dask[array]") for e in extra)
    assert any(e.startswith("distributed") for e in extra)
    assert "dask]" in (root / ".ci" / "run").read_text().split("pip install -q -e")[1].split("\n")[0]
