"""benchmarks/gpu_check.sh parses, and its CPU dry run (--cpu-dry-run --smoke: every step's CPU path on tiny
shapes, ~50 s on 2 busy cores) writes the one JSON: every step with its rc and seconds, test counts for the
pytest steps, benchmark figures for the benchmark steps, the skipped steps marked, the JSON path printed."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("env", "build", "ext_check", "ops_device", "bench_kernels", "bench_detect", "bench_scale", "torchrun",
         "ops_compile")
SMOKE_SKIPPED = {"build", "torchrun", "ops_compile"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_option_is_an_error(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--no-such-option"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 2 and "unknown option" in proc.stderr


@pytest.mark.slow  # six steps, each a fresh interpreter importing torch: ~50 s on 2 busy cores
def test_cpu_dry_run_writes_the_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("DUPFAST_BENCH_DEVICE", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    path = tmp_path / "gpu_check.json"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"gpu_check: {path}"
    report = json.loads(path.read_text())
    assert report["mode"] == "cpu-dry-run-smoke" and report["total_s"] < report["budget_s"] == 450
    assert tuple(report["steps"]) == STEPS
    assert report["env"]["torch"] and "cuda_available" in report["env"]
    for name, step in report["steps"].items():
        assert {"rc", "seconds", "timeout", "kind", "ok"} <= set(step), name
        if name in SMOKE_SKIPPED:
            assert step["rc"] is None and step["ok"] is None and "skipped" in step["note"], (name, step)
            continue
        assert step["rc"] == 0 and step["ok"] and not step["timed_out"], (name, step.get("log_tail"))
        assert 0 < step["seconds"] <= step["timeout"], (name, step)
        if step["kind"] in ("pytest", "bench"):
            t = step["tests"]
            assert t["passed"] > 0 and t["failed"] == t["errors"] == 0, (name, t)
    assert report["summary"] == {"steps_run": 6, "steps_ok": 6, "steps_failed": [],
                                 "steps_skipped": sorted(SMOKE_SKIPPED, key=STEPS.index)}
    assert all(report["steps"]["ext_check"]["ext"]["cpu_ops"].values())
    kernels = report["steps"]["bench_kernels"]["benchmarks"]
    assert any("ratio_vs_reference_wall" in b for b in kernels.values())
    assert any("speedup_median" in b for b in kernels.values())
    assert "ratio_bare_over_detect" in report["steps"]["bench_detect"]["results"]
    scale = report["steps"]["bench_scale"]
    assert [p["n"] for p in scale["points"]] == [200, 400]
    assert scale["results"]["default"]["retained_feature_bytes_per_input"] > 0
    assert (tmp_path / "gpu_check_logs" / "ops_device.log").is_file()


def _run(tmp_path, *args, **env):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    env.pop("DUPFAST_BENCH_DEVICE", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    path = tmp_path / "gpu_check.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return proc, report


def test_a_failing_step_does_not_stop_the_others(tmp_path):
    """A python whose `-m pytest` fails (exit 3): both selected steps run and are recorded with that rc, the JSON
    is still written and its path printed, and the script exits 1."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exit 3; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    proc, report = _run(tmp_path, "--python", str(fake), "--only", "ops_device,bench_kernels")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"gpu_check: {tmp_path / 'gpu_check.json'}"
    assert "2 step(s) failed" in proc.stderr
    assert report["steps"]["ops_device"]["rc"] == 3 and report["steps"]["bench_kernels"]["rc"] == 3
    assert report["summary"]["steps_failed"] == ["ops_device", "bench_kernels"]
    assert report["steps"]["env"]["note"] == "skipped by option"


@pytest.mark.parametrize("only, force, rc, failed", [
    ("env", "", 0, []),                                # every step that ran passed: exit 0
    ("env,ext_check", "ext_check", 1, ["ext_check"]),  # the last step fails: exit 1, after the JSON
])
def test_exit_status_says_whether_a_step_failed(tmp_path, only, force, rc, failed):
    """GPU_CHECK_FORCE_FAIL fails the named steps on purpose: the exit status is 1 exactly when a step that ran
    failed, and the JSON is written either way with each step's own rc."""
    proc, report = _run(tmp_path, "--only", only, GPU_CHECK_FORCE_FAIL=force)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report is not None, "no JSON written"
    assert report["summary"]["steps_failed"] == failed
    assert report["summary"]["steps_run"] == len(only.split(","))
    for name in only.split(","):
        assert report["steps"][name]["rc"] == (1 if name in failed else 0), (name, report["steps"][name])
    for name in failed:
        assert "failing this step on purpose" in (tmp_path / "gpu_check_logs" / f"{name}.log").read_text()
