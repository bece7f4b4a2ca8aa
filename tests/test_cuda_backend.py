"""Every CUDA kernel entry point, for every dtype and both index widths, run through
the emulator (cudasim) under every thread schedule, against the float64 reference.

The CUDA backend's own launch code runs unchanged on the emulated runtime; the
algorithm (direct / tiled implicit GEMM) and the index width are forced through
GPUCONV_CUDA_ALGO / GPUCONV_CUDA_INDEX so that each entry point is reached on
small data.
"""
import numpy as np
import pytest

from gpuconv._runtimes import limits as K
from gpuconv import reference as ref
from gpuconv._cuda.plans import use_tiled
from gpuconv._geometry import dgrad_as_forward
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from conftest import np_dtype

DTYPES = ["float16", "bfloat16", "float32", "float64"]


# geometries small enough for the emulator, each with an awkward feature
CASES = {
    "2d-grouped-pad": ((2, 4, 7, 6), (10, 2, 3, 3), dict(stride=1, padding=((1, 0), (2, 1)), groups=2)),
    "1d-stride-dil": ((2, 3, 11), (9, 3, 3), dict(stride=2, padding=2, dilation=2)),
    "3d-mixed": ((1, 2, 4, 5, 3), (9, 2, 2, 3, 1), dict(stride=(1, 2, 1), padding=1)),
    "2d-depthwise-x2": ((2, 3, 6, 5), (6, 1, 3, 3), dict(stride=(2, 1), padding="same", groups=3)),
    "2d-5x5-taps>16": ((2, 3, 7, 9), (9, 3, 5, 5), dict(stride=1, padding=(2, 1), dilation=(1, 2))),
    "2d-1x1": ((3, 20, 3, 5), (17, 20, 1, 1), dict()),
}


def _data(g, dtype, seed):
    rng = np.random.default_rng(seed)
    mk = lambda shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    return mk(g.x_shape), mk(g.w_shape), mk((g.K,)), mk(g.y_shape)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warp"])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("algo", ["direct", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", ["full", "3"])
def test_every_entry_point_every_schedule(sim_backend, monkeypatch, dtype, algo, index, schedule,
                                          cap):
    """cap=3: grid-stride kernels get at most 3 blocks, so their loops run many passes
    (on a GPU that happens past 524,280 blocks' worth of work)."""
    be = sim_backend
    dt = np_dtype(dtype)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    monkeypatch.setattr(be.rt, "max_blocks_1d", 3 if cap == "3" else K.MAX_BLOCKS_1D,
                        raising=False)
    monkeypatch.setenv("GPUCONV_CUDA_INDEX", index)
    be.called.clear()
    for i, (name, (xs, ws, kw)) in enumerate(CASES.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        x, w, b, gy = _data(g, dt, i)
        saved = [a.copy() for a in (x, w, b, gy)]
        with be.rt.schedule(schedule, seed=7 + i):
            y = be.forward(x, w, b, g)
            gx = be.input_grad(gy, w, g)
            gw = be.weight_grad(x, gy, g)
        assert y.dtype == dt and gx.dtype == dt and gw.dtype == dt
        assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} forward")
        assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} input grad")
        assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} weight grad")
        for a, s in zip((x, w, b, gy), saved):  # inputs never modified
            assert np.array_equal(a.view(np.uint8), s.view(np.uint8))
    suf = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}[dtype]
    i = "i64" if index == "64" else "i32"
    want = {f"gpuconv_wgrad_reduce_{suf}"}
    if algo == "tiled":
        want |= {f"gpuconv_fwdtile_{suf}_{i}", f"gpuconv_wgradtile_{suf}_{i}"}
    else:
        want |= {f"gpuconv_fwd_{suf}_{i}", f"gpuconv_dgrad_{suf}_{i}", f"gpuconv_wgrad_{suf}_{i}"}
    assert want <= set(be.called), sorted(set(be.called))


