"""`python -m gpuconv kernels`: every module compiled for sm_90 without a GPU (NVRTC via
CuPy), no register spills, one cubin per module, and the SASS of the implicit-GEMM
engine's SIMT main loops: 128-bit shared loads (LDS.128), the full 8x8 FMA block per
k-step, no local memory (LDL/STL) anywhere."""
import io
import json
import os
import re

import pytest

from gpuconv._cuda import report as R
from gpuconv._cuda import sources as K
from gpuconv.__main__ import main as cli_main


def _need_nvrtc():
    compiler = pytest.importorskip("cupy.cuda.compiler",
                                   reason="CuPy is not installed (NVRTC via CuPy)")
    try:
        compiler._NVRTCProgram('extern "C" __global__ void f() {}', "probe.cu",
                               method="cubin").compile(options=("--gpu-architecture=sm_90",))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVRTC is not usable here ({type(e).__name__}: {e})")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _need_nvrtc()
    d = tmp_path_factory.mktemp("cubins")
    out = io.StringIO()
    rc = R.main("sm_90", str(d), as_json=True, out=out)
    rows = json.loads(out.getvalue().split("\nregister spills")[0])
    return rc, {r["name"]: r for r in rows}, d


def test_cli_compiles_every_module_without_spills(report):
    rc, rows, d = report
    assert rc == 0, [n for n, r in rows.items() if r["spill_stores"] or r["spill_loads"]]
    assert set(K.all_entry_names()) <= set(rows)
    for n, r in rows.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, n
        assert 0 < r["regs"] <= 255 and r["blocks_per_sm"] >= 1, (n, r)
    assert sorted(os.listdir(d)) == sorted(f"gpuconv_{p}.sm_90.cubin" for p in K.PASSES)


def test_simt_main_loops_use_128_bit_shared_loads_and_no_local_memory(report):
    _, rows, _ = report
    if not rows["gpuconv_igemm_fp_f32_l_i32"]["loop"]:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    engine = [n for n in rows if re.match(r"gpuconv_igemm_(fp|wg)_", n)]
    assert len(engine) == 32
    for n in engine:
        r = rows[n]
        loop, whole = r["loop"], r["sass"]
        f64 = "_f64_" in n
        # BK = 8 steps of an 8x8 outer product: 512 FMAs, 4 x 128-bit operand loads a step
        # (f64: 8, two per four doubles; the f64 small tile has BK = 4)
        bk = 4 if f64 and "_s_" in n else 8
        assert (loop["DFMA"] if f64 else loop["FFMA"]) == 64 * bk, (n, loop)
        assert loop["LDS.128"] == (8 if f64 else 4) * bk, (n, loop)
        assert loop["BAR"] == 1, (n, loop)  # one barrier per k-step (double buffering)
        assert whole["LDL"] == 0 and whole["STL"] == 0, (n, whole)


# tensor-op families: (entry pattern, entries, LDSM.x4 per k-step as a function of MI).  One
# BK step of the warp tile (l 64x32: MI = 4, s 32x32: MI = 2; NJ = 4): MI x NJ HMMA
# (m16n8k16 for the half types, m16n8k8 for TF32); halves: ldmatrix.x4 MI (A, .trans) +
# NJ/2 (B); TF32: NJ/2 (B) only, A by 4 LDS.32 per m16 tile (no .trans for 32-bit
# elements; the TF32 weight grad also rounds its B fragments in registers)
TC_FAMILIES = {
    "half": (r"gpuconv_igemm_(fp|wg)tc_b?f16_[ls]_i(32|64)$", 16, lambda mi: mi + 2),
    "tf32": (r"gpuconv_igemm_(fp|wg)tc_f32_[ls]_i(32|64)$", 8, lambda mi: 2),
}


@pytest.mark.parametrize("family", list(TC_FAMILIES))
def test_tensor_op_entries_use_hmma_ldsm_ldgsts_and_no_local_memory(report, family):
    _, rows, _ = report
    pattern, count, ldsm = TC_FAMILIES[family]
    tc = [n for n in rows if re.match(pattern, n)]
    assert len(tc) == count, tc  # fptc/wgtc x dtypes x l/s x i32/i64
    if not rows[tc[0]]["loop"]:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    for n in tc:
        r = rows[n]
        loop, whole = r["loop"], r["sass"]
        # the common path (no tap change; wgtc: no image change) stays short: index
        # bookkeeping, not the gather
        assert loop["hot_instructions"] <= 260, (n, loop)
        mi = 4 if "_l_" in n else 2
        assert loop["HMMA"] == mi * 4, (n, loop)
        assert loop["LDSM"] == ldsm(mi), (n, loop)
        assert loop["LDGSTS"] >= 1 and loop["BAR"] == 1, (n, loop)
        assert whole["LDL"] == 0 and whole["STL"] == 0, (n, whole)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, n


def test_the_report_prints_a_row_per_entry_point(report, capsys):
    _, rows, _ = report
    text = R.format_reports([R.EntryReport(**{k: v for k, v in r.items()})
                             for r in rows.values()], "sm_90")
    assert len(text.splitlines()) == 2 + len(rows)
    assert "gpuconv_igemm_fp_f32_l_i32" in text


def test_cli_rejects_a_bad_arch(capsys):
    assert cli_main(["kernels", "--arch", "ninety"]) == 1
    assert "--arch 'ninety'" in capsys.readouterr().err


def test_occupancy_arithmetic():
    # 128 registers x 256 threads: 2 blocks (16 warps); 255 x 256: 1 block
    assert R.occupancy(128, 256, 17076) == (2, 16)
    assert R.occupancy(255, 256, 0) == (1, 8)
    assert R.occupancy(32, 256, 0) == (8, 64)   # warp limit
    assert R.occupancy(32, 64, 100 * 1024) == (2, 4)  # shared-memory limit


def test_cupy_cubin_one_byte_short_is_completed():
    import struct
    blob = bytearray(200)
    blob[:5] = b"\x7fELF\x02"
    struct.pack_into("<QQ", blob, 0x20, 100, 64)  # phoff, shoff
    struct.pack_into("<HHHH", blob, 0x36, 50, 2, 64, 0)
    assert len(R.complete_elf(bytes(blob[:199]))) == 200
    assert R.complete_elf(b"not an elf") == b"not an elf"
