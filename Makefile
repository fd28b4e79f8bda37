# The two set-up commands of README.md: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastnlg-installed

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel first, so nothing pulls a CUDA build
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

.PHONY: install demo test test-all aot bench gpu
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastnlg.cli demo

# Default tier: reference, interpreter, native, AOT compile and benchmark-harness tests (no GPU).
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

aot: $(STAMP)
	$(PY) -m fastnlg.aot

bench: $(STAMP)
	$(PY) -m benchmarks.run

# On a GPU machine (device tool): GPU test tier + benchmarks, results under benchmarks/results/.
gpu:
	bash scripts/gpu_check.sh
