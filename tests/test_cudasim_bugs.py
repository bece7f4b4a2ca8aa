"""The emulator catches real kernel bugs.

Each test injects one classic bug into a COPY of a real kernel source
(kernels/*.cu, string replacement at build time -- the files are never edited),
runs the pass through the unchanged CUDA backend on ``SimRuntime`` under every
thread schedule, and asserts the bug is reported: by an emulator error, or by a
mismatch against ``gpuconv.reference`` (float64).  The unmodified kernels pass
the same checks (no false alarms).
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

# H != W (so swapped indices matter), N*OH*OW = 70 (not a multiple of the 64-wide tiles)
X_SHAPE, W_SHAPE = (2, 8, 7, 5), (16, 8, 3, 3)
KW = dict(stride=1, padding=1, dilation=1, groups=1)
TOL = 1e-4  # float32, relative to the reference's norm


class MutatedRuntime(SimRuntime):
    """SimRuntime that compiles a mutated copy of one kernel file."""

    def __init__(self, filename, mutate, **kw):
        super().__init__(**kw)
        self.filename, self.mutate = filename, mutate

    def build(self, source, entry_names=None, options=()):
        if f"// ---- {self.filename}\n" in source:
            source = self.mutate(source)
        return super().build(source, entry_names, options)


def inject(filename, anchor, old, new):
    """A mutation: replace the first `old` after `anchor` in `filename`'s text."""
    def mutate(source):
        start = source.index(f"// ---- {filename}\n")
        a = source.find(anchor, start)
        i = source.find(old, a) if a >= 0 else -1
        if i < 0:
            pytest.fail(f"injection site {old!r} after {anchor!r} not found in kernels/{filename}: "
                        f"the kernel changed, update tests/test_cudasim_bugs.py")
        return source[:i] + new + source[i + len(old):]
    return mutate


def make_data(x_shape=X_SHAPE, w_shape=W_SHAPE, kw=KW):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    g = conv_geometry("conv2d", x_shape, w_shape, dtype=np.float32, **kw)
    gy = rng.standard_normal(g.y_shape).astype(np.float32)
    ref = {"fwd": reference.conv(x, w, b, **kw),
           "dgrad": reference.conv_input_grad(gy, w, x_shape, **kw),
           "wgrad": reference.conv_weight_grad(x, gy, w_shape, **kw)}
    return x, w, b, gy, g, ref


@pytest.fixture(scope="module")
def data():
    return make_data()


# the engine's bugs also on C = 5 (a reduction tail: C*taps = 45 is not a multiple of BK)
# and a stride-2 input grad (several stride phases)
ODD = ((2, 5, 7, 5), (16, 5, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1))
ODD_S2 = ((2, 5, 9, 7), (12, 5, 3, 3), dict(stride=2, padding=1, dilation=1, groups=1))
WIDE = ((1, 6, 5, 5), (40, 6, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1))  # K > 64/2


def run_pass(rt, pass_name, data):
    x, w, b, gy, g, _ = data
    be = CudaBackend(rt)
    if pass_name == "fwd":
        return be.forward(x, w, b, g)
    if pass_name == "dgrad":
        return be.input_grad(gy, w, g)
    return be.weight_grad(x, gy, g)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def outcome(rt, pass_name, data):
    """'ok', 'mismatch (rel err ...)' or the emulator error."""
    try:
        out = run_pass(rt, pass_name, data)
    except CudaSimError as e:
        return e
    err = rel_err(out, data[5][pass_name])
    return "ok" if err <= TOL else f"mismatch (rel err {err:.3g})"


# ---------------------------------------------------------------------------- control
@pytest.mark.parametrize("algo", ["direct", "tiled", "igemm"])
@pytest.mark.parametrize("pass_name", ["fwd", "dgrad", "wgrad"])
def test_unmodified_kernels_pass_every_schedule(monkeypatch, data, algo, pass_name):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", algo)
    rt = SimRuntime()
    sets = [data] + ([make_data(*ODD), make_data(*ODD_S2)] if algo == "igemm" else [])
    for d in sets:
        for s in SCHEDULES:
            with rt.schedule(s):
                assert outcome(rt, pass_name, d) == "ok", (s, algo, pass_name)


