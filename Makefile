# gptoss-compressor. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and alone: a bare `torch` requirement would pull a multi-GB CUDA build on a
# CPU machine. Override for a GPU box, e.g. TORCH_SPEC='torch==2.13.0' with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: help venv demo test clean-demo

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-28s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed ## create .venv and install requirements.txt

demo: venv ## build the tiny GPT-OSS (MXFP4) and run the pipeline on it
	$(PY) tests/tiny_gptoss.py $(DEMO_DIR)/tiny-gptoss-mxfp4
	$(PY) compress_gptoss.py dequantize --src $(DEMO_DIR)/tiny-gptoss-mxfp4 --dst $(DEMO_DIR)/tiny-gptoss-bf16 --dtype bf16 --overwrite
	$(PY) -c "import json,sys; c=json.load(open('$(DEMO_DIR)/tiny-gptoss-bf16/config.json')); print('demo: dequantized', c['model_type'], 'hidden', c['hidden_size'], 'experts', c['num_local_experts'], 'dtype', c['dtype'])"

test: venv ## run the test suite (what CI runs)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean-demo: ## remove the demo outputs
	rm -rf $(DEMO_DIR)
