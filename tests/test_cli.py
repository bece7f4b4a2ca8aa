"""`python -m gpuconv`: exit codes, output, and a selftest that catches a broken backend."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gpuconv
import gpuconv._cpu as _numpy_backend
from gpuconv.__main__ import main


def test_no_arguments_prints_info_and_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"gpuconv {gpuconv.__version__}" in out
    assert "Backends" in out and "numpy    usable" in out
    assert "commands:" in out and "selftest" in out and "bench" in out


def test_info_lists_backends_devices_caches_workspace(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("NumPy", "BLAS", "cupy", "cudasim", "Devices", "Kernel caches",
                 "workspace limit"):
        assert word in out
    for name, b in gpuconv.backend_info()["backends"].items():
        if not b["usable"]:
            assert b["reason"] in out                      # says why


def test_info_json(capsys, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", "/tmp/somewhere")
    gpuconv.set_workspace_limit(64)
    try:
        assert main(["info", "--json"]) == 0
    finally:
        gpuconv.set_workspace_limit(256)
    info = json.loads(capsys.readouterr().out)
    assert info["gpuconv"]["version"] == gpuconv.__version__
    assert info["numpy"] == np.__version__
    assert set(info["backends"]) == {"numpy", "cupy", "cudasim"}
    assert info["backends"]["numpy"]["usable"] is True
    assert info["kernel_cache"]["cupy"]["dir"] == "/tmp/somewhere"
    assert info["workspace_limit_bytes"] == 64 * 2 ** 20


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gpuconv {gpuconv.__version__}"


@pytest.mark.parametrize("argv", [
    ["bogus"],
    ["selftest", "--backend", "tpu"],
    ["selftest", "--seed", "abc"],
    ["selftest", "--seed", "-3"],
    ["selftest", "--cases", "0"],
    ["bench", "--dtype", "int8"],
    ["bench", "--layers", "no.such.layer"],
    ["bench", "--batch", "0"],
    ["info", "--unknown-flag"],
])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["selftest", "--help"]) == 0
    assert "--backend" in capsys.readouterr().out


def test_selftest_passes_on_numpy(capsys):
    assert main(["selftest", "--backend", "numpy", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("numpy ")]
    dtypes = {"float16", "float32", "float64"}
    try:
        import ml_dtypes  # noqa: F401
        dtypes.add("bfloat16")
    except ImportError:
        pass
    assert len(rows) == 5 * len(dtypes)
    for p in ("forward", "input_grad", "weight_grad", "bias_grad", "transpose"):
        assert {r.split()[2] for r in rows if r.split()[1] == p} == dtypes
    assert all(r.rstrip().endswith("ok") for r in rows)
    assert "selftest passed" in out and "seed 0" in out


def test_selftest_default_runs_every_usable_backend(capsys):
    # Whether every backend passes is the backends' own tests' business; here:
    # each usable backend gets its rows and the exit status agrees with them.
    rc = main(["selftest", "--seed", "5", "--cases", "1"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for b in gpuconv.available_backends():
        assert len([l for l in lines if l.startswith(f"{b} ")]) >= 5 * 3
    any_fail = any(l.rstrip().endswith("FAIL") for l in lines)
    assert rc == (1 if any_fail else 0)


@pytest.mark.parametrize("method,bad_passes", [("input_grad", {"input_grad", "transpose"}),
                                               ("weight_grad", {"weight_grad"})])
def test_selftest_catches_a_broken_backend(monkeypatch, capsys, method, bad_passes):
    original = getattr(_numpy_backend.NumpyBackend, method)

    def broken(self, *args):
        out = original(self, *args)
        flat = out.reshape(-1)
        flat[-1] = flat[-1] + 0.5 * np.abs(flat).max().astype(out.dtype) + 1  # one wrong element
        return out

    monkeypatch.setattr(_numpy_backend.NumpyBackend, method, broken)
    assert main(["selftest", "--backend", "numpy", "--seed", "1"]) == 1
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines() if l.startswith("numpy ")]
    failed = {(r[1], r[2]) for r in rows if r[-1] == "FAIL"}
    # transpose runs on the input-gradient path, so it breaks with it
    assert failed and all(p in bad_passes for p, _ in failed)
    # float32/float64 rows of the broken passes must fail; untouched passes stay ok
    for p in bad_passes:
        assert (p, "float32") in failed and (p, "float64") in failed
    assert all(r[-1] == "ok" for r in rows if r[1] in ("forward", "bias_grad"))
    assert "SELFTEST FAILED" in out


def test_selftest_reports_a_crashing_backend(monkeypatch, capsys):
    def crash(self, *args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(_numpy_backend.NumpyBackend, "forward", crash)
    assert main(["selftest", "--backend", "numpy", "--seed", "2", "--cases", "1"]) == 1
    captured = capsys.readouterr()
    assert "kernel exploded" in captured.out and "ERROR" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_selftest_fails_when_only_one_case_crashes(monkeypatch, capsys):
    """A crash in the first case of a rank must not be hidden by later good cases."""
    original = _numpy_backend.NumpyBackend.forward
    calls = {"n": 0}

    def crash_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first call exploded")
        return original(self, *args)

    monkeypatch.setattr(_numpy_backend.NumpyBackend, "forward", crash_once)
    assert main(["selftest", "--backend", "numpy", "--seed", "3", "--cases", "3"]) == 1
    out = capsys.readouterr().out
    assert "first call exploded" in out and "SELFTEST FAILED" in out


def test_selftest_on_unusable_backend_says_why(capsys):
    missing = [b for b in ("cupy", "cudasim") if b not in gpuconv.available_backends()]
    if not missing:
        pytest.skip("every backend is usable here")
    assert main(["selftest", "--backend", missing[0]]) == 1
    err = capsys.readouterr().err
    assert "cannot run here" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- bench
@pytest.fixture
def bench_module():
    return pytest.importorskip("gpuconv._bench")


def test_bench_small_layer_json(bench_module, tmp_path, capsys):
    path = tmp_path / "rows.json"
    rc = main(["bench", "--backend", "numpy", "--layers", "r50.res5.1x1", "--batch", "1",
               "--json", str(path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "GFLOP/s" in captured.out and "r50.res5.1x1" in captured.out
    assert "bench [" in captured.err and "1/1" in captured.err          # progress on stderr
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    assert {r["pass"] for r in rows} == {"forward", "input_grad", "weight_grad"}
    for r in rows:
        assert r["backend"] == "numpy" and r["time_ms"] > 0 and r["gflops"] > 0
        assert r["gbps"] > 0


def test_bench_plot_without_matplotlib_is_a_clear_error(bench_module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import fails
    assert main(["bench", "--layers", "r50.res5.1x1", "--plot", "out.png"]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err and "Traceback" not in err


def test_bench_plot_writes_png(bench_module, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(["bench", "--layers", "r50.res5.1x1", "--batch", "1", "--no-peers",
                 "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unusable_backend(bench_module, capsys):
    if "cupy" in gpuconv.available_backends():
        pytest.skip("cupy is usable here")
    assert main(["bench", "--backend", "cupy"]) == 1
    assert "cannot run here" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "gpuconv", "info"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Backends" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gpuconv", "selftest", "--backend", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cli_docstring_examples():
    import doctest
    from gpuconv import _cli
    res = doctest.testmod(_cli)
    assert res.attempted > 0 and res.failed == 0


def test_bench_prints_load_no_empty_target_columns_and_a_peer_hint(bench_module, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(bench_module, "_torch_available", lambda device="cpu": False)
    rc = main(["bench", "--backend", "numpy", "--layers", "r50.res5.1x1", "--batch", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "other-process load:" in out and "CPUs busy before the run" in out
    assert "| target |" not in out and "| met |" not in out   # never shown without targets
    assert "PyTorch is not installed" in out and "pip install torch" in out
    assert "alternating rounds" in out


def test_bench_summary_targets_only_when_given(bench_module):
    summary = {"dense": {"forward": 1.2}}
    assert "target" not in bench_module.format_summary(summary)
    with_t = bench_module.format_summary(summary, {("dense", "forward"): 1.0})
    assert "| target | met |" in with_t and "| 1.00 | yes |" in with_t


def test_bench_interleaves_gpuconv_and_the_peer(bench_module):
    calls = []
    ta, tb = bench_module._interleaved_times(lambda: calls.append("a"),
                                             lambda: calls.append("b"), repeats=3, warmup=1)
    # warm-up a b, then per round: a (discarded) a (timed), b (discarded) b (timed)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert ta >= 0 and tb >= 0
