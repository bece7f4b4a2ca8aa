"""The tensor-op policy of the implicit-GEMM engine (gpuconv_igemm_fptc_*: ldmatrix +
mma.sync m16n8k16, float32 accumulators, 3-stage cp.async pipeline of the weight, reordered once per call) under the
emulator: both tile configurations, both index widths, with and without split-K, every
thread schedule, float16 and bfloat16, against the float64 reference, over the awkward
geometries of tests/test_igemm.py plus weight-row alignments that select each cp.async
width (16, 8, 4 bytes, and plain loads for odd C*taps); the selection rule
(GPUCONV_CUDA_ALGO=simt forces the SIMT policy); injected bugs caught.
"""
import re

import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._cuda import igemm as IG
from gpuconv._cuda import plans
from gpuconv._geometry import conv_geometry
from gpuconv.testing import assert_close

from conftest import np_dtype
from test_igemm import CASES, SUFFIX, _data

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


# extra input-grad cases: stride phases whose reductions K/G * phase taps hit each weight-row
# alignment (16/8/4-byte copies, odd), several k-steps per phase, 1-D and 3-D phases,
# grouped; a phase with no taps (1x1 stride 2: zero rows)
TC_DGRAD_CASES = {
    "dg-s2-K24": ((2, 8, 9, 7), (24, 8, 3, 3), dict(stride=2, padding=1)),     # 96/48/48/24
    "dg-s2-K3-1d": ((2, 5, 13), (3, 5, 5), dict(stride=2, padding=2)),        # 9, 6: odd
    "dg-s3-K6-dil": ((1, 4, 10, 11), (6, 4, 3, 3), dict(stride=3, dilation=2, padding=2)),
    "dg-3d-s2-g2": ((1, 4, 5, 4, 5), (6, 2, 3, 2, 3), dict(stride=2, padding=1, groups=2)),
    "dg-s2-1x1-K10": ((1, 6, 7, 6), (10, 6, 1, 1), dict(stride=2)),
}


# extra weight-grad cases: P*Q % 8 == 0 (16-byte grad_out copies), % 4 (8-byte), % 2 (4-byte),
# odd (plain loads), several k-steps and a reduction tail across images; GEMM rows C/G*taps
# and columns K/G past a tile edge of both configurations
TC_WGRAD_CASES = {
    "wg-pq16": ((3, 8, 4, 4), (12, 8, 3, 3), dict(padding=1)),                  # 16 B
    "wg-pq12": ((2, 5, 3, 4), (10, 5, 3, 3), dict(padding=1)),                  # 8 B
    "wg-pq6-1x1": ((3, 6, 2, 3), (7, 6, 1, 1), dict()),                          # 4 B
    "wg-pq-odd-s2": ((2, 3, 9, 13), (9, 3, 3, 3), dict(stride=2, padding=1)),   # 5x7: plain
    "wg-rows135-K70": ((1, 15, 4, 5), (70, 15, 3, 3), dict(padding=1)),         # M' 135, N' 70
}


def _run_passes(be, dt, schedule, cases, seed0=0,
                passes=("forward", "input grad", "weight grad")):
    for i, (name, (xs, ws, kw)) in enumerate(cases.items()):
        g = conv_geometry("t", xs, ws, dtype=dt, **kw)
        x, w, b, gy = _data(g, dt, seed0 + i)
        saved = [a.copy() for a in (x, w, b, gy)]
        with be.rt.schedule(schedule, seed=5 + i):
            if "forward" in passes:
                y = be.forward(x, w, b, g)
                y0 = be.forward(x, w, None, g)
                assert y.dtype == dt and y0.dtype == dt
                assert_close(y, ref.conv(x, w, b, **kw), dt, f"{name} forward")
                assert_close(y0, ref.conv(x, w, None, **kw), dt, f"{name} forward (no bias)")
            if "input grad" in passes:
                gx = be.input_grad(gy, w, g)
                assert gx.dtype == dt
                assert_close(gx, ref.conv_input_grad(gy, w, xs, **kw), dt, f"{name} input grad")
            if "weight grad" in passes:
                gw = be.weight_grad(x, gy, g)
                assert gw.dtype == dt
                assert_close(gw, ref.conv_weight_grad(x, gy, ws, **kw), dt, f"{name} weight grad")
        for a, s in zip((x, w, b, gy), saved):
            assert np.array_equal(a.view(np.uint8), s.view(np.uint8))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warp"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("index", ["32", "64"])
