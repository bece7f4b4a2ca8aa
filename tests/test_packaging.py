"""The wheel ships the CUDA sources, and an installed gpuconv finds them.

Builds a wheel from a copy of the package sources (so the shared checkout gets
no build/ or egg-info), installs it into a fresh virtual environment
(``--system-site-packages`` so numpy need not be downloaded; the installed
gpuconv must still come from the wheel, which the test asserts) and lists the
kernel sources from there, from a working directory outside the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import gpuconv
from gpuconv._cuda import sources as _kernels

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"common.cuh", "conv_fwd.cu", "conv_dgrad.cu", "conv_wgrad.cu"}


def repo_kernel_files():
    d = REPO / "kernels"
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".cu", ".cuh"))) \
        if d.is_dir() else []


def _clean_env():
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "GPUCONV_BACKEND"):
        env.pop(k, None)
    env["GPUCONV_PRECOMPILE"] = "0"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(cmd, cwd, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _copy_sources(dst: Path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "*.egg-info", "build",
                                    ".hypothesis")
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dst / name)
    for name in ("gpuconv", "kernels"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    _copy_sources(src)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist)], cwd=tmp)
    wheels = list(dist.glob("gpuconv-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_kernel_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("gpuconv/kernels/")
                     and n.endswith((".cu", ".cuh")))
    assert shipped == repo_kernel_files()
    if REQUIRED <= set(repo_kernel_files()):
        assert REQUIRED <= set(shipped)
    assert "gpuconv/__init__.py" in names and "gpuconv/testing/__init__.py" in names
    assert "gpuconv/_cpu/dwconv.cpp" in names  # the native CPU kernels' source


@pytest.mark.slow
def test_installed_wheel_lists_kernel_sources(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    probe = textwrap.dedent("""
        import json, gpuconv
        from importlib.resources import files
        from gpuconv._cuda import sources as _kernels
        try:
            listed = _kernels.list_sources()
        except FileNotFoundError as e:
            listed = "missing: %s" % e
        pkg = sorted(p.name for p in files("gpuconv.kernels").iterdir()
                     if p.name.endswith((".cu", ".cuh")))
        from gpuconv._cpu import native
        print(json.dumps({"file": gpuconv.__file__, "listed": listed, "package_data": pkg,
                          "version": gpuconv.__version__, "native_src": str(native.SOURCE),
                          "native_src_exists": native.SOURCE.is_file()}))
    """)
    out = json.loads(_run([str(py), "-c", probe], cwd=tmp_path).strip().splitlines()[-1])
    installed = Path(out["file"]).resolve()
    assert venv.resolve() in installed.parents, f"gpuconv imported from {installed}, not the venv"
    assert REPO not in installed.parents
    expected = repo_kernel_files()
    assert out["package_data"] == expected
    if (REPO / "kernels" / _kernels.COMMON).is_file():
        assert out["listed"] == expected
        assert REQUIRED <= set(out["listed"])
    else:  # the kernel sources are not written yet: the loader must say so
        assert str(out["listed"]).startswith("missing:")
    assert out["version"] == gpuconv.__version__
    assert out["native_src_exists"] and venv.resolve() in Path(out["native_src"]).resolve().parents


def test_in_repo_import_lists_the_same_sources():
    expected = repo_kernel_files()
    if not (REPO / "kernels" / _kernels.COMMON).is_file():
        with pytest.raises(FileNotFoundError, match="kernel sources not found"):
            _kernels.list_sources()
        return
    assert _kernels.list_sources() == expected
    assert REQUIRED <= set(expected)
    for name in REQUIRED:
        assert _kernels.read_source(name) == (REPO / "kernels" / name).read_text(encoding="utf-8")
