"""The emulator catches real bugs in the depthwise kernels (kernels/depthwise.cu).

As tests/test_cudasim_bugs.py: one classic bug injected into a COPY of the source,
the pass run through the unchanged CUDA backend on ``SimRuntime`` under every thread
schedule, the bug reported by an emulator error or a mismatch against the float64
reference; the unmodified kernels pass the same runs.
"""
from __future__ import annotations

import numpy as np
import pytest

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
from gpuconv import reference  # noqa: E402
from gpuconv._cuda.backend import CudaBackend  # noqa: E402
from gpuconv._geometry import conv_geometry  # noqa: E402
from gpuconv.testing.cudasim import (SCHEDULES, CudaSimError, MemoryAccessError,  # noqa: E402
                                     SimRuntime, SyncError)

if not cudasim.probe()[0]:
    pytest.skip(f"cudasim unusable: {cudasim.probe()[1]}", allow_module_level=True)

from test_cudasim_bugs import MutatedRuntime, inject  # noqa: E402

FILE = "depthwise.cu"
TOL = 1e-4
# two channels per group and two outputs per group (the channel loop runs twice), rows of
# 24 float32 (16-byte aligned: the vector loads run; ragged against the 32-wide tile); stride 1 for the forward and the
# weight gradient, stride 2 for the input gradient (the stride-phase kernel)
X_SHAPE, W_SHAPE = (2, 4, 7, 24), (4, 2, 3, 3)
KW = {"fwd": dict(padding=1, groups=2), "wgrad": dict(padding=1, groups=2),
      "dgrad": dict(stride=2, padding=1, groups=2)}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    w = rng.standard_normal(W_SHAPE).astype(np.float32)
    b = rng.standard_normal(W_SHAPE[0]).astype(np.float32)
    out = {}
    for p, kw in KW.items():
        g = conv_geometry("t", X_SHAPE, W_SHAPE, dtype=np.float32, **kw)
        gy = rng.standard_normal(g.y_shape).astype(np.float32)
        want = {"fwd": lambda: reference.conv(x, w, b, **kw),
                "dgrad": lambda: reference.conv_input_grad(gy, w, X_SHAPE, **kw),
                "wgrad": lambda: reference.conv_weight_grad(x, gy, W_SHAPE, **kw)}[p]()
        out[p] = (g, gy, want)
    return x, w, b, out


def outcome(rt, pass_name, data):
    x, w, b, per = data
    g, gy, want = per[pass_name]
    be = CudaBackend(rt)
    try:
        got = {"fwd": lambda: be.forward(x, w, b, g), "dgrad": lambda: be.input_grad(gy, w, g),
               "wgrad": lambda: be.weight_grad(x, gy, g)}[pass_name]()
    except CudaSimError as e:
        return e
    assert {k[1] for k in be.modules._modules} == {"dw"}  # the depthwise family ran
    got = np.asarray(got, np.float64)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    return "ok" if err <= TOL else f"mismatch (rel err {err:.3g})"


@pytest.mark.parametrize("pass_name", ["fwd", "dgrad", "wgrad"])
def test_unmodified_depthwise_kernels_pass_every_schedule(monkeypatch, data, pass_name):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    rt = SimRuntime()
    for cap in (rt.max_blocks_1d, 1):
        rt.max_blocks_1d = cap
        for s in SCHEDULES:
            with rt.schedule(s, seed=3):
                assert outcome(rt, pass_name, data) == "ok", (s, cap, pass_name)


