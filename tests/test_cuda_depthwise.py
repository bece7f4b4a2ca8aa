"""The depthwise family of the CUDA backend (kernels/depthwise.cu) on the emulator.

Every depthwise entry point, for every dtype and both index widths, under every
thread schedule and with the 3-block grid cap, against the float64 reference on
awkward depthwise-like geometries (stride phases, dilation, asymmetric padding,
padding beyond the kernel's reach, channel multipliers, small groups, 1-3-D, rows
whose starts are 16-byte aligned so the vector loads run, several tiles per plane,
several planes per block).  Also: the selection rule, plan caching, determinism of
the weight gradient, and random geometry.
"""
import os

import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._cuda import depthwise as dw
from gpuconv._geometry import conv_geometry, dgrad_as_forward
from gpuconv._runtimes import limits as L
from gpuconv.testing import assert_close

from conftest import np_dtype

DTYPES = ["float16", "bfloat16", "float32", "float64"]
SUF = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


# each case: (x shape, w shape, kwargs), depthwise-like (groups > 1, C/G <= 4, K/G <= 8)
CASES = {
    # MobileNet-like stride 2 'same' (asymmetric), H != W; dgrad by stride phases
    "2d-dw-s2-same": ((2, 3, 9, 7), (3, 1, 3, 3), dict(stride=2, padding="same", groups=3)),
    # channel multiplier 2, dilation, stride 1: dgrad = forward on the flipped weight
    "2d-mult2-dil": ((1, 3, 8, 8), (6, 1, 3, 3), dict(padding=(2, 1), dilation=(2, 1), groups=3)),
    # padding beyond the kernel's reach at stride 1: dgrad by the phase kernel
    "2d-dw-pad>reach": ((1, 2, 5, 6), (2, 1, 3, 3), dict(padding=3, groups=2)),
    # 1-d, stride 3 and dilation 2 (gcd 1), asymmetric padding, multiplier 3
    "1d-s3-d2-mult3": ((2, 2, 17), (6, 1, 3), dict(stride=3, dilation=2, padding=(2, 1), groups=2)),
    # stride 2 with dilation 2 (gcd 2: half the residues have no taps)
    "1d-s2-d2": ((1, 2, 16), (2, 1, 4), dict(stride=2, dilation=2, padding=3, groups=2)),
    # 3-d, mixed strides, two channels per group and two outputs per group
    "3d-small-groups": ((1, 4, 5, 6, 7), (4, 2, 3, 2, 3), dict(stride=(2, 1, 3), padding=1,
                                                               groups=2)),
    # rows of 16 elements: every row 16-byte aligned in every dtype (vector loads),
    # also for grad_out at stride 1 and stride 2 (OW = 16, 8)
    "2d-aligned-s1": ((1, 2, 5, 16), (2, 1, 3, 3), dict(padding=1, groups=2)),
    "2d-aligned-s2": ((1, 2, 4, 32), (2, 1, 3, 3), dict(stride=2, padding=1, groups=2)),
    # a long 1-d row: several tiles along the row (TW = 128)
    "1d-long": ((1, 2, 300), (2, 1, 5), dict(padding=2, groups=2)),
    # a tall narrow plane: several tiles along the column
    "2d-tall": ((1, 2, 1100, 3), (2, 1, 3, 1), dict(padding=(1, 0), groups=2)),
    # small planes: several planes per block (threadIdx.z), stride 2 (phases)
    "2d-small-planes": ((3, 4, 3, 3), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),
    # a 7x7 (ConvNeXt) with stride 1
    "2d-7x7": ((1, 2, 9, 10), (2, 1, 7, 7), dict(padding=3, groups=2)),
}


def _data(g, dtype, seed):
    rng = np.random.default_rng(seed)
    mk = lambda shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    return mk(g.x_shape), mk(g.w_shape), mk((g.K,)), mk(g.y_shape)


