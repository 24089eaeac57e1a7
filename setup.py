"""Build dupfast's compiled ops.

CPU torch  -> CppExtension  dupfast._C  (csrc/*.cpp)
CUDA torch -> CUDAExtension dupfast._C  (csrc/*.cpp + csrc/*_cuda_binding.cpp + csrc/cuda/*.cu)
no torch   -> nothing is built; dupfast falls back to the pure-PyTorch reference ops.

Install with `pip install --no-build-isolation -e .` so the build sees the torch you installed.
Knobs: DUPFAST_FORCE_CPU=1, DUPFAST_REQUIRE_CUDA=1, DUPFAST_NATIVE=1, MAX_JOBS.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _pin_cuda_home():
    # torch guesses CUDA_HOME from `which nvcc`; here nvcc is a wrapper in /usr/local/bin,
    # which makes torch pick /usr/local. Pin it before cpp_extension is imported.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    for cand in ("/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


_pin_cuda_home()
try:
    import torch
    from torch.utils import cpp_extension as ce
except ImportError:
    torch = ce = None
    print("dupfast: torch is not importable at build time; no compiled ops will be built "
          "(install torch first, then `pip install --no-build-isolation -e .`)", file=sys.stderr)


def want_cuda():
    if os.environ.get("DUPFAST_FORCE_CPU") == "1":
        return False
    ok = bool(torch.version.cuda) and ce.CUDA_HOME is not None and os.path.exists(
        os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    if not ok and os.environ.get("DUPFAST_REQUIRE_CUDA") == "1":
        sys.exit(f"dupfast: DUPFAST_REQUIRE_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
                 f"CUDA_HOME={ce.CUDA_HOME!r}")
    return ok


def extensions():
    if ce is None:
        return []
    march = "-march=native" if os.environ.get("DUPFAST_NATIVE") == "1" else "-march=x86-64-v3"
    # -ffast-math only at compile time: on the link line gcc adds crtfastmath.o, which turns on
    # flush-to-zero for the whole process.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffast-math", march]
    binding = sorted(glob.glob(os.path.join("csrc", "*_cuda_binding.cpp")))
    cpu_sources = sorted(s for s in glob.glob(os.path.join("csrc", "*.cpp")) if s not in binding)
    common = dict(include_dirs=[CSRC], extra_link_args=["-fopenmp"])
    if want_cuda():
        if torch.cuda.device_count() == 0:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"dupfast: building CPU+CUDA extension, arch={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return [ce.CUDAExtension(
            "dupfast._C", cpu_sources + binding + cu,
            extra_compile_args={"cxx": cxx + ["-DDUPFAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            **common)]
    print("dupfast: building CPU-only extension")
    return [ce.CppExtension("dupfast._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": ce.BuildExtension.with_options(use_ninja=True)} if ce is not None else {},
)
