"""TF32 tensor-op policy for float32 (gpuconv_igemm_fptc_f32_* / _wgtc_f32_*: mma.sync
m16n8k8, operands rounded to TF32 by cvt.rna -- gathered operands in the gather, the weight
in its reorder pass, the weight grad's grad_out in its fragments -- float32 accumulators)
under precision "high": forward, input grad (every stride phase), weight grad (split-K,
fixed-order reduce), both tile configurations, both index widths, with and without
split-K, the random and one-warp-at-a-time schedules (the shared loop runs all four in
tests/test_igemm_tc.py), against the float64 reference within TF32's error bound;
"highest" (the default) never launches it and stays exact float32; the global setting, the context
manager and precision= per call all reach it; injected bugs caught.

TF32's error bound (README, "float32 precision"): each operand is rounded to nearest with a
10-bit mantissa (relative error <= 2^-11), so each product is off by at most
(2^-10 + 2^-22) |x||w|, and the float32 sum adds its usual error:
|got - exact| <= 2^-10 * conv(|x|, |w|) + float32 accumulation error.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import reference as ref
from gpuconv._cuda import igemm as IG
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from test_igemm import CASES, _data
from test_igemm_tc import TC_CASES, TC_DGRAD_CASES, TC_WGRAD_CASES

F32 = np.float32


def tf32_bound(x, w, **kw):
    """Elementwise bound on |TF32 conv - exact conv| (module docstring)."""
    mag = ref.conv(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), None, **kw)
    taps = int(np.prod(w.shape[1:]))
    return mag * (2.0 ** -10 + 2.0 ** -22 + taps * 2.0 ** -23) + 1e-30


def tf32_bound_dgrad(gy, w, xs, **kw):
    mag = ref.conv_input_grad(np.abs(gy.astype(np.float64)), np.abs(w.astype(np.float64)),
                              xs, **kw)
    red = w.shape[0] * int(np.prod(w.shape[2:]))
    return mag * (2.0 ** -10 + 2.0 ** -22 + red * 2.0 ** -23) + 1e-30


def tf32_bound_wgrad(x, gy, ws, **kw):
    mag = ref.conv_weight_grad(np.abs(x.astype(np.float64)), np.abs(gy.astype(np.float64)),
                               ws, **kw)
    red = gy.shape[0] * int(np.prod(gy.shape[2:]))
    return mag * (2.0 ** -10 + 2.0 ** -22 + red * 2.0 ** -23) + 1e-30


def _check(got, want, bound, what):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), what
    err = np.abs(got - want)
    bad = err > bound
    assert not bad.any(), (f"{what}: {bad.sum()} elements outside the TF32 bound, worst "
                           f"{(err / bound).max():.3g}x")


@pytest.fixture
def high():
    with gpuconv.set_float32_precision("high"):
        yield


@pytest.mark.parametrize("schedule", ["random", "warp"])  # (the half types run all four)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("cfg", ["s", "l"])
def test_tf32_every_pass_every_entry_point_every_schedule(
        sim_backend, igemm_env, high, cfg, index, splits, schedule):
    be = sim_backend
    igemm_env(cfg, index, splits)
    be.called.clear()
    cases = {**CASES, **TC_CASES, **TC_DGRAD_CASES, **TC_WGRAD_CASES}
    for i, (name, (xs, ws, kw)) in enumerate(cases.items()):
        g = conv_geometry("t", xs, ws, dtype=F32, **kw)
        x, w, b, gy = _data(g, F32, 30 + i)
        saved = [a.copy() for a in (x, w, b, gy)]
        with be.rt.schedule(schedule, seed=3 + i):
            y = be.forward(x, w, b, g)
            gx = be.input_grad(gy, w, g)
            gw = be.weight_grad(x, gy, g)
        assert y.dtype == F32 and gx.dtype == F32 and gw.dtype == F32
        want = ref.conv(x, w, b, **kw)
        _check(y, want, tf32_bound(x, w, **kw) + 2.0 ** -23 * np.abs(want), f"{name} forward")
        _check(gx, ref.conv_input_grad(gy, w, xs, **kw), tf32_bound_dgrad(gy, w, xs, **kw),
               f"{name} input grad")
        _check(gw, ref.conv_weight_grad(x, gy, ws, **kw), tf32_bound_wgrad(x, gy, ws, **kw),
               f"{name} weight grad")
        for a, s in zip((x, w, b, gy), saved):
            assert np.array_equal(a, s)
    i = "i64" if index == "64" else "i32"
    want = {f"gpuconv_igemm_fptc_f32_{cfg}_{i}", f"gpuconv_igemm_wgtc_f32_{cfg}_{i}",
            "gpuconv_igemm_wreorder_f32", "gpuconv_igemm_reduce_f32"}
    assert want <= set(be.called), sorted(set(be.called))
    assert not any(n.startswith(("gpuconv_igemm_fp_f32", "gpuconv_igemm_wg_f32"))
                   for n in be.called), be.called


def test_tf32_is_really_tf32_and_highest_is_not(sim_backend, igemm_env):
    """Data whose products TF32 cannot hold exactly: "high" differs from exact float32 by
    more than float32's tolerance (so the comparison can fail) and stays within the TF32
    bound; "highest" launches no TF32 entry and meets float32's tolerance."""
    be = sim_backend
    igemm_env("s", "32", 1)
    xs, ws, kw = TC_CASES["c16-3x3"]
    g = conv_geometry("t", xs, ws, dtype=F32, **kw)
    x, w, b, gy = _data(g, F32, 5)
    want = ref.conv(x, w, b, **kw)
    with gpuconv.set_float32_precision("high"):
        be.called.clear()
        y_high = be.forward(x, w, b, g)
        assert "gpuconv_igemm_fptc_f32_s_i32" in be.called
    rel = np.abs(y_high - want).max() / np.abs(want).max()
    assert rel > 1e-5, rel  # beyond float32's tolerance: TF32 really ran
    _check(y_high, want, tf32_bound(x, w, **kw) + 2.0 ** -23 * np.abs(want), "high")
    be.called.clear()
    y = be.forward(x, w, b, g)  # the default, "highest"
    gx = be.input_grad(gy, w, g)
    gw = be.weight_grad(x, gy, g)
    assert not any("tc_" in n or "wreorder" in n for n in be.called), be.called
    assert {"gpuconv_igemm_fp_f32_s_i32", "gpuconv_igemm_wg_f32_s_i32"} <= set(be.called)
    assert_close(y, want, F32, "highest forward")
    assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), F32, "highest input grad")
    assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), F32, "highest weight grad")
    # float64 is never TF32
    with gpuconv.set_float32_precision("high"):
        g64 = conv_geometry("t", xs, ws, dtype=np.float64, **kw)
        assert not IG.tensor_op(g64, "auto") and not IG.tensor_op(g64, "auto", "wg")
        assert IG.tensor_op(g, "auto", "wg") and not IG.tensor_op(g, "simt")