def test_every_case_is_taken_by_the_depthwise_family():
    for name, (xs, ws, kw) in CASES.items():
        g = conv_geometry("t", xs, ws, dtype=np.float32, **kw)
        assert dw.plans(g, "auto") is not None, name
    modes = {n: dw.plans(conv_geometry("t", *c[:2], **c[2]), "auto")[1][0] for n, c in CASES.items()}
    assert modes["2d-mult2-dil"] == "flip" and modes["2d-dw-s2-same"] == "phase"
    assert modes["2d-dw-pad>reach"] == "phase"
    tiles = {n: dw.plans(conv_geometry("t", *c[:2], **c[2]), "auto")[0] for n, c in CASES.items()}
    assert tiles["1d-long"].tiles_w > 1 and tiles["2d-tall"].tiles_h > 1
    # rows per thread: 4 at unit row stride and dilation (forward and flipped input grad)
    assert tiles["2d-7x7"].RH == 4 and tiles["2d-tall"].RH == 4
    assert tiles["2d-dw-s2-same"].RH == 1 and tiles["2d-mult2-dil"].RH == 1
    assert tiles["2d-small-planes"].P > 1 and tiles["2d-small-planes"].P * 3 * 3 <= 256
    dg = {n: dw.plans(conv_geometry("t", *c[:2], **c[2]), "auto")[1][2] for n, c in CASES.items()}
    assert dg["2d-small-planes"].P > 1 and dg["1d-long"].tiles_w > 1


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warp"])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", ["full", "3"])
def test_every_depthwise_entry_point_every_schedule(sim_backend, monkeypatch, dtype, index,
                                                    schedule, cap):
    """cap=3: the plane loops (grid-stride over planes / weight planes) run many passes."""
    be = sim_backend
    dt = np_dtype(dtype)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    monkeypatch.setattr(be.rt, "max_blocks_1d", 3 if cap == "3" else L.MAX_BLOCKS_1D,
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
    s, i = SUF[dtype], ("i64" if index == "64" else "i32")
    want = {f"gpuconv_dw_fwd_{s}_{i}", f"gpuconv_dw_dgrad_{s}_{i}", f"gpuconv_dw_wgrad_{s}_{i}",
            f"gpuconv_dw_wgrad_reduce_{s}"}
    assert set(be.called) == want, sorted(set(be.called))


def test_forced_depthwise_kernels_on_dense_and_grouped_geometry(sim_backend, monkeypatch):
    """GPUCONV_CUDA_ALGO=depthwise: the family is correct for any channels per group
    (only slower), including the dense cases of tests/test_cuda_backend.py."""
    from test_cuda_backend import CASES as DENSE
    be = sim_backend
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "depthwise")
    for i, (name, (xs, ws, kw)) in enumerate(DENSE.items()):
        for dt in (np.float64, np.float32):
            g = conv_geometry("t", xs, ws, dtype=dt, **kw)
            assert dw.plans(g, "depthwise") is not None, name
            x, w, b, gy = _data(g, dt, i)
            be.called.clear()
            with be.rt.schedule("random", seed=i):
                got = (be.forward(x, w, b, g), be.input_grad(gy, w, g), be.weight_grad(x, gy, g))
            assert all(n.startswith("gpuconv_dw_") for n in be.called), be.called
            assert_close(got[0], ref.conv(x, w, b, **kw), dt, f"{name} forward")
            assert_close(got[1], ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} input grad")
            assert_close(got[2], ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} weight grad")


def test_selection_rule():
    mk = lambda xs, ws, **kw: conv_geometry("t", xs, ws, **kw)  # noqa: E731
    mobilenet = mk((8, 96, 56, 56), (96, 1, 3, 3), padding=1, groups=96)
    mobilenet_s2 = mk((8, 144, 56, 56), (144, 1, 3, 3), stride=2, padding=1, groups=144)
    convnext = mk((8, 96, 56, 56), (96, 1, 7, 7), padding=3, groups=96)
    mult = mk((8, 32, 28, 28), (64, 1, 3, 3), padding=1, groups=32)
    small = mk((8, 64, 28, 28), (64, 4, 3, 3), padding=1, groups=16)
    dw3d = mk((2, 16, 8, 16, 16), (16, 1, 3, 3, 3), padding=1, groups=16)
    for g in (mobilenet, mobilenet_s2, convnext, mult, small, dw3d):
        p = dw.plans(g, "auto")
        assert p is not None, g
        for t in (p[0], p[1][2], p[2]):
            assert t.smem <= L.SHARED_MEM_PER_BLOCK and t.TX * t.TY * t.P <= 256
    assert dw.plans(mobilenet, "auto")[1][0] == "flip"
    assert dw.plans(mobilenet_s2, "auto")[1][0] == "phase"
    dense = mk((8, 64, 14, 14), (64, 64, 3, 3), padding=1)
    wide = mk((8, 64, 14, 14), (64, 16, 3, 3), padding=1, groups=4)
    assert dw.plans(dense, "auto") is None and dw.plans(wide, "auto") is None
    for algo in ("direct", "tiled"):
        assert dw.plans(mobilenet, algo) is None
    assert dw.plans(dense, "depthwise") is not None
    # kernel rows wider than the weight gradient's accumulators (DW_MAXKW)
    assert dw.plans(mk((1, 2, 9, 12), (2, 1, 3, 9), padding=1, groups=2), "auto") is None
    assert dw.plans(mk((1, 2, 9, 9, 9), (2, 1, 7, 7, 7), padding=3, groups=2), "auto") is not None


def test_stride_one_input_grad_reuses_the_forward_plan():
    g = conv_geometry("t", (8, 96, 56, 56), (96, 1, 3, 3), padding=1, groups=96)
    mode = dw.plans(g, "auto")[1]
    assert mode[1] == dgrad_as_forward(g)


