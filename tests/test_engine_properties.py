"""The implicit-GEMM engine's tensor-op policies on random geometry (hypothesis), on the
emulated CUDA backend: float16 / bfloat16 (mma m16n8k16) and float32 under precision
"high" (TF32, m16n8k8) -- forward (with and without bias), input grad, weight grad --
against the float64 reference.

GPUCONV_CUDA_ALGO=igemm sends every layer the engine fits to it, so the tiny, awkward
shapes of tests/test_properties.py (channel counts of 1-6, K = 1, N = 0, odd sizes,
every stride / dilation / padding form, 1-3-D, groups, non-contiguous layouts) reach the
tensor-op entries; the test also checks that they really ran (the launches' kernel names).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import gpuconv
from gpuconv import reference as ref
from gpuconv import testing as gt

cudasim = pytest.importorskip("gpuconv.testing.cudasim")
ml_dtypes = pytest.importorskip("ml_dtypes")

from test_igemm_tf32 import tf32_bound, tf32_bound_dgrad, tf32_bound_wgrad  # noqa: E402
from test_properties import _settings, conv_cases, f64, make_array, run_all_passes  # noqa: E402

SIM_OK, SIM_WHY = cudasim.probe()[:2]
pytestmark = pytest.mark.skipif(not SIM_OK, reason=f"cudasim unusable: {SIM_WHY}")
EXAMPLES = 0.3  # of the emulator's example count in test_properties (50): 15 a test


def _to_sim(a):
    return None if a is None else gt.as_backend_array(a, "cudasim")


@pytest.fixture
def engine(monkeypatch):
    monkeypatch.setenv("GPUCONV_CUDA_ALGO", "igemm")
    monkeypatch.delenv("GPUCONV_IGEMM_CONFIG", raising=False)
    monkeypatch.delenv("GPUCONV_IGEMM_SPLITS", raising=False)
    with gpuconv.use_backend("cudasim"), cudasim.count_bank_conflicts() as launches:
        yield launches


def _ran(launches, prefix):
    return {r["kernel"] for r in launches if r["kernel"].startswith(prefix)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_random_geometry(engine, dtype):
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

    @_settings("cudasim", EXAMPLES)
    @given(case=conv_cases(small=True, dtypes=(dt,)))
    def inner(case):
        run_all_passes(case, _to_sim, np.ndarray)

    inner()
    tag = "bf16" if dtype == "bfloat16" else "f16"
    assert _ran(engine, f"gpuconv_igemm_fptc_{tag}_"), "the tensor-op forward never ran"
    assert _ran(engine, f"gpuconv_igemm_wgtc_{tag}_"), "the tensor-op weight grad never ran"
    assert engine.conflicts == 0, engine.worst()


def test_tf32_random_geometry(engine):
    @_settings("cudasim", EXAMPLES)
    @given(case=conv_cases(small=True, dtypes=(np.dtype(np.float32),)))
    def inner(case):
        rng = np.random.default_rng(case.seed)
        x = make_array(rng, case.x_shape, np.float32, case.layout)
        w = make_array(rng, case.w_shape, np.float32, case.layout)
        kw = case.kw
        y_shape = gpuconv.conv_output_shape(case.x_shape, case.w_shape, **kw)
        gy = make_array(rng, y_shape, np.float32, case.layout)
        x64, w64, gy64 = f64(x), f64(w), f64(gy)
        with gpuconv.set_float32_precision("high"):
            got = (gpuconv.conv(_to_sim(x), _to_sim(w), **kw),
                   gpuconv.conv_input_grad(_to_sim(gy), _to_sim(w), case.x_shape, **kw),
                   gpuconv.conv_weight_grad(_to_sim(x), _to_sim(gy), case.w_shape, **kw))
        want = (ref.conv(x64, w64, **kw), ref.conv_input_grad(gy64, w64, case.x_shape, **kw),
                ref.conv_weight_grad(x64, gy64, case.w_shape, **kw))
        bounds = (tf32_bound(x, w, **kw), tf32_bound_dgrad(gy, w, case.x_shape, **kw),
                  tf32_bound_wgrad(x, gy, case.w_shape, **kw))
        for what, g, e, bd in zip(("forward", "input grad", "weight grad"), got, want, bounds):
            g = f64(g)
            assert g.dtype == np.float64 and g.shape == e.shape, (what, case)
            assert np.isfinite(g).all(), (what, case)
            err = np.abs(g - e)
            assert (err <= bd).all(), (f"{what}: {(err > bd).sum()} elements outside the TF32 "
                                       f"bound (worst {(err / bd).max():.3g}x) for {case}")

    inner()
    assert _ran(engine, "gpuconv_igemm_fptc_f32_"), "the TF32 forward never ran"
    assert _ran(engine, "gpuconv_igemm_wgtc_f32_"), "the TF32 weight grad never ran"
    assert engine.conflicts == 0, engine.worst()
