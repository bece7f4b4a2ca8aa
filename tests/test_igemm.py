"""The implicit-GEMM engine (kernels/igemm.cuh, kernels/conv_igemm.cu) under the emulator.

Every entry point (forward-like GEMM and weight-grad GEMM for both tile configurations
and both index widths, and the split-K reduce), every dtype, every thread schedule,
with and without split-K, against the float64 reference; geometries with channel
counts that are not multiples of 8, K = 1, odd spatial sizes, strides whose phases
get no taps, padding beyond the kernel's reach; bit-identical results run to run and
schedule to schedule; random geometry (hypothesis); the selection rules.
"""
import os

import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._cuda import igemm as IG
from gpuconv._cuda.plans import use_igemm
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from conftest import np_dtype

DTYPES = ["float16", "bfloat16", "float32", "float64"]
SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


# small enough for the emulator, each with an awkward feature
CASES = {
    "2d-grouped-asym-pad": ((2, 4, 7, 6), (10, 2, 3, 3), dict(padding=((1, 0), (2, 1)), groups=2)),
    "1d-stride2-dil2": ((2, 3, 11), (9, 3, 3), dict(stride=2, padding=2, dilation=2)),
    "3d-mixed-stride": ((1, 2, 4, 5, 3), (9, 2, 2, 3, 1), dict(stride=(1, 2, 1), padding=1)),
    "2d-5x5-dil": ((2, 3, 7, 9), (9, 3, 5, 5), dict(padding=(2, 1), dilation=(1, 2))),
    "2d-1x1-C20-K17": ((3, 20, 3, 5), (17, 20, 1, 1), dict()),
    "2d-C13-K70-odd": ((1, 13, 9, 7), (70, 13, 3, 3), dict(padding=1)),  # N tile edge, C%8
    "2d-K1": ((2, 5, 5, 7), (1, 5, 3, 3), dict(padding=1)),
    "2d-stride3-dil2": ((1, 4, 11, 10), (6, 4, 3, 2), dict(stride=3, dilation=2, padding=(2, 1))),
    "2d-1x1-stride2": ((2, 6, 7, 5), (5, 6, 1, 1), dict(stride=2)),  # phases with no taps
    "2d-pad-beyond-reach": ((1, 3, 5, 5), (4, 3, 3, 3), dict(padding=3)),
    "2d-grouped3-stride2": ((2, 9, 9, 8), (12, 3, 3, 3), dict(stride=2, padding=1, groups=3)),
}


def _data(g, dtype, seed):
    rng = np.random.default_rng(seed)
    mk = lambda shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    return mk(g.x_shape), mk(g.w_shape), mk((g.K,)), mk(g.y_shape)


def _run_cases(be, dt, schedule, cases, seed0=0):
    for i, (name, (xs, ws, kw)) in enumerate(cases.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        assert use_igemm(g), name
        x, w, b, gy = _data(g, dt, seed0 + i)
        saved = [a.copy() for a in (x, w, b, gy)]
        with be.rt.schedule(schedule, seed=7 + i):
            y = be.forward(x, w, b, g)
            y0 = be.forward(x, w, None, g)
            gx = be.input_grad(gy, w, g)
            gw = be.weight_grad(x, gy, g)
        for a in (y, y0, gx, gw):
            assert a.dtype == dt
        assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} forward")
        assert_close(y0, ref.conv(x, w, None, **kw), dt, f"{name} forward (no bias)")
        assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} input grad")
        assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} weight grad")
        for a, s in zip((x, w, b, gy), saved):  # inputs never modified
            assert np.array_equal(a.view(np.uint8), s.view(np.uint8))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warp"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_engine_entry_point_every_schedule(sim_backend, igemm_env, monkeypatch, dtype,
                                                 cfg, index, splits, schedule):
    """The SIMT policy for every dtype: the half types' forward and input grad would take
    the tensor-op policy (tests/test_igemm_tc.py), so the policy choice is patched off
    (GPUCONV_CUDA_ALGO=simt would also send the depthwise-like cases to their kernels)."""
    be = sim_backend
    dt = np_dtype(dtype)
    igemm_env(cfg, index, splits)
    monkeypatch.setattr(IG, "tensor_op", lambda g, algo, pass_name="fp": False)
    be.called.clear()
    _run_cases(be, dt, schedule, CASES)
    suf, i = SUFFIX[dtype], "i64" if index == "64" else "i32"
    want = {f"gpuconv_igemm_fp_{suf}_{cfg}_{i}", f"gpuconv_igemm_wg_{suf}_{cfg}_{i}",
            f"gpuconv_igemm_reduce_{suf}"}
    assert want <= set(be.called), sorted(set(be.called))
    others = {n for n in be.called if not n.startswith("gpuconv_igemm_")}
    assert not others, f"non-engine kernels ran: {sorted(others)}"


def test_split_k_is_bit_identical_across_schedules_and_runs(sim_backend, igemm_env):
    """Fixed-order reduction: the same bits whatever order the threads run in."""
    be = sim_backend
    g = conv_geometry("t", (2, 24, 6, 7), (10, 24, 3, 3), padding=1, stride=(1, 2),
                      dtype=np.float32)
    x, w, b, gy = _data(g, np.float32, 3)
    igemm_env("s", "32", 4)
    outs = []
    for sched in ("forward", "reverse", "random", "warp", "random"):
        with be.rt.schedule(sched, seed=11 + len(outs)):
            outs.append([be.forward(x, w, b, g), be.input_grad(gy, w, g),
                         be.weight_grad(x, gy, g)])
    for o in outs[1:]:
        for a, e in zip(o, outs[0]):
            assert np.array_equal(a.view(np.uint32), e.view(np.uint32))
    assert_close(outs[0][0], ref.conv(x, w, b, padding=1, stride=(1, 2)), np.float32)


