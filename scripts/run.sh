#!/usr/bin/env bash
# Set up comfy-sidecar in a virtual environment and run it in front of ComfyUI.
#   COMFY_HOME=/path/to/ComfyUI scripts/run.sh
# COMFY_HOME is a ComfyUI checkout (with its own .venv, or a python3 that can run it). Unless CMD
# is set, ComfyUI is started as `<its python> main.py --listen 127.0.0.1 --port 8188
# --disable-auto-launch`, with --cpu when no NVIDIA GPU is visible. The API listens on
# http://localhost:3000 (PORT). Every other setting is an environment variable (README).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
: "${COMFY_HOME:?set COMFY_HOME to a ComfyUI checkout (git clone https://github.com/comfyanonymous/ComfyUI)}"
venv=${VENV:-$here/.venv}
if [ ! -x "$venv/bin/comfy-sidecar" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here"
fi
if [ -z "${CMD:-}" ]; then
  py=python3
  [ -x "$COMFY_HOME/.venv/bin/python" ] && py="$COMFY_HOME/.venv/bin/python"
  cpu=""
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cpu="--cpu"
  export CMD="$py $COMFY_HOME/main.py --listen 127.0.0.1 --port ${COMFYUI_PORT_HOST:-8188} --disable-auto-launch $cpu"
fi
export COMFY_HOME
export STARTUP_CHECK_MAX_TRIES=${STARTUP_CHECK_MAX_TRIES:-120}
exec "$venv/bin/comfy-sidecar"
