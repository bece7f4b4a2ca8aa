"""Backend selection, availability probes, and what ``import gpuconv`` pulls in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpuconv
from gpuconv import _dispatch

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
W = np.random.default_rng(1).standard_normal((3, 2, 3, 3))


def run_python(code, env_extra=None, cwd=None):
    """Run code in a fresh interpreter that imports gpuconv from this checkout."""
    env = dict(os.environ)
    env.pop("GPUCONV_BACKEND", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, cwd=cwd or REPO, timeout=120)
    assert r.returncode == 0, f"subprocess failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


# ----------------------------------------------------------------------------- backend_info
def test_backend_info_structure():
    info = gpuconv.backend_info()
    assert set(info) >= {"backends", "forced"}
    assert set(info["backends"]) == {"numpy", "cupy", "cudasim"}
    for name, b in info["backends"].items():
        assert isinstance(b["usable"], bool), name
        if b["usable"]:
            assert b["reason"] is None, name
        else:
            assert isinstance(b["reason"], str) and b["reason"], name
    assert info["backends"]["numpy"]["usable"] is True
    assert info["backends"]["numpy"]["numpy_version"] == np.__version__
    assert info["forced"] is None
    json.dumps(info, default=str)  # printable (python -m gpuconv info)


def test_backend_info_reports_forced():
    with gpuconv.use_backend("numpy"):
        assert gpuconv.backend_info()["forced"] == "numpy"


def test_cupy_unusable_without_device_says_why():
    info = gpuconv.backend_info()["backends"]["cupy"]
    if info["usable"]:
        assert info["devices"], "a usable cupy backend lists its devices"
        pytest.skip("a CUDA device works here")
    reason = info["reason"].lower()
    assert any(w in reason for w in ("driver", "device", "cuda", "not installed")), reason
    try:
        import cupy  # noqa: F401
    except Exception:
        assert "not installed" in reason or "failed to import" in reason
    else:
        # cupy imports here: the reason must be about the driver / device, not the install
        assert "driver" in reason or "device" in reason, reason


def test_available_backends():
    names = gpuconv.available_backends()
    assert names[0] == "numpy"
    assert set(names) <= {"numpy", "cupy", "cudasim"}
    info = gpuconv.backend_info()["backends"]
    assert names == [n for n in ("numpy", "cupy", "cudasim") if info[n]["usable"]]


def test_unavailable_backend_raises_with_reason():
    info = gpuconv.backend_info()["backends"]
    missing = [n for n in ("cudasim", "cupy") if not info[n]["usable"]]
    if "cudasim" not in missing:
        pytest.skip("the emulator is usable here")
    with pytest.raises(gpuconv.BackendUnavailableError, match="'cudasim' cannot run here"):
        gpuconv.conv(X, W, backend="cudasim")


# ----------------------------------------------------------------------------- forcing
def test_env_cupy_with_numpy_arrays(monkeypatch):
    monkeypatch.setenv("GPUCONV_BACKEND", "cupy")
    with pytest.raises(TypeError, match=r"backend 'cupy' was requested but the inputs are numpy "
                                        r"arrays.*cupy\.asarray"):
        gpuconv.conv(X, W)


@pytest.mark.parametrize("value", ["bogus", "gpu", "torch"])
def test_env_bogus(monkeypatch, value):
    monkeypatch.setenv("GPUCONV_BACKEND", value)
    with pytest.raises(ValueError, match=f"GPUCONV_BACKEND.*unknown backend '{value}'"):
        gpuconv.conv(X, W)


@pytest.mark.parametrize("value", ["numpy", "NumPy", " numpy ", "auto", ""])
def test_env_accepted(monkeypatch, value):
    monkeypatch.setenv("GPUCONV_BACKEND", value)
    y = gpuconv.conv(X, W)
    assert y.shape == (1, 3, 3, 3)


def test_use_backend_nesting(monkeypatch):
    monkeypatch.delenv("GPUCONV_BACKEND", raising=False)
    assert _dispatch.requested_backend() is None
    with gpuconv.use_backend("cupy"):
        assert _dispatch.requested_backend() == "cupy"
        with gpuconv.use_backend("numpy"):
            assert _dispatch.requested_backend() == "numpy"
            assert gpuconv.conv(X, W).shape == (1, 3, 3, 3)
            with gpuconv.use_backend(None):
                assert _dispatch.requested_backend() is None
            assert _dispatch.requested_backend() == "numpy"
        assert _dispatch.requested_backend() == "cupy"
        with pytest.raises(TypeError, match="backend 'cupy' was requested"):
            gpuconv.conv(X, W)
        # an explicit per-call backend wins over the context
        assert gpuconv.conv(X, W, backend="numpy").shape == (1, 3, 3, 3)
    assert _dispatch.requested_backend() is None


def test_use_backend_restored_after_exception():
    with pytest.raises(RuntimeError):
        with gpuconv.use_backend("cudasim"):
            raise RuntimeError("boom")
    assert _dispatch.requested_backend() is None


def test_use_backend_beats_environment(monkeypatch):
    monkeypatch.setenv("GPUCONV_BACKEND", "cupy")
    with gpuconv.use_backend("numpy"):
        assert gpuconv.conv(X, W).shape == (1, 3, 3, 3)
    with gpuconv.use_backend("auto"):  # clears the forcing in this block; the env then applies
        assert _dispatch.requested_backend() == "cupy"


def test_explicit_auto_ignores_forcing(monkeypatch):
    monkeypatch.setenv("GPUCONV_BACKEND", "cupy")
    assert gpuconv.conv(X, W, backend="auto").shape == (1, 3, 3, 3)


# ----------------------------------------------------------------------------- import hygiene
def test_import_does_not_import_cupy():
    out = run_python("""
        import sys, gpuconv, numpy as np
        y = gpuconv.conv(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)))
        print('cupy' in sys.modules, float(y.sum()))
    """, env_extra={"GPUCONV_PRECOMPILE": "0"})
    assert out.split() == ["False", "36.0"]


def test_import_does_not_import_cupy_without_a_device():
    """With the default settings gpuconv imports CuPy at import time only to
    precompile on a machine with a working CUDA device."""
    if gpuconv.backend_info()["backends"]["cupy"]["usable"]:
        pytest.skip("a CUDA device works here: import-time precompilation may import cupy")
    out = run_python("import sys, gpuconv; print('cupy' in sys.modules)")
    assert out.split() == ["False"]


def test_import_works_when_cupy_is_unimportable():
    out = run_python("""
        import sys
        sys.modules['cupy'] = None          # any 'import cupy' now raises ImportError
        import gpuconv, numpy as np
        y = gpuconv.conv(np.ones((1, 2, 4)), np.ones((3, 2, 2)), padding='same')
        info = gpuconv.backend_info()['backends']['cupy']
        print(y.shape, info['usable'], 'not installed' in info['reason'] or 'import' in info['reason'])
        print('numpy' in gpuconv.available_backends(), 'cupy' in gpuconv.available_backends())
    """)
    assert out.splitlines() == ["(1, 3, 4) False True", "True False"]