def test_algorithm_choice():
    dense = conv_geometry("t", (8, 64, 14, 14), (64, 64, 3, 3), padding=1)
    dw = conv_geometry("t", (8, 64, 14, 14), (64, 1, 3, 3), padding=1, groups=64)
    assert use_tiled(dense) and not use_tiled(dw)
    assert dgrad_as_forward(dense) is not None
    assert dgrad_as_forward(conv_geometry("t", (1, 4, 9, 9), (4, 4, 3, 3), stride=2)) is None
    # padding beyond the kernel's reach would need negative padding: direct kernel
    assert dgrad_as_forward(conv_geometry("t", (1, 4, 9, 9), (4, 4, 3, 3), padding=3)) is None


def test_weight_grad_is_bit_identical_across_schedules(sim_backend, monkeypatch):
    """Determinism: the reduction order is fixed, whatever order threads run in."""
    be = sim_backend
    g = conv_geometry("t", (3, 6, 9, 8), (12, 6, 3, 3), padding=1, dtype=np.float32)
    x, w, b, gy = _data(g, np.float32, 3)
    for algo in ("direct", "tiled"):
        monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
        outs = []
        for sched in ("forward", "reverse", "random", "warp"):
            with be.rt.schedule(sched, seed=11):
                outs.append(be.weight_grad(x, gy, g))
                outs.append(be.input_grad(gy, w, g))
        for a in outs[2::2]:
            assert np.array_equal(a.view(np.uint32), outs[0].view(np.uint32))
        for a in outs[3::2]:
            assert np.array_equal(a.view(np.uint32), outs[1].view(np.uint32))


def test_weight_grad_with_many_splits(sim_backend, monkeypatch):
    """Enough positions that the split reduction really splits (several partial rows)."""
    from gpuconv._cuda.plans import split_reduction, wgrad_plan
    be = sim_backend
    g = conv_geometry("t", (4, 2, 40, 40), (8, 2, 3, 3), padding=1, dtype=np.float64)
    red = g.N * 40 * 40
    assert wgrad_plan(8 * 2 * 9, red)[1] > 1 and split_reduction(1, red, 1024, 256, 16)[0] > 1
    x, w, b, gy = _data(g, np.float64, 5)
    want = ref.conv_weight_grad(x, gy, g.w_shape, padding=1)
    for algo in ("direct", "tiled"):
        monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
        assert_close(be.weight_grad(x, gy, g), want, np.float64, f"{algo} split wgrad")


# ----------------------------------------------------------------------------- random geometry
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def _geometry(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    C = groups * draw(st.integers(1, 4))
    K = groups * draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
    size = {1: 9, 2: 6, 3: 4}[nd]
    spatial = tuple(max(draw(st.integers(1, size)), d * (k - 1) + 1 - lo - hi)
                    for d, k, (lo, hi) in zip(dilation, kernel, pads))
    N = draw(st.integers(1, 2))
    return (N, C) + spatial, (K, C // groups) + kernel, dict(
        stride=stride, dilation=dilation, padding=pads, groups=groups)


@pytest.mark.parametrize("algo", ["direct", "tiled"])
def test_random_geometry_both_algorithms(sim_backend, algo):
    """Random 1-3-d geometry (groups, stride, dilation, asymmetric padding) through each
    CUDA algorithm -- including the tiled input gradient as a flipped forward -- in
    float64 against the reference."""
    be = sim_backend
    import os

    @settings(max_examples=30, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_geometry(), st.integers(0, 2**31 - 1))
    def check(geom, seed):
        xs, ws, kw = geom
        g = conv_geometry("t", xs, ws, dtype=np.float64, **kw)
        x, w, b, gy = _data(g, np.float64, seed)
        old = os.environ.get("GPUCONV_CUDA_ALGO")
        os.environ["GPUCONV_CUDA_ALGO"] = algo
        try:
            got = (be.forward(x, w, b, g), be.input_grad(gy, w, g), be.weight_grad(x, gy, g))
        finally:
            if old is None:
                os.environ.pop("GPUCONV_CUDA_ALGO")
            else:
                os.environ["GPUCONV_CUDA_ALGO"] = old
        want = (ref.conv(x, w, b, **kw), ref.conv_input_grad(gy, w, xs, **kw),
                ref.conv_weight_grad(x, gy, ws, **kw))
        for a, e, what in zip(got, want, ("forward", "input grad", "weight grad")):
            assert_close(a, e, np.float64, f"{algo} {what} {xs} {ws} {kw}")

    check()
