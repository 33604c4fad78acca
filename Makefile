# Set-up and entry points. `make sweep` and `make test` each install everything they need into
# .venv on first use (and again whenever pyproject.toml changes), then run.
#
#   make sweep                 the ablation sweep, default preset (local Ray, local MLflow, easy-VQA)
#   make sweep ARGS="--preset smoke"   any sweeps/ablation.py arguments
#   make test                  the whole test suite, as CI runs it
#   make lint                  ruff

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch, installed before the project so that pip never resolves `torch` to the
# multi-GB CUDA wheels on CPU-only machines. Override on GPU machines: make TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install sweep test lint clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

sweep: install
	$(PY) sweeps/ablation.py $(ARGS)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