@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("dtype", HALF)
def test_tensor_op_every_pass_every_entry_point_every_schedule(
        sim_backend, igemm_env, dtype, cfg, index, splits, schedule):
    be = sim_backend
    dt = np_dtype(dtype)
    igemm_env(cfg, index, splits)
    be.called.clear()
    _run_passes(be, dt, schedule, {**CASES, **TC_CASES})
    if schedule in ("random", "warp"):  # the pass-specific extra cases: two schedules (time)
        _run_passes(be, dt, schedule, TC_DGRAD_CASES, seed0=50, passes=("input grad",))
        _run_passes(be, dt, schedule, TC_WGRAD_CASES, seed0=70, passes=("weight grad",))
    i, suf = "i64" if index == "64" else "i32", SUFFIX[dtype]
    want = {f"gpuconv_igemm_fptc_{suf}_{cfg}_{i}", f"gpuconv_igemm_wgtc_{suf}_{cfg}_{i}",
            f"gpuconv_igemm_wreorder_{suf}", f"gpuconv_igemm_reduce_{suf}"}
    assert want <= set(be.called), sorted(set(be.called))
    simt = [n for n in be.called if re.match(r"gpuconv_(igemm_(fp|wg)_|dgrad|wgrad|fwd)", n)]
    assert not simt, simt


def _unaligned_device_view(rt, a):
    """`a` copied into a device array that starts 2 bytes past a 16-byte boundary; `rt` then
    passes device arrays through ascontiguous unchanged, as CuPy does for a contiguous
    view (the emulator's own ascontiguous always copies into a fresh allocation)."""
    buf = rt.empty((a.size + 8,), a.dtype)
    o = next(i for i in range(8) if (buf.ctypes.data + 2 * i) % 16 == 2)
    v = buf[o:o + a.size].reshape(a.shape)
    v[...] = a
    assert v.ctypes.data % 16 != 0 and v.flags.c_contiguous and rt.is_device_array(v)
    orig = type(rt).ascontiguous
    rt.ascontiguous = lambda b: b if rt.is_device_array(b) else orig(rt, b)
    return v


def test_tensor_op_weight_grad_bit_identical_and_unaligned_grad_out(igemm_env):
    """Split-K weight grad: the same bits under every schedule and run; a grad_out view
    that starts 2 bytes past a 16-byte boundary (plain loads only) gives them too."""
    from gpuconv._cuda.backend import CudaBackend
    from gpuconv.testing.cudasim import SimRuntime
    be = CudaBackend(SimRuntime())
    dt = np_dtype("float16")
    xs, ws, kw = TC_WGRAD_CASES["wg-pq16"]
    g = conv_geometry("t", xs, ws, dtype=dt, **kw)
    x, _, _, gy = _data(g, dt, 4)
    igemm_env("s", "32", 3)
    outs = []
    for sched in ("forward", "reverse", "random", "warp", "random"):
        with be.rt.schedule(sched, seed=21 + len(outs)):
            outs.append(be.weight_grad(x, gy, g))
    outs.append(be.weight_grad(x, _unaligned_device_view(be.rt, gy), g))
    for o in outs[1:]:
        assert np.array_equal(o.view(np.uint16), outs[0].view(np.uint16))
    assert_close(outs[0], ref.conv_weight_grad(x, gy, ws, **kw), dt)