def test_plans_are_cached_per_geometry(sim_backend, monkeypatch):
    """A repeated call does no planning: the tile planner runs once per geometry."""
    be = sim_backend
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    calls = []
    orig = dw.tile_plan
    monkeypatch.setattr(dw, "tile_plan", lambda g, k: calls.append(k) or orig(g, k))
    dw._plans.cache_clear()
    g = conv_geometry("t", (1, 2, 6, 5), (2, 1, 3, 3), stride=2, padding=1, groups=2,
                      dtype=np.float64)
    x, w, b, gy = _data(g, np.float64, 0)
    for _ in range(3):
        be.forward(x, w, b, g)
        be.input_grad(gy, w, g)
        be.weight_grad(x, gy, g)
    assert sorted(calls) == ["dgrad", "fwd", "wgrad"]


def test_weight_grad_is_bit_identical_across_schedules_and_splits(sim_backend, monkeypatch):
    """Determinism: fixed order in every thread, lanes added in order, splits in order,
    whatever order the threads run in; enough tiles that the reduction really splits."""
    be = sim_backend
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    g = conv_geometry("t", (6, 4, 20, 6), (8, 1, 3, 3), padding=1, groups=4, dtype=np.float32)
    tile = dw.plans(g, "auto")[2]
    assert dw._wgrad_split(g, tile, L.MAX_BLOCKS_1D)[1] > 1
    x, w, b, gy = _data(g, np.float32, 3)
    want = ref.conv_weight_grad(x, gy, g.w_shape, padding=1, groups=4)
    outs = []
    for cap in (L.MAX_BLOCKS_1D, 3):
        monkeypatch.setattr(be.rt, "max_blocks_1d", cap, raising=False)
        for sched in ("forward", "reverse", "random", "warp"):
            with be.rt.schedule(sched, seed=11):
                outs.append(be.weight_grad(x, gy, g))
    assert_close(outs[0], want, np.float32, "split weight grad")
    for a in outs[1:]:
        assert np.array_equal(a.view(np.uint32), outs[0].view(np.uint32))


def test_nonfinite_weight_propagates_through_padding(sim_backend, monkeypatch):
    """Padding reads zero and its products are still added: a NaN/Inf weight tap reaches
    every output, as with an explicit im2col (and the reference)."""
    be = sim_backend
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    g = conv_geometry("t", (1, 2, 5, 8), (2, 1, 3, 3), padding=1, groups=2, dtype=np.float32)
    x, w, b, gy = _data(g, np.float32, 1)
    w[0, 0, 0, 0] = np.inf
    y = be.forward(x, w, None, g)
    want = ref.conv(x, w, None, padding=1, groups=2)
    assert np.array_equal(np.isnan(y), np.isnan(want)) and np.array_equal(np.isinf(y),
                                                                            np.isinf(want))


# ----------------------------------------------------------------------------- random geometry
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def _dw_geometry(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(2, 3))
    Cg = draw(st.sampled_from((1, 1, 1, 2)))
    Kg = draw(st.sampled_from((1, 1, 2, 3)))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    pads = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(nd))
    size = {1: 20, 2: 9, 3: 5}[nd]
    spatial = tuple(max(draw(st.integers(1, size)), d * (k - 1) + 1 - lo - hi)
                    for d, k, (lo, hi) in zip(dilation, kernel, pads))
    N = draw(st.integers(1, 2))
    return (N, groups * Cg) + spatial, (groups * Kg, Cg) + kernel, dict(
        stride=stride, dilation=dilation, padding=pads, groups=groups)


def test_random_depthwise_geometry(sim_backend):
    """Random 1-3-d depthwise-like geometry (multipliers, stride, dilation, asymmetric
    padding up to beyond the kernel's reach) in float64 against the reference."""
    be = sim_backend

    @settings(max_examples=40, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_dw_geometry(), st.integers(0, 2**31 - 1))
    def check(geom, seed):
        xs, ws, kw = geom
        g = conv_geometry("t", xs, ws, dtype=np.float64, **kw)
        assert dw.plans(g, "auto") is not None
        x, w, b, gy = _data(g, np.float64, seed)
        old = os.environ.pop("GPUCONV_CUDA_ALGO", None)
        try:
            got = (be.forward(x, w, b, g), be.input_grad(gy, w, g), be.weight_grad(x, gy, g))
        finally:
            if old is not None:
                os.environ["GPUCONV_CUDA_ALGO"] = old
        want = (ref.conv(x, w, b, **kw), ref.conv_input_grad(gy, w, xs, **kw),
                ref.conv_weight_grad(x, gy, ws, **kw))
        for a, e, what in zip(got, want, ("forward", "input grad", "weight grad")):
            assert_close(a, e, np.float64, f"{what} {xs} {ws} {kw}")

    check()