def test_split_k_really_splits_and_matches(sim_backend, igemm_env):
    """With the automatic rule, a small layer with a long reduction is split (grid under
    a wave) and the result still matches the reference."""
    be = sim_backend
    igemm_env("s", "32", None)
    g = conv_geometry("t", (1, 64, 4, 4), (16, 64, 3, 3), padding=1, dtype=np.float64)
    prob = IG.forward_problem(g)
    blocks = IG.fp_grid(prob, "s", 1, 1)[0] * IG.fp_grid(prob, "s", 1, 1)[1]
    assert IG.choose_splits(blocks, prob.kred, "s") > 1
    x, w, b, gy = _data(g, np.float64, 1)
    be.called.clear()
    assert_close(be.forward(x, w, b, g), ref.conv(x, w, b, padding=1), np.float64)
    assert "gpuconv_igemm_reduce_f64" in be.called


def test_dgrad_phases_cover_every_position_once():
    """Stride phases partition the input positions, and each phase's taps are exactly
    those with (i + pad - r*dil) % stride == 0 (independent recount)."""
    g = conv_geometry("t", (1, 2, 11, 10, 7), (3, 2, 3, 2, 3), stride=(3, 2, 1),
                      dilation=(2, 1, 3), padding=((2, 0), (1, 1), (3, 2)))
    probs = IG.dgrad_problems(g)
    assert len(probs) == 6
    covered = 0
    for p in probs:
        MD, MH, MW = p.params[9:12]
        covered += MD * MH * MW
        T = p.params[27:30]
        first = p.params[24:27]
        for a, (i0, s, d, pd, R) in enumerate(zip(first, g.stride, g.dilation, g.pad_lo,
                                                  g.kernel)):
            assert T[a] == sum((i0 + pd - r * d) % s == 0 for r in range(R))
    assert covered == 11 * 10 * 7


def test_selection_rules():
    # ResNet-50 res2 at batch 32: large tile; res5 at batch 8: small tile, split-K
    big = conv_geometry("t", (32, 64, 56, 56), (64, 64, 3, 3), padding=1)
    p = IG.forward_problem(big)
    assert IG.choose_config(p.M, p.Ng, 1) == "s"  # N = 64 does not fill a 128 tile
    big2 = conv_geometry("t", (32, 256, 56, 56), (256, 256, 1, 1))
    p2 = IG.forward_problem(big2)
    assert IG.choose_config(p2.M, p2.Ng, 1) == "l"
    grid = IG.fp_grid(p2, "l", 1, 1)
    assert IG.choose_splits(grid[0] * grid[1], p2.kred, "l") == 1
    small = conv_geometry("t", (8, 512, 7, 7), (512, 512, 3, 3), padding=1)
    ps = IG.forward_problem(small)
    cfg = IG.choose_config(ps.M, ps.Ng, 1)
    gs = IG.fp_grid(ps, cfg, 1, 1)
    splits = IG.choose_splits(gs[0] * gs[1], ps.kred, cfg)
    assert splits > 1 and gs[0] * gs[1] * splits >= IG.NUM_SMS
    assert IG.kchunk(ps.kred, splits, 8) % 8 == 0
    assert IG.kchunk(ps.kred, splits, 8) * splits >= ps.kred
    # depthwise stays on the direct kernels
    dw = conv_geometry("t", (8, 64, 14, 14), (64, 1, 3, 3), padding=1, groups=64)
    assert not use_igemm(dw)


# ----------------------------------------------------------------------------- random geometry
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def _geometry(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    C = groups * draw(st.integers(1, 11))
    K_ = groups * draw(st.integers(1, 9))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(nd))
    size = {1: 13, 2: 7, 3: 4}[nd]
    spatial = tuple(max(draw(st.integers(1, size)), d * (k - 1) + 1 - lo - hi)
                    for d, k, (lo, hi) in zip(dilation, kernel, pads))
    N = draw(st.integers(1, 2))
    return (N, C) + spatial, (K_, C // groups) + kernel, dict(
        stride=stride, dilation=dilation, padding=pads, groups=groups)


def test_random_geometry_engine(sim_backend):
    """Random 1-3-d geometry (groups, stride, dilation, asymmetric padding beyond the
    kernel's reach), random tile configuration and split-K, float64 vs the reference."""
    be = sim_backend

    @settings(max_examples=40, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_geometry(), st.sampled_from(("s", "l")), st.sampled_from((1, 1, 2, 5)),
           st.integers(0, 2**31 - 1))
    def check(geom, cfg, splits, seed):
        xs, ws, kw = geom
        g = conv_geometry("t", xs, ws, dtype=np.float64, **kw)
        x, w, b, gy = _data(g, np.float64, seed)
        env = {"GPUCONV_CUDA_ALGO": "igemm", "GPUCONV_IGEMM_CONFIG": cfg,
               "GPUCONV_IGEMM_SPLITS": str(splits)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            got = (be.forward(x, w, b, g), be.input_grad(gy, w, g), be.weight_grad(x, gy, g))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        want = (ref.conv(x, w, b, **kw), ref.conv_input_grad(gy, w, xs, **kw),
                ref.conv_weight_grad(x, gy, ws, **kw))
        for a, e, what in zip(got, want, ("forward", "input grad", "weight grad")):
            assert_close(a, e, np.float64, f"igemm {cfg} splits={splits} {what} {xs} {ws} {kw}")

    check()
