# The README's commands. Everything installs into .venv from the project's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch==2.13.0 is a CPU build on these machines; a bare "torch" would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
CSRC := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: setup build demo test test-wheel bench lint clean

setup: $(VENV)/.deps $(VENV)/.torchrec build

$(VENV)/.deps: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

# The TorchRec extra (adsparse[torchrec]) without dependencies: torchrec's own would pull the
# CUDA build of fbgemm_gpu, which fails to load on a CPU machine. The pins live in the file.
$(VENV)/.torchrec: requirements-torchrec.txt $(VENV)/.deps
	$(PIP) install -q --no-deps -r requirements-torchrec.txt
	$(PY) -c "import torchrec, torchrec.distributed"
	touch $@

# Rebuild the C++ extension in place whenever a kernel source changes.
build: python/adsparse/.built
python/adsparse/.built: $(VENV)/.deps $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(VENV)/bin/adsparse run

test: setup
	$(PY) -m pytest -q tests

# Builds the wheel (the C++ extension: minutes), installs it outside the checkout and runs every
# CLI command from there (tests/test_wheel.py; skipped by `make test`).
test-wheel: setup
	ADSPARSE_TEST_WHEEL=1 $(PY) -m pytest -q tests/test_wheel.py

bench: setup
	$(PY) benchmarks/bench_kernels.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build python/adsparse/*.so python/adsparse/.built *.egg-info