ERR_OR_MISMATCH = (CudaSimError, "mismatch")
BUGS = {
    # the barrier between copying the halo into shared memory and reading it is gone
    "dropped halo barrier (fwd)": dict(
        pass_name="fwd", mutate=inject(FILE, "gc_dw_fwd(", "__syncthreads();", ";"),
        expect=ERR_OR_MISMATCH),
    "dropped halo barrier (dgrad)": dict(
        pass_name="dgrad", mutate=inject(FILE, "gc_dw_dgrad(", "__syncthreads();", ";"),
        expect=ERR_OR_MISMATCH),
    "dropped halo barrier (wgrad)": dict(
        pass_name="wgrad", mutate=inject(FILE, "gc_dw_wgrad(", "__syncthreads();", ";"),
        expect=ERR_OR_MISMATCH),
    # the forward's row window: the weights are not shifted with the input row
    "row-window weights not shifted (fwd)": dict(
        pass_name="fwd", mutate=inject(FILE, "gc_dw_fwd(", "wwin[r] = wwin[r - 1];", ";"),
        expect=ERR_OR_MISMATCH),
    # the 16-byte load keeps one element short: proves the vector path runs
    "vector load drops an element": dict(
        pass_name="fwd", mutate=inject(FILE, "gc_dw_vload(", "i < (int)(16 / sizeof(T))",
                                       "i < (int)(16 / sizeof(T)) - 1"),
        expect=ERR_OR_MISMATCH),
    # the vector column start off by one element: misaligned 16-byte loads
    "misaligned vector load": dict(
        pass_name="fwd", mutate=inject(FILE, "gc_dw_load_halo(", "wi = a0 + vc * V;",
                                       "wi = a0 + vc * V + 1;"),
        expect=(MemoryAccessError,)),
    # the grad_out halo copied from one row too late
    "halo rows off by one (dgrad)": dict(
        pass_name="dgrad", mutate=inject(FILE, "gc_dw_dgrad(", "-(g.dd / phd.gcd), oh_lo,",
                                         "-(g.dd / phd.gcd), oh_lo + 1,"),
        expect=ERR_OR_MISMATCH),
    # the grad_out column step between a thread's same-phase columns ignores the stride
    "wrong phase column step (dgrad)": dict(
        pass_name="dgrad", mutate=inject(FILE, "gc_dw_dgrad(", "t.TX / g.sw;", "t.TX;"),
        expect=ERR_OR_MISMATCH),
    # one column past the row end is stored
    "off-by-one store bound (fwd)": dict(
        pass_name="fwd", mutate=inject(FILE, "gc_dw_fwd(", "if (ow < g.OW)", "if (ow <= g.OW)"),
        expect=(MemoryAccessError, "mismatch")),
    # threads without a (tap, lane) leave before the barriers
    "early return before a barrier (wgrad)": dict(
        pass_name="wgrad", mutate=inject(FILE, "gc_dw_wgrad(", "const int kh = trow % g.KH",
                                         "if (!active) return;\n  const int kh = trow % g.KH"),
        expect=(SyncError,)),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_injected_depthwise_bug_is_reported_under_every_schedule(monkeypatch, data, bug):
    spec = BUGS[bug]
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    rt = MutatedRuntime(FILE, spec["mutate"], time_limit=60)
    for s in SCHEDULES:
        with rt.schedule(s, seed=3):
            res = outcome(rt, spec["pass_name"], data)
        kinds = spec["expect"]
        ok = any((isinstance(k, type) and isinstance(res, k)) or
                 (isinstance(k, str) and isinstance(res, str) and res.startswith(k)) for k in kinds)
        assert ok, f"{bug}: schedule {s}: expected one of {kinds}, got {res!r}"
        if isinstance(res, CudaSimError):
            assert "gpuconv_dw_" in str(res) and "block (" in str(res)


@pytest.mark.parametrize("what", ["reuse", "lane sums"])
def test_dropped_reuse_barrier_is_caught(monkeypatch, data, what):
    """Without the barrier after the multiply, the next channel's halo is copied over the
    one slower threads still read: the channel loop runs twice here, and the grid cap of
    one block makes the plane loop run many passes.  Without the barrier between the
    lane sums' stores and their in-order sum, lane 0 reads slots not yet written.
    Only some thread orders expose either race (e.g. not 'reverse' for the lane sums)."""
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "auto")
    if what == "reuse":
        pass_name = "fwd"
        mutate = inject(FILE, "gc_dw_fwd(", "__syncthreads();  // the halo and weights",
                        ";  // barrier removed")
    else:
        pass_name = "wgrad"
        mutate = inject(FILE, "sums[tid] = acc[kw];", "__syncthreads();", ";")
    rt = MutatedRuntime(FILE, mutate)
    rt.max_blocks_1d = 1
    results = {}
    for s in SCHEDULES:
        with rt.schedule(s, seed=3):
            results[s] = outcome(rt, pass_name, data)
    must = set(SCHEDULES) - ({"reverse"} if what == "lane sums" else set())
    assert all(results[s] != "ok" for s in must), results
