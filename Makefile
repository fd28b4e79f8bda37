# The two set-up commands of README.md: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastnlg-installed

# CPU machines and GPU machines with a package index alike (scripts/setup_venv.sh says how they differ).
$(STAMP): requirements.txt pyproject.toml setup.py scripts/setup_venv.sh $(wildcard csrc/cpu/*)
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh
	touch $@

.PHONY: install demo test test-all lint aot bench gpu gpu-all
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastnlg.cli demo

# Default tier: reference, interpreter, native, AOT compile and benchmark-harness tests (no GPU).
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

# pyflakes, pycodestyle, import order and bugbear ([tool.ruff] in pyproject.toml); .ci/run runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

aot: $(STAMP)
	$(PY) -m fastnlg.aot

bench: $(STAMP)
	$(PY) -m benchmarks.run

# On a GPU machine (device tool): first the smoke run, one command of at most 420 s whose rows stream to
# smoke.jsonl (scripts/gpu_check.py); gpu-all runs the GPU test tier and the full benchmarks, in parts.
gpu:
	bash scripts/gpu_check.sh --part smoke --budget 420

gpu-all:
	bash scripts/gpu_check.sh --part all
