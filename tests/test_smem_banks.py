"""Shared-memory bank conflicts of ldmatrix, counted by the emulator
(gpuconv.testing.cudasim.count_bank_conflicts), and the engine's tensor-op entries read
their shared tiles without conflicts.

A phase of ldmatrix (one 8x8 matrix of 16-bit elements: 8 rows of 16 bytes) reads 8 rows;
32 banks of 4 bytes: a row occupies the four banks of its 16-byte group
(offset // 16) % 8, so the phase is one wavefront when the 8 rows sit in 8 different
groups, and k wavefronts when k distinct rows share a group.  The counts here are derived
by hand from the row addresses, never from the emulator's own arithmetic.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpuconv import reference as ref
from gpuconv._geometry import conv_geometry

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
SIM_OK, SIM_WHY = cudasim.probe()[:2]
pytestmark = pytest.mark.skipif(not SIM_OK, reason=f"cudasim unusable: {SIM_WHY}")

from test_warp_mma import _run, sim_mod  # noqa: E402,F401  (the ldsm_x* kernels)


def _ldsm(sim_mod, nmat, rows, trans=False):
    """One warp runs ldmatrix.x<nmat> with lane l pointing at row rows[l] (16-byte rows)."""
    tile = (np.arange(128 * 8) % 65521).astype(np.uint16)
    rowoff = np.ones(32, np.int32)  # unused lanes: a misaligned address, ignored
    rowoff[:8 * nmat] = np.asarray(rows[:8 * nmat]) * 8
    sim, _ = sim_mod
    out = sim.empty((32, nmat), np.uint32)
    with cudasim.count_bank_conflicts() as counts:
        _run(sim_mod, f"ldsm_x{nmat}" + ("_trans" if trans else ""), 1, 32,
             [tile, np.int32(tile.size), rowoff, out], smem=tile.nbytes)
    assert len(counts) == 1
    return counts[0], counts


@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_consecutive_rows_are_conflict_free(sim_mod, nmat, trans):
    rec, counts = _ldsm(sim_mod, nmat, list(range(32)), trans)
    assert rec["ldmatrix"] == 1 and rec["phases"] == nmat
    assert rec["wavefronts"] == nmat and counts.conflicts == 0 and rec["worst_ways"] == 1


@pytest.mark.parametrize("stride_rows,ways", [(2, 2), (4, 4), (8, 8), (3, 1), (9, 1), (6, 2)])
def test_strided_rows_conflict_as_their_groups_say(sim_mod, stride_rows, ways):
    """Rows `stride_rows` * 16 bytes apart: groups (i * stride) % 8 for i < 8; the count of
    rows per group is 8 / (number of distinct groups)."""
    groups = [(i * stride_rows) % 8 for i in range(8)]
    assert max(groups.count(g) for g in set(groups)) == ways  # the hand count
    rows = [i * stride_rows for i in range(8)] + [i * stride_rows + 1 for i in range(8)]
    rec, counts = _ldsm(sim_mod, 2, rows + list(range(16)))
    assert rec["phases"] == 2 and rec["wavefronts"] == 2 * ways
    assert counts.conflicts == 2 * (ways - 1) and rec["worst_ways"] == ways
    assert rec["worst_at"].startswith("warp_test.cu:")  # the ldmatrix line of the source


def test_same_row_is_a_broadcast(sim_mod):
    rec, _ = _ldsm(sim_mod, 1, [5] * 8)
    assert rec["wavefronts"] == 1
    rec, _ = _ldsm(sim_mod, 1, [0, 0, 8, 8, 1, 2, 3, 4])  # 0 and 8 share group 0: 2 ways
    assert rec["wavefronts"] == 2


# ------------------------------------------------------------------ the engine's entries
CASES = [((2, 8, 7, 5), (16, 8, 3, 3), dict(padding=1)),
         ((1, 24, 9, 9), (40, 24, 3, 3), dict(padding=1, stride=2)),
         ((2, 16, 6, 6), (32, 16, 1, 1), {})]


def _tc_forward(rt, dtype, case, pass_name="forward"):
    import gpuconv
    from gpuconv._cuda.backend import CudaBackend
    from test_igemm import _data
    dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    xs, ws, kw = case
    g = conv_geometry("t", xs, ws, dtype=dt, **kw)
    x, w, b, gy = _data(g, dt, 1)
    be = CudaBackend(rt)
    # float32 reaches the tensor-op entries as TF32 (precision "high")
    with cudasim.count_bank_conflicts() as counts, gpuconv.set_float32_precision("high"):
        if pass_name == "forward":
            y, want = be.forward(x, w, b, g), ref.conv(x, w, b, **kw)
        elif pass_name == "input grad":
            y, want = be.input_grad(gy, w, g), ref.conv_input_grad(gy, w, xs, **kw)
        else:
            y, want = be.weight_grad(x, gy, g), ref.conv_weight_grad(x, gy, ws, **kw)
    y = np.asarray(y, np.float64)
    assert np.linalg.norm(y - want) / np.linalg.norm(want) <= 2e-3
    return counts


@pytest.mark.parametrize("pass_name", ["forward", "input grad", "weight grad"])
@pytest.mark.parametrize("cfg", ["s", "l"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tensor_op_entries_read_shared_without_conflicts(monkeypatch, cfg, dtype, pass_name):
    """Every tensor-op entry (fptc for the forward and each input-grad phase, wgtc for the
    weight grad; float32 as TF32, whose A fragments are LDS.32 and B ldmatrix)."""
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", cfg)
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    rt = cudasim.SimRuntime()
    entry = "gpuconv_igemm_wgtc_" if pass_name == "weight grad" else "gpuconv_igemm_fptc_"
    for case in CASES:
        counts = _tc_forward(rt, dtype, case, pass_name)
        tc = [r for r in counts if r["kernel"].startswith(entry)]
        assert tc and all(r["ldmatrix"] > 0 for r in tc), [r["kernel"] for r in counts]
        assert counts.conflicts == 0, counts.worst()


def test_unpadded_layout_is_caught(monkeypatch):
    """Injected: the shared row strides without their 8-half padding (LDA = BM, LDB = BK):
    still right, but the emulator counts the conflicts (k-major A rows 256 bytes apart: 8
    ways; B rows 32 bytes apart: 2 ways)."""
    bugs = pytest.importorskip("test_cudasim_bugs")
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.setenv("GPUCONV_IGEMM_CONFIG", "l")
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    rt = bugs.MutatedRuntime("igemm.cuh", bugs.inject(
        "igemm.cuh", "struct gc_tc_cfg {", "LDA = BM + 8, LDB = BK + 16 / ESZ_,", "LDA = BM, LDB = BK,"),
        time_limit=60)
    counts = _tc_forward(rt, "float16", CASES[0])
    worst = counts.worst()
    assert counts.conflicts > 0 and worst["worst_ways"] == 8, worst
    assert "igemm.cuh" in worst["worst_at"], worst
