"""Every CUDA entry point compiles -- without a GPU -- with no warnings and no spills.

NVRTC through CuPy's compiler (``nvidia-cuda-nvrtc`` from PyPI makes it work with
no driver) for sm_80 and sm_90, and nvcc -cubin -Xptxas -v where nvcc exists.
Also the launch helper's arithmetic for huge shapes, without launching.
"""
import io
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from gpuconv._cuda import launch as launch_helper
from gpuconv._cuda import sources as K
from gpuconv._cuda.plans import dgrad_phases, geo_args as _geo_args, wgrad_plan
from gpuconv._geometry import conv_geometry

ARCHS = ("sm_80", "sm_90")


def _ptxas_report(log):
    """{entry name: (registers, spill stores, spill loads, stack bytes)} from ptxas -v output."""
    out = {}
    for block in log.split("Compiling entry function")[1:]:
        name = block.split("'")[1]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                          block)
        regs = re.search(r"Used (\d+) registers", block)
        assert spill and regs, f"unparsed ptxas report for {name}:\n{block}"
        out[name] = (int(regs.group(1)), int(spill.group(2)), int(spill.group(3)),
                     int(spill.group(1)))
    return out


def _nvrtc_compiler():
    compiler = pytest.importorskip("cupy.cuda.compiler",
                                   reason="CuPy is not installed: NVRTC checks need cupy-cuda13x")
    try:
        prog = compiler._NVRTCProgram('extern "C" __global__ void f() {}', "probe.cu",
                                      method="cubin")
        prog.compile(options=("--gpu-architecture=sm_80",))
    except Exception as e:  # no NVRTC library
        pytest.skip(f"NVRTC is not usable here ({type(e).__name__}: {e}); "
                    f"pip install nvidia-cuda-nvrtc")
    return compiler


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pass_name", K.PASSES)
def test_nvrtc_compiles_every_entry_point_without_warnings_or_spills(pass_name, arch):
    compiler = _nvrtc_compiler()
    src = K.full_source(pass_name)
    prog = compiler._NVRTCProgram(src, f"{pass_name}.cu", method="cubin")
    log = io.StringIO()
    cubin, _ = prog.compile(options=(f"--gpu-architecture={arch}",) + K.compile_options()
                            + ("-Xptxas=-v",), log_stream=log)
    text = log.getvalue()
    assert cubin
    assert "warning" not in text.lower(), text
    report = _ptxas_report(text)
    expected = set(K.entry_names(pass_name))
    assert expected <= set(report), f"missing entry points: {sorted(expected - set(report))}"
    spilled = {n: r for n, r in report.items() if r[1] or r[2]}
    assert not spilled, f"register spills (name: regs, stores, loads, stack): {spilled}"


