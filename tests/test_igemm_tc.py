"""The tensor-op policy of the implicit-GEMM engine (gpuconv_igemm_fptc_*: ldmatrix +
mma.sync m16n8k16, float32 accumulators, 3-stage cp.async pipeline of the weight, reordered once per call) under the
emulator: both tile configurations, both index widths, with and without split-K, every
thread schedule, float16 and bfloat16, against the float64 reference, over the awkward
geometries of tests/test_igemm.py plus weight-row alignments that select each cp.async
width (16, 8, 4 bytes, and plain loads for odd C*taps); the selection rule
(GPUCONV_CUDA_ALGO=simt forces the SIMT policy); injected bugs caught.
"""
import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._cuda import igemm as IG
from gpuconv._cuda import plans
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from conftest import np_dtype
from test_igemm import CASES, SUFFIX, _data, igemm_env  # noqa: F401

HALF = ["float16", "bfloat16"]
# extra forward cases: C*taps % 8 == 0 (16-byte copies), % 4 (8-byte), % 2 (4-byte), odd;
# several k-steps and a reduction tail; M and N tile edges of both configurations
TC_CASES = {
    "c16-3x3": ((1, 16, 6, 5), (24, 16, 3, 3), dict(padding=1)),          # 144: 16 B
    "c4-1x1-long": ((2, 36, 5, 3), (9, 36, 1, 1), dict()),                 # 36: 8 B
    "c6-1x3": ((1, 6, 4, 9), (70, 6, 1, 3), dict(padding=(0, 1), stride=(1, 2))),  # 18: 4 B
    "c7-3x3-dil": ((1, 7, 9, 9), (11, 7, 3, 3), dict(dilation=2, padding=1)),  # 63: odd
    "m-edge-130": ((1, 8, 10, 13), (130, 8, 1, 1), dict()),                # M 130, N 130
}


def _run_forward(be, dt, schedule, cases, seed0=0):
    for i, (name, (xs, ws, kw)) in enumerate(cases.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        x, w, b, _ = _data(g, dt, seed0 + i)
        saved = [a.copy() for a in (x, w, b)]
        with be.rt.schedule(schedule, seed=5 + i):
            y = be.forward(x, w, b, g)
            y0 = be.forward(x, w, None, g)
        assert y.dtype == dt and y0.dtype == dt
        assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} forward")
        assert_close(y0, ref.conv(x, w, None, **kw), dt, f"{name} forward (no bias)")
        for a, s in zip((x, w, b), saved):
            assert np.array_equal(a.view(np.uint8), s.view(np.uint8))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warp"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("dtype", HALF)
def test_tensor_op_forward_every_entry_point_every_schedule(sim_backend, igemm_env, dtype,
                                                            cfg, index, splits, schedule):
    be = sim_backend
    dt = np_dtype(dtype)
    igemm_env(cfg, index, splits)
    be.called.clear()
    _run_forward(be, dt, schedule, {**CASES, **TC_CASES})
    i = "i64" if index == "64" else "i32"
    name = f"gpuconv_igemm_fptc_{SUFFIX[dtype]}_{cfg}_{i}"
    assert name in be.called, sorted(set(be.called))
    assert f"gpuconv_igemm_wreorder_{SUFFIX[dtype]}" in be.called
    assert not any(n.startswith("gpuconv_igemm_fp_") for n in be.called), be.called
    if splits > 1:
        assert f"gpuconv_igemm_reduce_{SUFFIX[dtype]}" in be.called