def test_tensor_op_input_grad_phase_weights():
    """The per-phase reordered weight the tensor-op input grad reads, recomputed
    independently: phase (i0) of each dim keeps the taps r with (i0 + pad - r*dil) % s == 0,
    in the order the phase's grad_out offsets run; each row is one input channel,
    contiguous along (tap, output channel)."""
    g = conv_geometry("t", (1, 4, 10, 11), (6, 2, 3, 2), stride=(3, 2), dilation=(2, 1),
                      padding=(2, 1), groups=2)
    for p in IG.dgrad_problems(g):
        T = p.params[27:30]
        ta, tb, tr, ts = p.params[30:33], p.params[33:36], p.params[36:39], p.params[39:42]
        first = p.params[24:27]
        for a in (1, 2):
            i0, s, d, pd, R = (first[a], g.stride[a - 1], g.dilation[a - 1], g.pad_lo[a - 1],
                               g.kernel[a - 1])
            taps = [r for r in range(R) if (i0 + pd - r * d) % s == 0]
            assert [tr[a] + ts[a] * t for t in range(T[a])] == taps
            # grad_out row j + ta + tb*t is the one whose tap r reaches input i0 + s*j
            for t, r in enumerate(taps):
                assert (i0 + pd - r * d) == s * (ta[a] + tb[a] * t)
        assert p.Ng == g.Cg and p.kred == g.Kg * T[0] * T[1] * T[2]


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
    gs = conv_geometry("t", xs, ws, dtype=dt, **{**kw, "stride": 2})
    gy = _data(gs, dt, 2)[3]
    for what, run, want in (
            ("forward", lambda: be.forward(x, w, b, g), lambda: ref.conv(x, w, b, **kw)),
            ("input grad", lambda: be.input_grad(gy, w, gs),
             lambda: ref.conv_input_grad(gy, w, xs, **kw, stride=2))):
        monkeypatch.delenv("GPUCONV_CUDA_ALGO", raising=False)
        be.called.clear()
        assert_close(run(), want(), dt, what)
        assert any(n.startswith("gpuconv_igemm_fptc_f16_") for n in be.called), be.called
        monkeypatch.setenv("GPUCONV_CUDA_ALGO", "simt")
        be.called.clear()
        assert_close(run(), want(), dt, what)
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
        "const typename CFG::E* bs = Bs + cur * CFG::B_ST;",
        "const typename CFG::E* bs = Bs + nxt * CFG::B_ST;", ("AsyncCopyError", "mismatch")),
    "wrong ldmatrix row (A)": (
        "const int a_off = (lr + (li >> 1) * 8)", "const int a_off = (lr + (li & 1) * 8)",
        ("mismatch",)),
    "wrong ldmatrix row (B)": (
        "(wn * CFG::WTN + (li >> 1) * 8 + lr)", "(wn * CFG::WTN + (li & 1) * 8 + lr)",
        ("mismatch",)),
}


# input-grad specific bugs, on a stride-2 input grad (phases of 4, 2, 2, 1 taps, 1-6 k-steps)
DG_BUG_CASE = ((2, 8, 9, 7), (24, 8, 3, 3), dict(stride=2, padding=1))
DG_BUGS = {
    "phase taps in reverse order (flip lost)": (
        "gc_igemm_wreorder(", "(p.trw + p.tsw * tw)", "(p.trw + p.tsw * (p.TW - 1 - tw))",
        ("mismatch",)),
    "weight not transposed": (
        "gc_igemm_wreorder(", "(long long)n * p.wn + (long long)c * p.wc",
        "(long long)n * p.wc + (long long)c * p.wn", ("mismatch", "MemoryAccessError")),
    "phase weight rows at the original stride": (
        "gc_igemm_fp_tc(", "const I wnI = Kred;", "const I wnI = p.wn;",
        ("mismatch", "MemoryAccessError")),
}


# weight-grad specific bugs, on a stride-(1, 2) weight grad (P*Q = 32, 4 k-steps) whose
# grad_out view starts 2 bytes past a 16-byte boundary (only plain loads are aligned)
WG_BUG_CASE = ((2, 8, 8, 7), (12, 8, 3, 3), dict(stride=(1, 2), padding=1))
WG_BUGS = {
    "grad_out copy width ignores the address": (
        "struct gc_wgtc_b_iter", "(unsigned long long)osp | (reinterpret_cast<unsigned long long>(gy_) / CFG::ESZ)",
        "(unsigned long long)osp", ("MemoryAccessError", "AsyncCopyError", "mismatch")),
    "image carry lost (grad_out rows)": (
        "struct gc_wgtc_b_iter", "if (o >= osp) { o -= osp; ++img; }", "if (o >= osp) { o -= osp; }",
        ("mismatch",)),
    "gather stride lost (input)": (
        "struct gc_wgtc_a_iter", "x0 = pos.w * g.sw", "x0 = pos.w", ("mismatch",)),
    "epilogue not transposed": (
        "gc_igemm_wg_tc(", "outp[((I)grp * g.Kg + n) * Mr + m]", "outp[((I)grp * g.Kg + m) * Mr + n]",
        ("mismatch", "MemoryAccessError")),
}


