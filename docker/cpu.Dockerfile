# syntax=docker/dockerfile:1
#
# CPU-only image, for trying the sidecar without a GPU: Debian 12 (glibc 2.36), CPU PyTorch
# wheels, ComfyUI pinned by tag and started with --cpu, the comfy CLI, git, ffmpeg, curl, and the
# sidecar binary as the container's command. docker/compose.yml runs it with an example manifest
# and warmup prompt.
#
#   make binary
#   docker build -f docker/cpu.Dockerfile -t comfy-sidecar:cpu .
#
# Linted with hadolint in tests/deploy; not built on the machines this repository is developed on
# (no Docker there). See docs/deploy.md.

ARG BASE_IMAGE=python:3.12-slim-bookworm
# local: COPY dist/comfy-sidecar from the build context; release: ADD it from SIDECAR_URL.
ARG SIDECAR_SOURCE=local

FROM scratch AS sidecar-local
COPY dist/comfy-sidecar /comfy-sidecar

FROM scratch AS sidecar-release
ARG SIDECAR_URL=https://example.invalid/comfy-sidecar
# A URL, so ADD (it downloads); hadolint cannot see that through the variable.
# hadolint ignore=DL3020
ADD ${SIDECAR_URL} /comfy-sidecar

# hadolint ignore=DL3006
FROM sidecar-${SIDECAR_SOURCE} AS sidecar

# hadolint ignore=DL3006
FROM ${BASE_IMAGE}

ARG COMFYUI_VERSION=v0.8.0
ARG COMFYUI_REPO=https://github.com/comfyanonymous/ComfyUI.git
ARG TORCH_VERSION=2.9.1
ARG TORCHVISION_VERSION=0.24.1
ARG TORCHAUDIO_VERSION=2.9.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG COMFY_CLI_VERSION=1.23.0

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
      git ffmpeg curl wget unzip ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --shell /bin/bash comfy \
 && mkdir -p /opt/venv /opt/ComfyUI /workflows /home/comfy/.cache/comfyui-api /opt/warmup \
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

COPY --from=sidecar --chmod=755 /comfy-sidecar /usr/local/bin/comfy-sidecar
COPY --chmod=644 docker/warmup/cpu-warmup.json /opt/warmup/cpu-warmup.json

# CMD (the variable) is the command the sidecar runs as its child: ComfyUI on loopback, on CPU.
ENV CMD="/opt/venv/bin/python /opt/ComfyUI/main.py --listen 127.0.0.1 --port 8188 --disable-auto-launch --cpu" \
    PORT=3000 \
    HOST="::" \
    WORKFLOW_DIR=/workflows \
    CACHE_DIR=/home/comfy/.cache/comfyui-api \
    WARMUP_PROMPT_FILE=/opt/warmup/cpu-warmup.json \
    STARTUP_CHECK_MAX_TRIES=60 \
    SHUTDOWN_GRACE_S=30

EXPOSE 3000

# /health turns 200 once the first warmup has finished and stays 200 while the process runs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${PORT:-3000}/health || exit 1"]

# Drain: SHUTDOWN_GRACE_S (30 s) + ComfyUI's stop (up to 10 s); compose gives 45 s.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["comfy-sidecar"]
