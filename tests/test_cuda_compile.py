"""Every CUDA torch binding (csrc/*_cuda_binding.cpp) compiles, with the machine's nvcc, without a CUDA torch.

setup.py builds these files only under a CUDA torch (CUDAExtension), so a CPU-only machine never compiles them;
tests/ops/test_nvcc_compile.py covers the torch-free kernels (csrc/cuda/*.cu) but not the bindings that call
them. Here nvcc drives the host compiler over each binding, as the CUDAExtension build does (its cxx flags,
-DDUPFAST_WITH_CUDA, torch's headers, the toolkit's headers nvcc adds), to an object file: one nvcc process per
binding, ~10 s each on 2 busy cores. A CPU torch ships c10/cuda's headers but not the CMake-generated
c10/cuda/impl/cuda_cmake_macros.h, so a stub of it comes last on the include path (a CUDA torch's own wins).
The object's calls into the kernels (its undefined dupfast_* symbols) must all be launchers declared in
csrc/cuda/*_launch.h, which test_nvcc_compile.py checks the kernels export.

Without nvcc this skips, unless DUPFAST_CI_REQUIRE_NVCC=1 (set by .ci/run), in which case it fails: CI must not
pass by skipping.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
BINDINGS = sorted(CSRC.glob("*_cuda_binding.cpp"))
CUDA_HOMES = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")


def _required(what):
    """Skip for a missing tool or header, or fail when DUPFAST_CI_REQUIRE_NVCC=1."""
    if os.environ.get("DUPFAST_CI_REQUIRE_NVCC") == "1":
        pytest.fail(f"DUPFAST_CI_REQUIRE_NVCC=1 but {what}")
    pytest.skip(f"{what}; set DUPFAST_CI_REQUIRE_NVCC=1 to make this a failure")


def _nvcc():
    found = shutil.which("nvcc")
    for home in () if found else CUDA_HOMES:
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            found = str(pathlib.Path(home) / "bin" / "nvcc")
            break
    if found is None:
        _required("nvcc not found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
    return found


def _torch_includes():
    from torch.utils import cpp_extension
    paths = cpp_extension.include_paths()
    if not any((pathlib.Path(p) / "c10" / "cuda" / "CUDAGuard.h").exists() for p in paths):
        _required(f"this torch ships no c10/cuda headers ({paths})")
    return paths


def _launchers_declared():
    """The extern "C" launcher names of every csrc/cuda/*_launch.h, after the preprocessor (the KL launchers are
    written once as an X-macro); the headers' own #includes are dropped."""
    names = set()
    for header in sorted((CSRC / "cuda").glob("*_launch.h")):
        own = "\n".join(ln for ln in header.read_text().splitlines() if not ln.lstrip().startswith("#include"))
        proc = subprocess.run(["g++", "-E", "-P", "-x", "c++", "-"], input=own, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names |= set(re.findall(r"\b(dupfast_\w+)\s*\(", proc.stdout))
    return names


def test_every_op_has_a_binding():
    # the glob or the layout broke if this changes without a new op
    assert {b.name.removesuffix("_cuda_binding.cpp") for b in BINDINGS} == {
        "kl", "linear_kl", "mahalanobis", "token_mahalanobis", "transitions"}, BINDINGS


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_nvcc_skips_locally_and_fails_in_ci(monkeypatch, require):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "CUDA_HOMES", ())
    monkeypatch.setenv("DUPFAST_CI_REQUIRE_NVCC", require)
    expected = pytest.fail.Exception if require == "1" else pytest.skip.Exception
    with pytest.raises(expected, match="nvcc not found"):
        _nvcc()


@pytest.mark.parametrize("binding", BINDINGS, ids=[b.name for b in BINDINGS])
def test_cuda_binding_compiles_with_nvcc(binding, tmp_path):
    nvcc = _nvcc()
    includes = _torch_includes()
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    obj = tmp_path / (binding.stem + ".o")
    # setup.py's cxx flags for the CUDA build, at -O0 (this checks the code compiles, not how fast it runs)
    cmd = [nvcc, "-std=c++20", "-O0", "-Xcompiler", "-fopenmp,-fno-math-errno,-ffast-math", "-DDUPFAST_WITH_CUDA",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-I{CSRC}",
           *[f"-I{p}" for p in includes], f"-I{tmp_path / 'stub'}", "-c", str(binding), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}"

    nm = subprocess.run(["nm", "-u", "-P", str(obj)], capture_output=True, text=True, check=True)
    called = {ln.split()[0] for ln in nm.stdout.splitlines() if ln.startswith("dupfast_")}
    assert called, f"{binding.name} calls no dupfast_* launcher: it cannot run a kernel"
    unknown = sorted(called - _launchers_declared())
    assert not unknown, f"{binding.name} calls launchers no csrc/cuda/*_launch.h declares: {unknown}"
