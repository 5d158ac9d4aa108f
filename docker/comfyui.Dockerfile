# syntax=docker/dockerfile:1
#
# ComfyUI base image: CUDA runtime, a Python virtual environment with a pinned PyTorch, ComfyUI
# pinned by tag at /opt/ComfyUI, the comfy CLI, git, ffmpeg and curl. It does not contain the
# sidecar; docker/api.Dockerfile adds it on top.
#
#   docker build -f docker/comfyui.Dockerfile \
#     --build-arg COMFYUI_VERSION=v0.8.0 --build-arg TORCH_VERSION=2.9.1 \
#     -t comfy-sidecar/comfyui:v0.8.0-torch2.9.1-cu128 .
#
# Linted with hadolint in tests/deploy; not built on the machines this repository is developed on
# (no Docker there). See docs/deploy.md.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# ComfyUI release tag (or branch / commit-ish reachable from a tag) to install.
ARG COMFYUI_VERSION=v0.8.0
ARG COMFYUI_REPO=https://github.com/comfyanonymous/ComfyUI.git
# PyTorch and the wheel index matching the CUDA runtime above (cu128 for CUDA 12.8).
ARG TORCH_VERSION=2.9.1
ARG TORCHVISION_VERSION=0.24.1
ARG TORCHAUDIO_VERSION=2.9.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG COMFY_CLI_VERSION=1.23.0
# Extra ComfyUI flags baked into the CMD variable (the CPU image passes --cpu).
ARG COMFYUI_EXTRA_ARGS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    COMFY_HOME=/opt/ComfyUI \
    MODEL_DIR=/opt/ComfyUI/models \
    INPUT_DIR=/opt/ComfyUI/input \
    OUTPUT_DIR=/opt/ComfyUI/output \
    COMFYUI_PORT_HOST=8188 \
    DIRECT_ADDRESS=127.0.0.1

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential \
      git git-lfs ffmpeg curl wget unzip ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# A non-root user (comfy, UID 1000: numeric, so Kubernetes' runAsNonRoot can check it) owns ComfyUI, the venv (so manifest `pip` and `custom_nodes` installs work) and
# its home (the download cache). Ubuntu images ship a user `ubuntu` with UID 1000; it is removed.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --shell /bin/bash comfy \
 && mkdir -p /opt/venv /opt/ComfyUI /workflows /home/comfy/.cache/comfyui-api \
 && chown -R comfy:comfy /opt/venv /opt/ComfyUI /workflows /home/comfy

USER 1000:1000
WORKDIR /opt/ComfyUI

RUN python3 -m venv /opt/venv \
 && pip install \
      "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
      "torchaudio==${TORCHAUDIO_VERSION}" --index-url "${TORCH_INDEX_URL}"

RUN git clone --depth 1 --branch "${COMFYUI_VERSION}" "${COMFYUI_REPO}" /opt/ComfyUI \
 && pip install -r /opt/ComfyUI/requirements.txt \
 && pip install "comfy-cli==${COMFY_CLI_VERSION}" \
 && comfy --skip-prompt tracking disable \
 && comfy --skip-prompt set-default /opt/ComfyUI

# The command the sidecar runs as its child (the sidecar's CMD variable, not Docker's CMD).
# ComfyUI listens on loopback only; the sidecar is the only thing that talks to it.
ENV CMD="/opt/venv/bin/python /opt/ComfyUI/main.py --listen 127.0.0.1 --port 8188 --disable-auto-launch ${COMFYUI_EXTRA_ARGS}"

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/bash", "-c", "exec ${CMD}"]
