"""The Triton kernels compile for sm_80 and sm_90 on a machine without a GPU (triton's own ptxas).

Marked slow (20 variants for the two architectures: 30 s with an empty Triton cache on 2 busy cores, 5 s warm).
The interpreter tests in test_mahalanobis.py / test_transitions.py / test_kl.py / test_linear_kl.py check the
numbers, this checks the GPU compiler accepts them: Mahalanobis, layer transitions, and the KL row kernel (which
is also the whole Triton part of linear_kl_div: its GEMMs are torch's).
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
    # per arch: 2 dtypes x (2 mahalanobis + 1 layer_transitions), and 4 kl_rows (dtype pairs, weights, blocks)
    assert len(lines) == 20, proc.stdout
    for kernel, n in (("mahalanobis", 4), ("layer_transitions", 2), ("kl_rows", 4)):
        for arch in ("sm_80", "sm_90"):
            assert sum(ln.split()[1:3] == [kernel, arch] for ln in lines) == n, (kernel, arch, proc.stdout)
