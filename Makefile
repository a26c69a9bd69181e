# Two commands do everything on a fresh machine (Python 3.10+):
#   make quickstart   set up .venv, run the whole pipeline on the built-in task
#   make test         set up .venv, run the test suite
#
# torch is installed first, pinned, so that pip never picks a build for you: on a
# CPU-only machine that has the CPU wheel, `pip install torch==2.13.0` takes it; on a
# GPU machine it takes the CUDA build. Set TORCH_SPEC to choose another.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[test]"
	touch $@

.PHONY: setup quickstart test
setup: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/rlhf pipeline configs/quickstart.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest
