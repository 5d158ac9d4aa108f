# syntax=docker/dockerfile:1
#
# The sidecar on top of a ComfyUI image: adds the one-file binary and makes it the container's
# command. The sidecar starts ComfyUI itself (from the CMD environment variable set by the base
# image), installs the manifest, runs the warmup prompt and serves the API on PORT (3000).
#
# From a local build of the binary (make binary), with the repository root as context:
#   docker build -f docker/api.Dockerfile \
#     --build-arg BASE_IMAGE=comfy-sidecar/comfyui:v0.8.0-torch2.9.1-cu128 \
#     -t comfy-sidecar:v0.8.0-cu128 .
# From a release download instead:
#   docker build -f docker/api.Dockerfile --build-arg SIDECAR_SOURCE=release \
#     --build-arg SIDECAR_URL=https://example.com/releases/download/v0.1.0/comfy-sidecar .
#
# Linted with hadolint in tests/deploy; not built on the machines this repository is developed on
# (no Docker there). See docs/deploy.md.

ARG BASE_IMAGE=comfy-sidecar/comfyui:v0.8.0-torch2.9.1-cu128
# local: COPY dist/comfy-sidecar from the build context; release: ADD it from SIDECAR_URL.
ARG SIDECAR_SOURCE=local

FROM scratch AS sidecar-local
COPY dist/comfy-sidecar /comfy-sidecar

FROM scratch AS sidecar-release
ARG SIDECAR_URL=https://example.invalid/comfy-sidecar
# A URL, so ADD (it downloads); hadolint cannot see that through the variable.
# hadolint ignore=DL3020
ADD ${SIDECAR_URL} /comfy-sidecar

# BuildKit builds only the stage chosen here; the other one is skipped.
# hadolint ignore=DL3006
FROM sidecar-${SIDECAR_SOURCE} AS sidecar

# hadolint ignore=DL3006
FROM ${BASE_IMAGE}

COPY --from=sidecar --chmod=755 /comfy-sidecar /usr/local/bin/comfy-sidecar

# Defaults that differ from the sidecar's own: comfyui-api's image also raises the start-up
# budget to 30 checks. Everything else is the sidecar's default (see docs/deploy.md).
ENV PORT=3000 \
    HOST="::" \
    WORKFLOW_DIR=/workflows \
    CACHE_DIR=/home/comfy/.cache/comfyui-api \
    STARTUP_CHECK_MAX_TRIES=30 \
    SHUTDOWN_GRACE_S=30

EXPOSE 3000

# /health turns 200 once the first warmup has finished and stays 200 while the process runs.
# Manifest installs can take many minutes; failures during the start period do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${PORT:-3000}/health || exit 1"]

# On SIGTERM the sidecar drains for SHUTDOWN_GRACE_S, then stops ComfyUI (SIGTERM, SIGKILL after
# 10 s) and exits 0: give the container SHUTDOWN_GRACE_S + 10 s + a margin, e.g.
# `docker run --stop-timeout 45` or compose `stop_grace_period: 45s`.
STOPSIGNAL SIGTERM

# tini reaps processes orphaned by ComfyUI and its custom nodes, and passes SIGTERM on.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["comfy-sidecar"]
