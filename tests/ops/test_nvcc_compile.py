"""Layer 2 of the CUDA checks (toolchain.md §6.2): every csrc/cuda/*.cu compiles with the machine's
nvcc for sm_80 and sm_90 with the flags torch's CUDAExtension uses, ptxas reports no register
spills, and the object exports every extern "C" launcher declared in the matching <op>_launch.h.

The .cu files are torch-free, so this needs nvcc but no CUDA build of torch and no GPU. It does not
run the kernels (that needs a GPU). Without nvcc it skips, unless DUPFAST_CI_REQUIRE_NVCC=1, in
which case it fails: CI must not pass by skipping.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
CUDA_HOMES = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")


def _tool(name):
    """nvcc from PATH, else <CUDA_HOME>/bin; other tools from PATH. Skips when missing, or fails
    when DUPFAST_CI_REQUIRE_NVCC=1."""
    found = shutil.which(name)
    if found is None and name == "nvcc":
        for home in CUDA_HOMES:
            if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
                found = str(pathlib.Path(home) / "bin" / "nvcc")
                break
    if found is None:
        msg = f"{name} not found"
        if os.environ.get("DUPFAST_CI_REQUIRE_NVCC") == "1":
            pytest.fail(f"DUPFAST_CI_REQUIRE_NVCC=1 but {msg}")
        pytest.skip(f"{msg}; set DUPFAST_CI_REQUIRE_NVCC=1 to make this a failure")
    return found


def _torch_nvcc_flags():
    """The nvcc flags of setup.py's CUDAExtension, plus the ones torch adds to every .cu
    (cpp_extension.COMMON_NVCC_FLAGS: -D__CUDA_NO_HALF_CONVERSIONS__ and friends)."""
    from torch.utils import cpp_extension
    return ["-std=c++20", "-O3", "--use_fast_math", "-lineinfo", *cpp_extension.COMMON_NVCC_FLAGS]


def declared_launchers(header_text):
    """Names of the functions declared in a launcher header (comments and preprocessor lines dropped)."""
    text = re.sub(r"/\*.*?\*/", " ", header_text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    text = text.replace('extern "C"', " ").replace("{", ";").replace("}", ";")
    names = []
    for stmt in text.split(";"):
        if re.match(r"\s*(struct|class|typedef|using|enum|namespace)\b", stmt):
            continue
        m = re.match(r"[\w\s\*&:<>,]*?\b([A-Za-z_]\w*)\s*\(", stmt)
        if m:
            names.append(m.group(1))
    return names


def preprocessed(header):
    """The header's own declarations after the C preprocessor (launcher lists may be written once as
    X-macros); its #includes are dropped so only what it declares itself remains."""
    own = "\n".join(line for line in header.read_text().splitlines() if not line.lstrip().startswith("#include"))
    proc = subprocess.run([_tool("g++"), "-E", "-P", "-x", "c++", "-"], input=own,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_kl_launchers_expand_to_every_dtype_pair():
    names = declared_launchers(preprocessed(CSRC / "cuda" / "kl_launch.h"))
    tags = ("f32", "bf16", "f16")
    assert names == [f"dupfast_kl_rows_{s}_{t}" for s in tags for t in tags]


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_nvcc_skips_locally_and_fails_in_ci(monkeypatch, require):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "CUDA_HOMES", ())
    monkeypatch.setenv("DUPFAST_CI_REQUIRE_NVCC", require)
    expected = pytest.fail.Exception if require == "1" else pytest.skip.Exception
    with pytest.raises(expected, match="nvcc not found"):
        _tool("nvcc")


def test_launch_header_parser():
    text = '''#pragma once
    // int commented_out(int);
    struct CUstream_st;
    #ifdef __cplusplus
    extern "C" {
    #endif
    int dupfast_a(const void* x, int64_t n, struct CUstream_st* stream);
    /* int also_commented(void); */
    extern "C" void dupfast_b(float* y,
                              int n);
    #ifdef __cplusplus
    }
    #endif'''
    assert declared_launchers(text) == ["dupfast_a", "dupfast_b"]


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC / 'cuda'}: the glob or the layout is broken"


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_for_sm80_sm90_without_spills_and_exports_launchers(cu, tmp_path):
    nvcc = _tool("nvcc")
    nm = _tool("nm")
    header = cu.with_name(cu.name.replace("_kernel.cu", "_launch.h"))
    assert cu.name.endswith("_kernel.cu") and header.exists(), (
        f"{cu.name}: expected <op>_kernel.cu with its launchers declared in <op>_launch.h ({header.name})")
    declared = declared_launchers(preprocessed(header))
    assert declared, f"{header.name} declares no launcher"

    obj = tmp_path / (cu.stem + ".o")
    cmd = [nvcc, *_torch_nvcc_flags(), "--threads", "2", "-Xptxas", "-v", "-I", str(CSRC), "-c", str(cu), "-o", str(obj),
           *[f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {cu.name}:\n{' '.join(cmd)}\n{log[-6000:]}"

    for arch in ARCHS:
        assert re.search(rf"Compiling entry function '\w+' for '{arch}'", log), f"no {arch} kernels in:\n{log[-3000:]}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, f"ptxas -v printed no spill report:\n{log[-3000:]}"
    bad = [s for s in spills if s != ("0", "0")]
    assert not bad, f"{cu.name}: register spills (stores, loads) {bad}"

    out = subprocess.run([nm, "-g", "--defined-only", "-P", str(obj)], capture_output=True, text=True, check=True)
    exported = {f[0] for f in (line.split() for line in out.stdout.splitlines()) if len(f) >= 2 and f[1] == "T"}
    missing = sorted(set(declared) - exported)
    assert not missing, f"{cu.name} does not export launchers declared in {header.name}: {missing}"