def test_every_way_of_asking_reaches_tf32_on_the_public_api():
    """set_float32_precision (global and context manager) and precision= per call, through
    the public function on the emulated CUDA backend; "highest" overrides a global "high"."""
    if "cudasim" not in gpuconv.available_backends():
        pytest.skip(gpuconv.backend_info()["backends"]["cudasim"]["reason"])
    assert gpuconv.backend_info()["tf32_kernels"] is True
    xs, ws, kw = TC_CASES["c16-3x3"]
    rng = np.random.default_rng(8)
    x = rng.uniform(-1, 1, xs).astype(F32)
    w = rng.uniform(-1, 1, ws).astype(F32)
    want = ref.conv(x, w, None, **kw)

    def err(y):
        return np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()

    run = lambda **k: gpuconv.conv2d(x, w, backend="cudasim", **kw, **k)  # noqa: E731
    assert err(run()) < 1e-5
    assert err(run(precision="high")) > 1e-5
    with gpuconv.set_float32_precision("high"):
        assert err(run()) > 1e-5
        assert err(run(precision="highest")) < 1e-5
    before = gpuconv.get_float32_precision()
    gpuconv.set_float32_precision("high")
    try:
        assert err(run()) > 1e-5
    finally:
        gpuconv.set_float32_precision(before)
    assert err(run()) < 1e-5
    # numpy stays exact float32 under "high"
    assert err(gpuconv.conv2d(x, w, backend="numpy", precision="high", **kw)) < 1e-5