@pytest.mark.parametrize("pass_name", K.PASSES)
def test_nvcc_cubin_sm90_no_warnings_no_spills(pass_name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    src = tmp_path / f"{pass_name}.cu"
    src.write_text(K.full_source(pass_name))
    r = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++14", "-Xptxas", "-v",
                        "-Werror", "all-warnings", "-o", str(tmp_path / "out.cubin"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    report = _ptxas_report(r.stderr)
    assert set(K.entry_names(pass_name)) <= set(report)
    assert not {n: v for n, v in report.items() if v[1] or v[2]}, report


def test_entry_point_names_are_systematic():
    names = K.all_entry_names()
    assert len(names) == len(set(names))
    for n in names:
        assert (re.fullmatch(r"gpuconv_(fwd|fwdtile|dgrad|wgrad|wgradtile|wgrad_reduce|dw_fwd|dw_dgrad|dw_wgrad|dw_wgrad_reduce)_(f16|bf16|f32|f64)(_i32|_i64)?", n)
                or re.fullmatch(r"gpuconv_igemm_((fp|wg)_(f16|bf16|f32|f64)_[ls]_i(32|64)|reduce_(f16|bf16|f32|f64))", n)
                or re.fullmatch(r"gpuconv_igemm_((fp|wg)tc_(f16|bf16)_[ls]_i(32|64)|(fp|wg)tc_f32_[ls]_i(32|64)|wreorder_(f16|bf16|f32))", n)), n
    assert "gpuconv_fwd_bf16_i64" in names and "gpuconv_wgrad_reduce_f64" in names


def test_sources_are_self_contained_and_use_no_std_headers():
    for p in K.PASSES:
        src = K.full_source(p)
        assert "#include" not in src, "kernels must not #include (CuPy's cache key is the text)"
        assert src.startswith(K.config_header() + "// ---- common.cuh")


def test_generated_config_matches_python_constants():
    """The tile #defines and the dtype X-macro come from Python's tables only."""
    from gpuconv._geometry import DTYPES
    hdr = K.config_header()
    assert f"#define GC_TILE_M {K.TILE_M}\n" in hdr and f"#define GC_TILE_K {K.TILE_K}\n" in hdr
    for d in DTYPES.values():
        assert f"MACRO({d.suffix}, {d.ctype})" in hdr
    for name in K.list_sources():  # no kernel file defines them again
        text = K.read_source(name)
        assert not re.search(r"#define (GC_TILE_[MNK]|GC_FOR_EACH_DTYPE|GC_FOR_EACH_INDEX)\b", text), name


# ----------------------------------------------------------------------------- launch arithmetic
def test_grid_1d_caps_grid_and_stays_within_limits():
    for work in (0, 1, 255, 256, 257, 10**6, 2**31 - 1, 2**31, 2**40, 2**62):
        cfg = launch_helper.grid_1d(work)
        launch_helper.check_config(cfg)
        assert cfg.block == (256, 1, 1)
        assert 1 <= cfg.grid[0] <= launch_helper.MAX_BLOCKS_1D
        if work <= launch_helper.MAX_BLOCKS_1D * 256:
            assert cfg.grid[0] * 256 >= work  # one pass covers everything
            assert (cfg.grid[0] - 1) * 256 < max(work, 1)


@pytest.mark.parametrize("cfg,msg", [
    (launch_helper.LaunchConfig((0, 1, 1), (256, 1, 1)), "grid[0]"),
    (launch_helper.LaunchConfig((2**31, 1, 1), (256, 1, 1)), "grid[0]"),
    (launch_helper.LaunchConfig((1, 65536, 1), (256, 1, 1)), "grid[1]"),
    (launch_helper.LaunchConfig((1, 1, 1), (2048, 1, 1)), "block[0]"),
    (launch_helper.LaunchConfig((1, 1, 1), (64, 32, 1)), "2048 threads"),
    (launch_helper.LaunchConfig((1, 1, 1), (1, 1, 65)), "block[2]"),
])
def test_check_config_rejects_out_of_range_launches(cfg, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        launch_helper.check_config(cfg)


def test_check_config_rejects_too_much_shared_memory():
    with pytest.raises(ValueError, match="shared_mem"):
        launch_helper.check_config(launch_helper.LaunchConfig((1, 1, 1), (32, 1, 1)), shared_mem=1 << 20)


def test_launch_refuses_untyped_python_scalars():
    class Never:
        def launch(self, *a):
            raise AssertionError("must not launch")
    with pytest.raises(TypeError, match="untyped Python scalar"):
        launch_helper.launch(Never(), None, launch_helper.grid_1d(10), (np.int32(1), 5))


def test_int64_switch():
    assert not launch_helper.needs_int64(10, 2**20, launch_helper.INT32_SAFE)
    assert launch_helper.needs_int64(10, launch_helper.INT32_SAFE + 1)
    assert launch_helper.needs_int64(2**31)
    # the margin covers a grid-stride step past the end: idx + stride stays below 2^31
    assert launch_helper.INT32_SAFE + launch_helper.MAX_BLOCKS_1D * launch_helper.MAX_THREADS_PER_BLOCK <= 2**31 - 1


def test_backend_picks_i64_for_huge_tensors_without_launching():
    from gpuconv._cuda.backend import CudaBackend

    class Rt:
        name, xp = "fake", np

        def device_key(self):
            return 0

    be = CudaBackend(Rt())
    picked = []
    be.modules.function = lambda p, n: picked.append(n) or n
    g_small = conv_geometry("t", (2, 3, 8, 8), (4, 3, 3, 3), dtype=np.float32)
    g_huge = conv_geometry("t", (1, 1, 2**16, 2**15 + 2), (1, 1, 3, 3), dtype=np.float16)
    assert be._fn("fwd", g_small, 384, 108, 288)[1] == "i32"
    big = math.prod(g_huge.x_shape)
    assert big > 2**31
    assert be._fn("fwd", g_huge, big, 9, math.prod(g_huge.y_shape))[1] == "i64"
    assert picked == ["gpuconv_fwd_f32_i32", "gpuconv_fwd_f16_i64"]


@pytest.mark.parametrize("welems,red", [(1, 1), (9, 10**6), (36864, 25088), (2359296, 392),
                                        (10**9, 10**9), (1, 2**40), (2**33, 8)])
def test_wgrad_plan_covers_reduction_within_grid_limits(welems, red):
    gx, splits, chunk = wgrad_plan(welems, red)
    launch_helper.check_config(launch_helper.LaunchConfig((gx, splits, 1), (256, 1, 1)))
    assert splits * chunk >= red and (splits - 1) * chunk < red  # no empty split
    assert gx <= min(welems, launch_helper.MAX_BLOCKS_1D)


def test_geo_args_pad_lower_ranks_to_three_dims():
    g = conv_geometry("t", (2, 4, 9), (6, 2, 3), stride=2, padding=(1, 2), dilation=3, groups=2)
    a = _geo_args(g)
    assert all(type(v) is np.int32 for v in a)
    N, C, Kc, G, D, H, W, KD, KH, KW, OD, OH, OW, sd, sh, sw, dd, dh, dw, pd, ph, pw = map(int, a)
    assert (N, C, Kc, G) == (2, 4, 6, 2)
    assert (D, H, W, KD, KH, KW) == (1, 1, 9, 1, 1, 3)
    assert (OD, OH, OW) == (1, 1) + g.out_spatial
    assert (sd, sh, sw, dd, dh, dw, pd, ph, pw) == (1, 1, 2, 1, 1, 3, 0, 0, 1)


@pytest.mark.parametrize("s", range(1, 7))
@pytest.mark.parametrize("d", range(1, 7))
def test_dgrad_phase_parameters_enumerate_exactly_the_contributing_taps(s, d):
    """Host half of the stride-phase decomposition: r0 + j*step are exactly the
    taps with r*d = q (mod s) -- checked against brute force for every residue."""
    g = conv_geometry("t", (1, 1, 40), (1, 1, 7), stride=s, dilation=d)
    step, inv, gcd = (int(v) for v in dgrad_phases(g)[6:9])
    for q in range(3 * s):
        want = [r for r in range(30) if (r * d - q) % s == 0]
        res = q % s
        if res % gcd:
            got = []
        else:
            r0 = ((res // gcd) * inv) % step
            got = list(range(r0, 30, step))
        assert got == want, (s, d, q)


@pytest.mark.parametrize("blocks,red,align", [(1, 1, 16), (4, 10**6, 16), (2**20, 5, 16),
                                              (3, 2**40, 16), (1, 17, 16)])
def test_split_reduction_slices_are_aligned_and_cover_everything(blocks, red, align):
    from gpuconv._cuda.plans import split_reduction
    splits, chunk = split_reduction(blocks, red, 1024, 256, align)
    assert chunk % align == 0 and 1 <= splits <= 65535
    assert splits * chunk >= red and (splits - 1) * chunk < red
