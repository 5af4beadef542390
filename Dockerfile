# gptoss-compressor image: CUDA devel (nvcc, to build the W4A8 kernels) + PyTorch + requirements.txt.
#   docker build -t gptoss-compressor:cu128 .                          (QQQ built in, RTX 3090)
#   docker build --build-arg INSTALL_QQQ=false --build-arg CUDA_ARCH="8.0;8.6;8.9;9.0" .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel .
# The base must be a *devel* tag (nvcc inside) whose torch satisfies requirements.txt
# (llmcompressor 0.14.0.1: torch >= 2.10, <= 2.14.0); its CUDA torch is kept as it is.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# CUDA_ARCH: compute capability the kernels are compiled for (8.6 = RTX 3090; a list works: "8.0;8.6").
ARG CUDA_ARCH=8.6
# INSTALL_QQQ: true = build the QQQ W4A8 kernels now; false = later (make install-kernels).
ARG INSTALL_QQQ=true

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCH} \
    MAX_JOBS=4 \
    HF_HOME=/root/.cache/huggingface \
    APP_DIR=/workspace/app \
    APP_PYTHON=python

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential git make ninja-build ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Refuse a base without nvcc or without a CUDA build of torch: the W4A8 kernels need both.
RUN nvcc --version | tail -n 1 \
    && python -c "import sys, torch; print('base torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.version.cuda is None)"

WORKDIR /workspace/app

# requirements.txt alone first, so that editing the code does not re-run pip. The constraint pins
# torch to the base image's CUDA build: pip may not swap it for a CPU or other-CUDA wheel.
COPY requirements.txt .
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install -c /tmp/torch-constraint.txt -r requirements.txt \
    && python -c "import sys, torch; c = open('/tmp/torch-constraint.txt').read().split('==')[1].strip(); print('torch after requirements:', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.__version__ != c or torch.version.cuda is None)"

COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# Only what install-kernel needs, so that editing tests or docs does not rebuild the kernels.
COPY compress_gptoss.py Makefile ./

# The kernels are compiled for TORCH_CUDA_ARCH_LIST (no GPU is needed at build time).
RUN chmod +x /usr/local/bin/docker-entrypoint.sh \
    && case "$INSTALL_QQQ" in \
        true) python compress_gptoss.py install-kernel --yes ;; \
        false) echo "INSTALL_QQQ=false: QQQ not built; later: make install-kernels or AUTO_INSTALL_KERNELS=true" ;; \
        *) echo "INSTALL_QQQ=$INSTALL_QQQ: expected true or false" >&2; exit 2 ;; \
    esac

COPY . .
RUN mkdir -p /workspace/app/models /workspace/app/offload_cache /root/.cache/huggingface
VOLUME ["/workspace/app/models", "/workspace/app/offload_cache", "/root/.cache/huggingface"]

LABEL org.opencontainers.image.title="gptoss-compressor" \
      org.opencontainers.image.description="Dequantize GPT-OSS MXFP4 and re-compress it with GPTQ/AWQ" \
      gptoss.cuda_arch="${CUDA_ARCH}" \
      gptoss.install_qqq="${INSTALL_QQQ}"

ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["bash"]