# ---------------------------------------------------------------------------- injected bugs
BUGS = {
    # (a) the barrier between filling the shared tiles and reading them is gone
    "removed __syncthreads": dict(
        file="conv_fwd.cu", algo="tiled", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "gc_conv_fwd_tiled(", "__syncthreads();", ";"),
        expect=(CudaSimError, "mismatch")),
    # (b) off-by-one loop bound: one element past the end
    "off-by-one bound": dict(
        file="conv_dgrad.cu", algo="direct", pass_name="dgrad",
        mutate=inject("conv_dgrad.cu", "gc_conv_dgrad(", "idx < total", "idx <= total"),
        expect=(MemoryAccessError,)),
    # (c) H and W swapped in the input index
    "swapped H/W": dict(
        file="conv_fwd.cu", algo="direct", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "gc_conv_fwd(", "g.H + ih) * g.W", "g.W + ih) * g.H"),
        expect=(MemoryAccessError, "mismatch")),
    # (d) the output store is shifted by one element
    "out-of-bounds store": dict(
        file="conv_fwd.cu", algo="direct", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "gc_conv_fwd(", "gc_store(y + idx,", "gc_store(y + idx + 1,"),
        expect=(MemoryAccessError,)),
    # (e) threads without a column leave before the barrier
    "early return before a barrier": dict(
        file="conv_fwd.cu", algo="tiled", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "gc_conv_fwd_tiled(", "__syncthreads();",
                      "if (!nvalid) return;\n    __syncthreads();"),
        expect=(SyncError,)),
    # (f) weight gradient tile: the barrier after the multiply is gone (tiles are
    #     overwritten while other threads still read them)
    "removed second __syncthreads (wgrad)": dict(
        file="conv_wgrad.cu", algo="tiled", pass_name="wgrad",
        mutate=inject("conv_wgrad.cu", "gc_tile_mma(As, Bs, acc, tm, tn);",
                      "__syncthreads();\n  }\n  A* out", "\n  }\n  A* out"),
        expect=(CudaSimError, "mismatch")),
    # (g) forward tile: the barrier between filling the tiles and multiplying them
    "removed tile __syncthreads (fwd)": dict(
        file="conv_fwd.cu", algo="tiled", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "Bs[(kb0 + 4 * i) * GC_TILE_N + nb] = rb[i];",
                      "__syncthreads();", ";"),
        expect=(CudaSimError, "mismatch")),
    # (h) forward tile: the barrier after the multiply (the prefetched next tile is
    #     stored over the tiles other warps are still reading)
    "removed second tile __syncthreads (fwd)": dict(
        file="conv_fwd.cu", algo="tiled", pass_name="fwd",
        mutate=inject("conv_fwd.cu", "gc_tile_mma(As, Bs, acc, tm, tn);", "__syncthreads();", ";"),
        expect=(CudaSimError, "mismatch")),
    # ---- the implicit-GEMM engine (kernels/igemm.cuh)
    # (i) main loop: the barrier after the multiply is gone (the next stage is written
    #     while other warps still read it, and read before it is complete)
    "igemm: removed main-loop barrier": dict(
        file="igemm.cuh", algo="igemm", pass_name="fwd",
        mutate=inject("igemm.cuh", "itb.store(Bs + (cur ^ 1)", "__syncthreads();", ";"),
        expect=(CudaSimError, "mismatch")),
    # (j) off-by-one stage index: the prefetched tile is stored into the stage being read
    "igemm: wrong stage index": dict(
        file="igemm.cuh", algo="igemm", pass_name="wgrad",
        mutate=inject("igemm.cuh", "gc_simt_mma<CFG>(As + cur", "ita.store(As + (cur ^ 1)",
                      "ita.store(As + cur"),
        expect=(CudaSimError, "mismatch")),
    # (k) the tap table is read before every thread has written it
    "igemm: removed tap-table barrier": dict(
        file="igemm.cuh", algo="igemm", pass_name="dgrad", data=ODD_S2,
        mutate=inject("igemm.cuh", "gc_fp_taps(tab, p, T_, tid", "__syncthreads();  // tap table", ";//"),
        expect=(CudaSimError, "mismatch")),
    # (l) the weight operand's column predicate is gone: columns past K (16 of a 64-wide
    #     tile) read past the end of the weight (the guard pages catch it)
    "igemm: unpredicated weight columns": dict(
        file="igemm.cuh", algo="igemm", pass_name="fwd", data=ODD,
        mutate=inject("igemm.cuh", "struct gc_fp_b_iter", "(kv && bn + CS * j < nlim)", "(kv)"),
        expect=(MemoryAccessError,)),
    # (l2) split-K: the fixed-order reduce drops the last slice (off-by-one bound)
    "igemm: split-K reduce misses a slice": dict(
        file="igemm.cuh", algo="igemm", pass_name="fwd", data=ODD, env={"GPUCONV_IGEMM_SPLITS": "3"},
        mutate=inject("igemm.cuh", "gc_igemm_reduce(", "i < splits;", "i < splits - 1;"),
        expect=("mismatch",)),
    # (m) wrong shared layout: the micro-kernel reads the second B half at the first
    "igemm: wrong shared-memory fragment offset": dict(
        file="igemm.cuh", algo="igemm", pass_name="fwd", data=WIDE,
        mutate=inject("igemm.cuh", "gc_simt_mma(", "Bs + kk * CFG::LDB + CFG::BN / 2 + tn * 4",
                      "Bs + kk * CFG::LDB + tn * 4"),
        expect=("mismatch",)),
    # (n) weight grad: a dropped carry in the position digits (wrong input rows)
    "igemm: dropped position carry (wgrad)": dict(
        file="igemm.cuh", algo="igemm", pass_name="wgrad", data=ODD,
        mutate=inject("igemm.cuh", "struct gc_wg_a_iter", "if (o >= osp) { o -= osp; ++img; }",
                      "if (o >= osp) { o -= osp; }"),
        expect=(MemoryAccessError, "mismatch")),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_injected_bug_is_reported_under_every_schedule(monkeypatch, data, bug):
    spec = BUGS[bug]
    if "data" in spec:
        data = make_data(*spec["data"])
    for k, v in spec.get("env", {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", spec["algo"])
    rt = MutatedRuntime(spec["file"], spec["mutate"], time_limit=60)
    seen = {}
    for s in SCHEDULES:
        with rt.schedule(s, seed=3):
            res = outcome(rt, spec["pass_name"], data)
        seen[s] = res
        kinds = spec["expect"]
        ok = any((isinstance(k, type) and isinstance(res, k)) or
                 (isinstance(k, str) and isinstance(res, str) and res.startswith(k)) for k in kinds)
        assert ok, f"{bug}: schedule {s}: expected one of {kinds}, got {res!r}"
    # the errors name the kernel, the block and the thread
    for res in seen.values():
        if isinstance(res, CudaSimError):
            assert "gpuconv_" in str(res) and "block (" in str(res)


def test_early_return_message_points_at_the_source(monkeypatch, data):
    spec = BUGS["early return before a barrier"]
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "tiled")
    rt = MutatedRuntime(spec["file"], spec["mutate"])
    with pytest.raises(SyncError, match=r"__syncthreads\(\) at conv_fwd\.cu:\d+ reached by only "
                                        r"\d+ of 256 threads.*already exited"):
        run_pass(rt, "fwd", data)


def test_oob_store_message_names_buffer_and_thread(monkeypatch, data):
    spec = BUGS["out-of-bounds store"]
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "direct")
    rt = MutatedRuntime(spec["file"], spec["mutate"])
    with pytest.raises(MemoryAccessError, match=r"thread \(\d+,0,0\): out-of-bounds write of "
                                                r"argument 3 'y' \(float32\[2, 16, 7, 5\]\) at byte "
                                                r"offset 4480 \(element 1120\)"):
        run_pass(rt, "fwd", data)


def test_removed_reuse_barrier_in_grid_stride_weight_grad_is_caught(monkeypatch, data):
    """The direct weight gradient loops (grid-stride) over weight elements and reuses its
    warp-sum scratch each time: without the barrier at the end of the loop body, lane 0
    of a fast warp overwrites a slot thread 0 is still reading.  Only a second pass of
    the loop shows it, so the grid is capped at 7 blocks (real grids are capped too,
    at 524,280 blocks), and only an order that runs one warp ahead of the others
    exposes the race: the 'warp' schedule must catch it."""
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "direct")
    mutate = inject("conv_wgrad.cu", "if (lane == 0) warp_sums[warp] = acc;",
                    "__syncthreads();  // warp_sums is reused", ";  // barrier removed")
    rt = MutatedRuntime("conv_wgrad.cu", mutate)
    rt.max_blocks_1d = 7
    with rt.schedule("warp", seed=3):
        res = outcome(rt, "wgrad", data)
    assert res != "ok", res
    clean = SimRuntime()
    clean.max_blocks_1d = 7
    for s in SCHEDULES:  # the unmodified kernel passes the same capped runs
        with clean.schedule(s, seed=3):
            assert outcome(clean, "wgrad", data) == "ok", s
