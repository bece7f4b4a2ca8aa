"""benchmarks/gpu_check.sh without a GPU: the dry run plans every measurement within the
time budget, the report prints every planned row (measured or not) with the summary
table last, and the host-overhead driver counts the launches a call makes."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ml_dtypes")  # the plan has bfloat16 rows

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import host_overhead  # noqa: E402

from gpuconv import _bench  # noqa: E402
from _layout import cuda  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(path)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(path.read_text()), r.stdout


def test_dry_run_plans_every_layer_pass_and_dtype(dry_run):
    plan, out = dry_run
    layers = list(_bench.LAYERS) + list(gpu_check.EXTRA_LAYERS)
    want = {(L["name"], p, dt) for L in layers for p in gpu_check.PASSES
            for dt in gpu_check.DTYPES if dt != "tf32" or L["group"] == "dense"}
    assert "tf32" in gpu_check.DTYPES  # TF32 on both sides ("high") beside TF32 off on both
    got = {(r["layer"], r["pass"], r["dtype"]) for r in plan["rows"]}
    assert got == want
    assert len(plan["rows"]) == len(want)  # none twice
    # the depthwise layers (MobileNetV2 3x3, ConvNeXt 7x7) are in the plan
    assert {"mbv2.dw3x3.56", "convnext.dw7x7.56"} <= {r["layer"] for r in plan["rows"]
                                                      if r["group"] == "depthwise"}
    # every planned row appears in the printed skeleton, and the summary comes last
    skeleton = out[out.index("== table skeleton"):]
    for L, p, dt in want:
        assert re.search(rf"^\| {re.escape(L)} \| {p} \| {dt} \| .*\| not run \|$", skeleton,
                         re.M), (L, p, dt)
    tail = out.strip().splitlines()
    assert tail[-1].startswith("| depthwise | weight_grad | bfloat16 |")
    assert any(line.startswith("GPU-CHECK-JSON ") for line in tail[-20:])


def test_dry_run_measurement_method(dry_run):
    plan, _ = dry_run
    l2 = plan["l2_bytes"]
    for r in plan["rows"]:
        assert 32 <= r["batch"] <= 64, r["id"]
        assert r["replays"] >= 20 and r["eager"] >= 20, r["id"]
        assert r["sets"] >= 3, r["id"]
        # rotated inputs exceed the L2 (twice over unless the set count is capped)
        assert r["rotated_bytes"] > l2, r["id"]
        assert r["rotated_bytes"] >= 2 * l2 or r["sets"] == gpu_check.MAX_SETS, r["id"]
        assert r["flops"] > 0 and r["bytes"] > 0 and r["planned_s"] > 0
        assert r["graph_out_bytes"] + 2 * r["rotated_bytes"] < 8 * 2**30  # fits with room


def test_dry_run_fits_the_time_budget(dry_run):
    plan, out = dry_run
    steps = {s["step"]: s for s in plan["steps"]}
    assert {"env", "ceilings", "precompile", "tests", "memcheck", "racecheck", "bench",
            "report"} <= set(steps)
    names = [s["step"] for s in plan["steps"]]
    assert names.index("ceilings") < names.index("bench")  # ceilings first
    assert names[-1] == "report"
    assert plan["planned_total_s"] <= 360  # about 6 minutes
    assert plan["bench_rows_planned_s"] <= steps["bench"]["planned_s"]
    assert plan["global_limit_s"] <= 480  # the script caps every step so it never passes 8 min
    for s in plan["steps"]:
        assert 0 < s["planned_s"] <= s["timeout_s"] <= plan["global_limit_s"]


def test_every_kernel_family_has_a_sanitizer_case(dry_run):
    plan, _ = dry_run
    sp = plan["sanitizer_cases"]
    families = {host_overhead.entry_family(n) for n in cuda().all_entry_names()}
    assert set(sp["families"]) == families
    assert sp["uncovered"] == []


def test_steps_are_shell_assignments():
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "steps"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0
    text = r.stdout
    for name, planned, timeout, _ in gpu_check.STEPS:
        assert f"PLAN_{name}={planned}; TIMEOUT_{name}={timeout}" in text
    assert f"GLOBAL_LIMIT={gpu_check.GLOBAL_LIMIT_S}" in text


def _spread(ms):
    return {"median": ms, "p10": ms, "p90": ms, "min": ms, "max": ms, "n": 24, "spread": 0.0}


def test_report_on_partial_results_derives_rows_and_marks_the_rest(tmp_path, capsys):
    ceil = {"copy_GBps": 4000.0, "matmul_GFLOPs": {"float32": 50000.0, "bfloat16": 800000.0,
                                                  "float16": 800000.0}}
    (tmp_path / "ceilings.json").write_text(json.dumps(ceil))
    rows = gpu_check.plan_rows()
    row = next(r for r in rows if r["id"] == "convnext.dw7x7.56|forward|float32")
    impl = {"timing": "graph", "stream_ms": 2.1, "eager_ms": _spread(2.2),
            "host_us": _spread(45.0)}
    rec = {"id": row["id"], "status": "ok", "gpuconv": {**impl, "device_ms": _spread(2.0)},
           "torch": {**impl, "device_ms": _spread(1.0)}}
    (tmp_path / "bench.jsonl").write_text(
        json.dumps(rec) + "\n" + json.dumps({"id": rows[0]["id"], "status": "skipped: deadline"})
        + "\n")
    (tmp_path / "steps.tsv").write_text("bench\ttimeout\t170\t170\n")
    full = gpu_check.report(str(tmp_path))
    out = capsys.readouterr().out
    d = next(r for r in full["rows"] if r["id"] == row["id"])["derived"]
    assert d["ratio"] == pytest.approx(0.5)
    assert d["gpuconv"]["GFLOPs"] == pytest.approx(row["flops"] / 2e-3 / 1e9)
    assert d["gpuconv"]["GBps"] == pytest.approx(row["bytes"] / 2e-3 / 1e9)
    t_floor = max(row["bytes"] / 4000e9, row["flops"] / 50000e9)
    assert d["gpuconv"]["frac"] == pytest.approx(t_floor / 2e-3)
    assert re.search(r"^\| convnext\.dw7x7\.56 \| forward \| float32 \| .* \| 0\.50 \| .* \| ok \|$",
                     out, re.M)
    assert re.search(rf"^\| {re.escape(rows[0]['layer'])} \| forward \| float32 \| .*"
                     rf"skipped: deadline \|$", out, re.M)
    summ = next(s for s in full["summary"] if (s["group"], s["pass"], s["dtype"])
                == ("depthwise", "forward", "float32"))
    assert summ["measured"] == 1 and summ["ratio_geomean"] == pytest.approx(0.5)
    js = json.loads(next(line for line in out.splitlines()
                         if line.startswith("GPU-CHECK-JSON "))[len("GPU-CHECK-JSON "):])
    assert js["rows_measured"] == 1 and js["steps"]["bench"]["rc"] == "timeout"
    assert out.strip().splitlines()[-1].startswith("| depthwise | weight_grad | bfloat16 |")
    assert (tmp_path / "gpu_check.json").exists()


def test_host_overhead_counts_the_launches_of_each_pass():
    rows = host_overhead.measure(["r50.res2.3x3", "mbv2.dw3x3.56"], batch=2, calls=3, rounds=1,
                                 profile=False)
    by = {(r["layer"], r["pass"]): r for r in rows}
    assert set(by) == {(L, p) for L in ("r50.res2.3x3", "mbv2.dw3x3.56")
                       for p in _bench.PASSES}
    fam = {k: {host_overhead.entry_family(n) for n in r["launches"]} for k, r in by.items()}
    known = {host_overhead.entry_family(n) for n in cuda().all_entry_names()} | {"copy"}
    for k, f in fam.items():
        assert f and f <= known, k
    # the dense 3x3 runs on the implicit-GEMM engine: at batch 2 the grid is under a
    # wave, so each pass is a split-K GEMM plus its fixed-order reduce; the input
    # gradient reads the weight as it is (no flipped copy)
    assert by[("r50.res2.3x3", "forward")]["launches"] == {"gpuconv_igemm_fp_f32_s_i32": 1,
                                                           "gpuconv_igemm_reduce_f32": 1}
    assert fam[("r50.res2.3x3", "input_grad")] == {"igemm_fp_s", "igemm_reduce"}
    assert fam[("r50.res2.3x3", "weight_grad")] == {"igemm_wg_s", "igemm_reduce"}
    for r in rows:
        assert r["call_us"] > 0
        assert r["stages"] and all(s["us"] > 0 for s in r["stages"])


@pytest.mark.parametrize("log,status", [
    ("CASE a | forward | float32 | rel 1e-7 | ok\nSANITIZE-CASES-DONE 1 cases, 0 wrong\n"
     "========= ERROR SUMMARY: 0 errors\n", "clean"),
    ("CASE a | forward | float32 | rel 1e-7 | ok\nSANITIZE-CASES-DONE 1 cases, 0 wrong\n"
     "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n", "PROBLEMS"),
    ("CASE a | forward | float32 | rel 3e-1 | WRONG\nSANITIZE-CASES-DONE 1 cases, 1 wrong\n"
     "========= ERROR SUMMARY: 0 errors\n", "PROBLEMS"),
    ("CASE a | forward | float32 | rel 1e-7 | ok\n========= ERROR SUMMARY: 0 errors\n",
     "incomplete"),
    ("========= Error: Device not supported\n", "skipped: compute-sanitizer refused the device"),
    ("SKIPPED: compute-sanitizer not found\n", "SKIPPED: compute-sanitizer not found"),
    ("Traceback (most recent call last):\nImportError: no cupy\n", "tool did not run the cases"),
])
def test_sanitizer_logs_are_read_strictly(tmp_path, log, status):
    (tmp_path / "sanitizer_memcheck.log").write_text(log)
    got = gpu_check._parse_sanitizer(tmp_path, "memcheck")
    assert got["status"].startswith(status), got
    assert gpu_check._parse_sanitizer(tmp_path, "racecheck") == {"status": "not run"}


@pytest.mark.slow
def test_whole_script_without_a_gpu_still_prints_the_table_last(tmp_path):
    """Every step that needs a GPU fails here; the script still ends cleanly, records
    each step, and prints the JSON line and the short table last."""
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    from gpuconv import backend_info
    if backend_info()["backends"]["cupy"]["usable"]:
        pytest.skip("a GPU works here: run benchmarks/gpu_check.sh itself")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), GPU_CHECK_SKIP="tests,env",
               GPUCONV_COMMIT="testcommit")
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("| depthwise | weight_grad | bfloat16 | 0/"), lines[-3:]
    js = json.loads(next(line for line in lines if line.startswith("GPU-CHECK-JSON "))
                    [len("GPU-CHECK-JSON "):])
    assert js["commit"] == "testcommit" and js["rows_measured"] == 0
    assert js["steps"]["tests"]["rc"] == "skipped" and js["steps"]["env"]["rc"] == "skipped"
    assert js["steps"]["ceilings"]["rc"] != "0"  # no device here
    assert js["checks"]["tests"] == {"status": "not run"}
    assert {"gpu_check.json", "gpu_check_rows.md", "report.txt",
            "gpu_check_logs.tar.gz"} <= {p.name for p in out.iterdir()}
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files


_HARNESS = r'''
import json, sys
from pathlib import Path
import gpu_check as G
out = Path(sys.argv[1])
G.CEIL_COPY_BYTES, G.CEIL_MATMUL_N, G.CEIL_PROBE_N, G.WARM_N = 2**16, 48, 32, 32
def layer(name, group, x, w, stride, padding, groups):
    return {"name": name, "model": "tiny", "x": x, "w": w, "stride": stride,
            "padding": padding, "groups": groups, "dilation": 1, "group": group}
G.suite_layers = lambda: [layer("tiny.dense3x3", "dense", (4, 9, 8), (6, 4, 3, 3), 1, 1, 1),
                          layer("tiny.dw3x3s2", "depthwise", (6, 9, 8), (6, 1, 3, 3), 2, 1, 6)]
G.gpu_batch = lambda L: 2
assert G.ceilings(str(out)) == 0
assert G.bench(str(out), deadline_s=120, seed=7) == 0
G.report(str(out))
'''


@pytest.mark.slow
def test_measuring_code_runs_end_to_end_on_a_stand_in_for_cupy(tmp_path):
    """The ceilings, bench and report code paths, run on tests/fakes/cupy (numpy arrays,
    host-clock events, graphs that replay nothing) and gpuconv's numpy backend: no
    NameError or wrong call is left for the first GPU run to find.  Timings mean nothing."""
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("real CUDA here: the stand-in would mix with it")
    except ImportError:
        pass
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests" / "fakes"), str(BENCH), str(ROOT)]))
    r = subprocess.run([sys.executable, "-c", _HARNESS, str(out)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ceil = json.loads((out / "ceilings.json").read_text())
    assert ceil["copy_GBps"] > 0 and ceil["matmul_GFLOPs"]["float32"] > 0
    recs = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 3 * 2 + 3  # layers x passes x dtypes, + TF32 for the dense layer
    assert sum(1 for r in recs if r["id"].endswith("|tf32")) == 3
    for rec in recs:
        assert rec["status"] == "ok", rec
        g = rec["gpuconv"]
        assert g["timing"] == "graph" and g["graph_matches_eager"] and g["finite"], rec
        assert g["device_ms"]["n"] >= 20 and g["eager_ms"]["n"] >= 20
        assert "torch" not in rec  # no CUDA PyTorch here
    full = json.loads((out / "gpu_check.json").read_text())
    assert sum(1 for r in full["rows"] if r["derived"].get("gpuconv")) == 15
    assert r.stdout.strip().splitlines()[-1].startswith("| depthwise | weight_grad | bfloat16 | 1/1 |")
