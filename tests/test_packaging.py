"""The sdist carries everything a user's `pip install dupfast-*.tar.gz` compiles: every source setup.py hands the
compiler on a CPU torch and on a CUDA torch, every header they include, and every module of the package.

The sdist is built the way `python -m build --sdist` builds it (setuptools' PEP 517 hook build_sdist, here called
directly: no `build` package needed) with torch hidden from setup.py, as in build's isolated environment: then
setup.py declares no extension and the C++/CUDA files reach the sdist through MANIFEST.in alone. The full install
(compile, tiny detect, from outside the tree) is .ci/package_check: minutes, not part of this suite."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def clean_copy(dest: pathlib.Path) -> pathlib.Path:
    """The checkout's files as a clean clone has them (tracked, and untracked ones git does not ignore), without
    build outputs: an sdist built in the working tree also takes every file its dupfast.egg-info/SOURCES.txt
    lists from an earlier build, which would hide a MANIFEST.in that lost a line."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): all but the outputs
        ignore = shutil.ignore_patterns("*.egg-info", "build", "dist", ".venv", "runs", "site", "__pycache__", "*.so",
                                        ".git")
        shutil.copytree(ROOT, dest, ignore=ignore)
        return dest
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    """Paths inside the sdist built from a clean copy of this checkout (relative to its top folder)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = clean_copy(tmp / "src")
    assert not list(src.glob("*.egg-info"))
    hidden = tmp / "no-torch"
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text("raise ImportError('torch hidden: an isolated sdist build')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", hook, str(tmp / "dist")], cwd=src, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "torch is not importable at build time" in run.stderr  # setup.py saw no torch: no extension declared
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp / "dist" / name) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    top = {m.split("/", 1)[0] for m in members}
    assert top == {name.removesuffix(".tar.gz")}, top
    return {m.split("/", 1)[1] for m in members}


def _setup_namespace(monkeypatch):
    """setup.py executed with setuptools.setup a no-op (nothing is built): its functions, to ask which files
    extensions() compiles."""
    import setuptools
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the working directory, as pip runs it
    monkeypatch.setenv("DUPFAST_FORCE_CPU", "1")  # its top-level extensions() call: the CPU branch
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # extensions() would setdefault it in this process
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/nonexistent"))  # _pin_cuda_home leaves it
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec"), ns)
    return ns


def compiled_sources(monkeypatch):
    """{"cpu": [...], "cuda": [...]}: the sources setup.py's extensions() gives the compiler on each build."""
    ns = _setup_namespace(monkeypatch)
    if ns["ce"] is None:
        pytest.fail("setup.py found no torch in this environment: it declares no extension to compare with")
    fake = types.SimpleNamespace(
        CppExtension=lambda name, sources, **kw: ("cpu", name, sources),
        CUDAExtension=lambda name, sources, **kw: ("cuda", name, sources), CUDA_HOME="/nonexistent")
    out = {}
    for kind in ("cpu", "cuda"):
        ns["ce"], ns["want_cuda"] = fake, (lambda k=kind: k == "cuda")
        [(got, name, sources)] = ns["extensions"]()
        assert (got, name) == (kind, "dupfast._C")
        out[kind] = sorted(pathlib.Path(s).as_posix() for s in sources)
    return out


def included_headers(sources) -> set[str]:
    """Every file reached by `#include "..."` from `sources`, resolved like the compiler (the including file's folder,
    then csrc/: setup.py's include_dirs); system headers (<...>) are not ours."""
    seen, todo = set(), [ROOT / s for s in sources]
    while todo:
        f = todo.pop()
        for inc in re.findall(r'^\s*#\s*include\s*"([^"]+)"', f.read_text(), flags=re.M):
            for base in (f.parent, ROOT / "csrc"):
                cand = (base / inc).resolve()
                if cand.is_file():
                    rel = cand.relative_to(ROOT).as_posix()
                    if rel not in seen:
                        seen.add(rel)
                        todo.append(cand)
                    break
            else:
                pytest.fail(f'{f.relative_to(ROOT)} includes "{inc}", found neither beside it nor in csrc/')
    return seen


def test_setup_compiles_the_csrc_sources(monkeypatch):
    src = compiled_sources(monkeypatch)
    assert "csrc/module.cpp" in src["cpu"] and not any("cuda" in s for s in src["cpu"])
    assert set(src["cpu"]) < set(src["cuda"])
    assert any(s.endswith(".cu") for s in src["cuda"]) and any(s.endswith("_cuda_binding.cpp") for s in src["cuda"])


def test_sdist_holds_every_compiled_source_and_header(sdist_files, monkeypatch):
    src = compiled_sources(monkeypatch)
    needed = set(src["cpu"]) | set(src["cuda"])
    needed |= included_headers(needed)
    assert any(h.startswith("csrc/cuda/") and h.endswith(".h") for h in needed)  # the resolution found the launches
    missing = sorted(needed - sdist_files)
    assert not missing, f"the sdist lacks files setup.py compiles (MANIFEST.in: graft csrc): {missing}"


def test_sdist_holds_the_build_files_and_every_module(sdist_files):
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "PKG-INFO"):
        assert f in sdist_files, f
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dupfast").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - sdist_files)
    assert not missing, f"modules left out of the sdist (a folder without __init__.py?): {missing}"


def test_sdist_holds_no_build_outputs(sdist_files):
    outputs = sorted(f for f in sdist_files if f.endswith((".so", ".o", ".pyc", ".pyd")) or "__pycache__" in f)
    assert not outputs, outputs
