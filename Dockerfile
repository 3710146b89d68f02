# One image for every component: its entry point is `opd`, so a container's command is `learner|actor|scorer|
# prepare --config ... [overrides]` (docker-compose.yml).
#   docker build -t opd-stream:cpu .                                   # CPU: python:3.11-slim + torch's CPU wheel
#   docker build -t opd-stream:cuda --build-arg VARIANT=cuda .         # CUDA: nvidia/cuda runtime + CUDA torch
# BuildKit (Docker's default builder since 23.0) builds only the base stage that VARIANT names.
ARG VARIANT=cpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM python:3.11-slim AS base-cpu
# g++ and ninja: DeepSpeed JIT-compiles one small op on first use
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
# the CPU build; PyPI's default torch for Linux x86_64 would be the multi-GB CUDA build
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_BASE} AS base-cuda
# Ubuntu 24.04's Python (3.12) in a venv: the system interpreter refuses pip installs (PEP 668)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyPI's torch for Linux x86_64 is the CUDA build (its CUDA libraries come as nvidia-* wheels)
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM base-${VARIANT}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# torch first, in its own layer: it is most of the image and changes least (pinned like pyproject.toml)
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"
COPY . /app
RUN pip install "/app[deepspeed]"
ENTRYPOINT ["opd"]
CMD ["--help"]