def test_selection_half_types_default_to_tensor_ops(sim_backend, monkeypatch):
    be = sim_backend
    dt = np_dtype("float16")
    xs, ws, kw = TC_CASES["c16-3x3"]
    g = conv_geometry("t", xs, ws, dtype=dt, **kw)
    x, w, b, _ = _data(g, dt, 1)
    monkeypatch.delenv("GPUCONV_CUDA_ALGO", raising=False)
    monkeypatch.delenv("GPUCONV_IGEMM_CONFIG", raising=False)
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    assert plans.use_igemm(g) and IG.tensor_op(g, plans._algo())
    be.called.clear()
    assert_close(be.forward(x, w, b, g), ref.conv(x, w, b, **kw), dt)
    assert any(n.startswith("gpuconv_igemm_fptc_f16_") for n in be.called), be.called
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "simt")
    be.called.clear()
    assert_close(be.forward(x, w, b, g), ref.conv(x, w, b, **kw), dt)
    assert any(n.startswith("gpuconv_igemm_fp_f16_") for n in be.called), be.called
    assert not any("fptc" in n for n in be.called)
    g32 = conv_geometry("t", xs, ws, dtype=np.float32, **kw)
    assert not IG.tensor_op(g32, "auto")


def test_algo_rejects_unknown(monkeypatch):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "tensor")
    with pytest.raises(ValueError, match="GPUCONV_CUDA_ALGO='tensor'.*simt"):
        plans._algo()


# ---------------------------------------------------------------------------- injected bugs
# C*taps = 72: 16-byte weight copies, 5 k-steps (the 3-stage ring wraps); M = 70 (a tile edge)
BUG_CASE = ((2, 8, 7, 5), (16, 8, 3, 3), dict(padding=1))
TC_BUGS = {
    "dropped cp.async wait": (
        "gc_cp_async_wait<CFG::NS - 2>();  // this thread", ";  // this thread", ("AsyncCopyError",)),
    "wait one stage short": (
        "gc_cp_async_wait<CFG::NS - 2>();  // this thread",
        "gc_cp_async_wait<CFG::NS - 1>();  // this thread", ("AsyncCopyError",)),
    "wrong stage index": (
        "const unsigned short* bs = Bs + cur * CFG::B_ST;",
        "const unsigned short* bs = Bs + nxt * CFG::B_ST;", ("AsyncCopyError", "mismatch")),
    "wrong ldmatrix row (A)": (
        "const int a_off = (lr + (li >> 1) * 8)", "const int a_off = (lr + (li & 1) * 8)",
        ("mismatch",)),
    "wrong ldmatrix row (B)": (
        "(wn * CFG::WTN + (li >> 1) * 8 + lr)", "(wn * CFG::WTN + (li & 1) * 8 + lr)",
        ("mismatch",)),
}


@pytest.fixture(scope="module")
def bug_data():
    dt = np_dtype("float16")
    xs, ws, kw = BUG_CASE
    g = conv_geometry("t", xs, ws, dtype=dt, **kw)
    x, w, b, _ = _data(g, dt, 9)
    return x, w, b, g, ref.conv(x, w, b, **kw)


def _outcome(rt, data):
    from gpuconv._cuda.backend import CudaBackend
    from gpuconv.testing.cudasim import CudaSimError
    x, w, b, g, want = data
    try:
        got = CudaBackend(rt).forward(x, w, b, g)
    except CudaSimError as e:
        return e
    if np.isnan(np.asarray(got, np.float64)).any():
        return "mismatch (NaN)"
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    return "ok" if err <= 2e-3 else f"mismatch (rel err {err:.3g})"


@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("bug", [None] + list(TC_BUGS))
def test_tensor_op_injected_bugs_are_caught(monkeypatch, bug_data, bug, cfg):
    bugs = pytest.importorskip("test_cudasim_bugs")
    from gpuconv.testing.cudasim import SCHEDULES, SimRuntime
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", cfg)
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    if bug is None:  # control: the unmodified kernel passes the same check
        rt, expect = SimRuntime(), ("ok",)
    else:
        old, new, expect = TC_BUGS[bug]
        rt = bugs.MutatedRuntime("igemm.cuh", bugs.inject("igemm.cuh", "gc_igemm_fp_tc(", old, new),
                                 time_limit=60)
    for s in SCHEDULES:
        with rt.schedule(s, seed=3):
            res = _outcome(rt, bug_data)
        name = res if isinstance(res, str) else type(res).__name__
        assert any(name.startswith(e) for e in expect), f"{bug}: schedule {s}: got {res!r}"
        if not isinstance(res, str):
            assert "gpuconv_igemm_fptc_f16_" in str(res), str(res)