# ---------------------------------------------------------------------------- injected bugs
TF32_BUGS = {
    # the gather stores the float32 pattern unrounded: the emulator's MMA refuses it
    "input not rounded to TF32": (
        "gc_gather_read<unsigned, float>(", "return gc_f32_to_tf32(*p);",
        "return __float_as_uint(*p);", ("MmaOperandError",)),
    "weight not rounded to TF32": (
        "gc_tc_prep<float>(", "return __uint_as_float(gc_f32_to_tf32(v));", "return v;",
        ("MmaOperandError",)),
    "TF32 A fragment k+4 half swapped": (
        "gc_tc_mainloop(", "af[i][2] = q[4 * CFG::LDA];", "af[i][2] = q[4];",
        ("mismatch",)),
    "TF32 B row halves (k+4) at the half type's offset": (
        "gc_tc_mainloop(", "(li & 1) * (CFG::BK / 2)", "(li & 1) * 8", ("mismatch", "AsyncCopyError")),
    "weight grad: grad_out fragments not rounded": (
        "gc_igemm_wg_tc(", "gc_tc_mainloop<T, CFG, CFG::ESZ == 4>(", "gc_tc_mainloop<T, CFG, false>(",
        ("MmaOperandError",)),
}


@pytest.mark.parametrize("bug", [None] + list(TF32_BUGS))
def test_tf32_injected_bugs_are_caught(monkeypatch, bug):
    bugs = pytest.importorskip("test_cudasim_bugs")
    from gpuconv._cuda.backend import CudaBackend
    from gpuconv.testing.cudasim import SCHEDULES, CudaSimError, SimRuntime
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", "s")
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    xs, ws, kw = ((2, 8, 7, 5), (16, 8, 3, 3), dict(padding=1))  # 72-long rows, 9 k-steps
    g = conv_geometry("t", xs, ws, dtype=F32, **kw)
    x, w, b, gy = _data(g, F32, 9)
    if bug and bug.startswith("weight grad"):
        run = lambda be: be.weight_grad(x, gy, g)  # noqa: E731
        want = ref.conv_weight_grad(x, gy, ws, **kw)
        bound = tf32_bound_wgrad(x, gy, ws, **kw)
    else:
        run = lambda be: be.forward(x, w, b, g)  # noqa: E731
        want = ref.conv(x, w, b, **kw)
        bound = tf32_bound(x, w, **kw) + 2.0 ** -23 * np.abs(want)
    if bug is None:
        rt, expect = SimRuntime(), ("ok",)
    else:
        anchor, old, new, expect = TF32_BUGS[bug]
        rt = bugs.MutatedRuntime("igemm.cuh", bugs.inject("igemm.cuh", anchor, old, new),
                                 time_limit=60)
    for s in SCHEDULES[:2]:
        with rt.schedule(s, seed=3), gpuconv.set_float32_precision("high"):
            try:
                got = np.asarray(run(CudaBackend(rt)), np.float64)
                res = "ok" if (np.abs(got - want) <= bound).all() else "mismatch"
            except CudaSimError as e:
                res = e
        name = res if isinstance(res, str) else type(res).__name__
        assert any(name.startswith(e) for e in expect), f"{bug}: schedule {s}: got {res!r}"
