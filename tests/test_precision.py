"""float32 precision policy: set_float32_precision (call and context manager),
precision= per call, reported by backend_info()."""
import inspect

import numpy as np
import pytest

import gpuconv
from gpuconv import _api
from gpuconv import _precision as P
from gpuconv import reference as ref
from gpuconv.testing import assert_close


@pytest.fixture(autouse=True)
def _restore():
    before = gpuconv.get_float32_precision()
    yield
    gpuconv.set_float32_precision(before)


def test_default_is_highest_and_reported():
    assert gpuconv.get_float32_precision() == "highest"
    info = gpuconv.backend_info()
    assert info["float32_precision"] == "highest"
    assert info["tf32_kernels"] is True  # the CUDA backend has them (tests/test_igemm_tf32.py)


def test_set_persists_and_context_manager_restores():
    gpuconv.set_float32_precision("high")
    assert gpuconv.get_float32_precision() == "high"
    assert gpuconv.backend_info()["float32_precision"] == "high"
    gpuconv.set_float32_precision("highest")
    with gpuconv.set_float32_precision("high") as s:
        assert gpuconv.get_float32_precision() == "high" and s.precision == "high"
    assert gpuconv.get_float32_precision() == "highest"
    with pytest.raises(RuntimeError):
        with gpuconv.set_float32_precision("high"):
            raise RuntimeError("boom")
    assert gpuconv.get_float32_precision() == "highest"


@pytest.mark.parametrize("bad", ["fast", "HIGH", "medium", None, 32])
def test_bad_values_name_the_argument(bad):
    with pytest.raises(ValueError, match=r"set_float32_precision: precision must be one of "
                                         r"'highest', 'high', got"):
        gpuconv.set_float32_precision(bad)
    assert gpuconv.get_float32_precision() == "highest"
    x, w = np.ones((1, 2, 5), np.float32), np.ones((3, 2, 3), np.float32)
    if bad is not None:
        with pytest.raises(ValueError, match=r"conv1d: precision must be one of"):
            gpuconv.conv1d(x, w, precision=bad)


def test_every_convolution_function_takes_precision():
    names = [n for n in _api.__all__ if "backend" in inspect.signature(getattr(gpuconv, n)).parameters]
    assert len(names) >= 15
    for n in names:
        p = inspect.signature(getattr(gpuconv, n)).parameters["precision"]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None, n


def test_precision_per_call_is_in_force_for_that_call_only(monkeypatch):
    seen = []
    orig = _api._forward

    def spy(*a, **k):
        seen.append(P.effective())
        return orig(*a, **k)

    monkeypatch.setattr(_api, "_forward", spy)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = gpuconv.conv2d(x, w, padding=1, precision="high")
    assert seen == ["high"] and gpuconv.get_float32_precision() == "highest"
    assert P.effective() == "highest"
    # float32 on the CPU stays exact float32 under 'high'
    assert_close(y, ref.conv(x, w, None, padding=1), np.float32)
    with gpuconv.set_float32_precision("high"):
        gpuconv.conv2d(x, w, padding=1, precision="highest")
        gpuconv.conv2d(x, w, padding=1)
    assert seen == ["high", "highest", "high"]
    with pytest.raises(ValueError):  # a failing call does not leave its override behind
        gpuconv.conv2d(x, w[:, :2], precision="high")
    assert P.effective() == "highest"


def test_allow_tf32_only_for_float32_under_high():
    assert not P.allow_tf32(np.float32)
    with gpuconv.set_float32_precision("high"):
        assert P.allow_tf32(np.float32)
        assert not P.allow_tf32(np.float64) and not P.allow_tf32(np.float16)