def _bug_data(case, seed, passname):
    dt = np_dtype("float16")
    xs, ws, kw = case
    g = conv_geometry("t", xs, ws, dtype=dt, **kw)
    x, w, b, gy = _data(g, dt, seed)
    if passname == "forward":
        return passname, (x, w, b, g), ref.conv(x, w, b, **kw)
    if passname == "weight grad":
        return passname, (x, gy, g), ref.conv_weight_grad(x, gy, ws, **kw)
    return passname, (gy, w, g), ref.conv_input_grad(gy, w, xs, **kw)


@pytest.fixture(scope="module")
def bug_data():
    return _bug_data(BUG_CASE, 9, "forward")


@pytest.fixture(scope="module")
def dg_bug_data():
    return _bug_data(DG_BUG_CASE, 10, "input grad")


@pytest.fixture(scope="module")
def wg_bug_data():
    return _bug_data(WG_BUG_CASE, 11, "weight grad")


def _outcome(rt, data):
    from gpuconv._cuda.backend import CudaBackend
    from gpuconv.testing.cudasim import CudaSimError
    passname, args, want = data
    be = CudaBackend(rt)
    if passname == "weight grad":  # grad_out as a device view 2 bytes past 16-byte alignment
        args = (args[0], _unaligned_device_view(rt, args[1]), args[2])
    try:
        run = {"forward": be.forward, "input grad": be.input_grad,
               "weight grad": be.weight_grad}[passname]
        got = run(*args)
    except CudaSimError as e:
        return e
    if np.isnan(np.asarray(got, np.float64)).any():
        return "mismatch (NaN)"
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    return "ok" if err <= 2e-3 else f"mismatch (rel err {err:.3g})"


def _check_bug(monkeypatch, data, cfg, bug, site):
    bugs = pytest.importorskip("test_cudasim_bugs")
    from gpuconv.testing.cudasim import SCHEDULES, SimRuntime
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", cfg)
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    if bug is None:  # control: the unmodified kernel passes the same check
        rt, expect = SimRuntime(), ("ok",)
    else:
        anchor, old, new, expect = site
        rt = bugs.MutatedRuntime("igemm.cuh", bugs.inject("igemm.cuh", anchor, old, new),
                                 time_limit=60)
    for s in SCHEDULES:
        with rt.schedule(s, seed=3):
            res = _outcome(rt, data)
        name = res if isinstance(res, str) else type(res).__name__
        assert any(name.startswith(e) for e in expect), f"{bug}: schedule {s}: got {res!r}"
        if not isinstance(res, str):
            assert "gpuconv_igemm_" in str(res) and "_f16" in str(res), str(res)


@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("bug", [None] + list(TC_BUGS))
def test_tensor_op_injected_bugs_are_caught(monkeypatch, bug_data, bug, cfg):
    site = None if bug is None else ("gc_tc_mainloop(",) + TC_BUGS[bug]
    _check_bug(monkeypatch, bug_data, cfg, bug, site)


@pytest.mark.parametrize("bug", [None] + list(DG_BUGS))
def test_tensor_op_input_grad_injected_bugs_are_caught(monkeypatch, dg_bug_data, bug):
    _check_bug(monkeypatch, dg_bug_data, "s", bug, None if bug is None else DG_BUGS[bug])


@pytest.mark.parametrize("bug", [None] + list(WG_BUGS))
def test_tensor_op_weight_grad_injected_bugs_are_caught(monkeypatch, wg_bug_data, bug):
    _check_bug(monkeypatch, wg_bug_data, "s", bug, None if bug is None else WG_BUGS[bug])
