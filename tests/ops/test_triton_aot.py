"""The Triton kernels compile for sm_80 and sm_90 on a machine without a GPU (triton's own ptxas).

Slow (about a minute per architecture on 2 busy cores), so marked slow; the interpreter tests in
test_mahalanobis.py / test_transitions.py check the numbers, this checks the GPU compiler accepts them.
"""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "triton_aot_check.py"), "80,90", "16"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert proc.returncode == 0 and not any(ln.startswith("FAIL") for ln in lines), proc.stdout + proc.stderr[-3000:]
    assert len(lines) == 12, proc.stdout  # 2 archs x 2 dtypes x (2 mahalanobis + 1 layer_transitions)
