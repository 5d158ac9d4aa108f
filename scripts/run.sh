#!/usr/bin/env bash
# Set up comfy-sidecar in a virtual environment and run it in front of ComfyUI.
#   scripts/run.sh                              # lays out a ComfyUI in .comfyui/ (comfy-cli)
#   COMFY_HOME=/path/to/ComfyUI scripts/run.sh  # an existing ComfyUI checkout
# Without COMFY_HOME, the first run installs comfy-cli into the venv and runs
# `comfy --workspace .comfyui --skip-prompt install --cpu|--nvidia` (needs PyPI and GitHub;
# when they cannot be reached it says so in one line and exits 1). Unless CMD is set, ComfyUI is
# started as `<its python> main.py --listen 127.0.0.1 --port 8188 --disable-auto-launch`, with
# --cpu when no NVIDIA GPU is visible. The API listens on http://localhost:3000 (PORT). Every
# other setting is an environment variable (README).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
fail() { echo "run.sh: $*" >&2; exit 1; }
reachable() {  # reachable URL: an HTTPS answer within 5 s
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
    >/dev/null 2>&1
}
gpu=false
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu=true

if [ -z "${COMFY_HOME:-}" ] && [ ! -f "$here/.comfyui/main.py" ]; then
  # Check before the long installs: comfy-cli clones ComfyUI from GitHub.
  reachable https://github.com ||
    fail "cannot reach github.com to download ComfyUI with comfy-cli; set COMFY_HOME to a ComfyUI checkout"
fi
if [ ! -x "$venv/bin/comfy-sidecar" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here" >"$venv/pip.log" 2>&1 ||
    fail "installing comfy-sidecar into $venv failed (no route to the package index?); see $venv/pip.log"
fi

if [ -z "${COMFY_HOME:-}" ]; then
  COMFY_HOME=$here/.comfyui
  py="$venv/bin/python"  # comfy-cli installs ComfyUI's requirements into the running venv
  if [ ! -f "$COMFY_HOME/main.py" ]; then
    if [ ! -x "$venv/bin/comfy" ]; then
      "$venv/bin/python" -m pip install -q --disable-pip-version-check comfy-cli \
        >"$venv/pip.log" 2>&1 ||
        fail "cannot install comfy-cli from the package index (offline?); see $venv/pip.log, or set COMFY_HOME to a ComfyUI checkout"
    fi
    accel=--cpu
    $gpu && accel=--nvidia
    echo "run.sh: installing ComfyUI into $COMFY_HOME (log: $venv/comfy-install.log)" >&2
    "$venv/bin/comfy" --workspace "$COMFY_HOME" --skip-prompt install "$accel" \
      >"$venv/comfy-install.log" 2>&1 && [ -f "$COMFY_HOME/main.py" ] ||
      fail "comfy install failed; see $venv/comfy-install.log"
  fi
else
  py=python3
  [ -x "$COMFY_HOME/.venv/bin/python" ] && py="$COMFY_HOME/.venv/bin/python"
fi

if [ -z "${CMD:-}" ]; then
  cpu=--cpu
  $gpu && cpu=""
  export CMD="$py $COMFY_HOME/main.py --listen 127.0.0.1 --port ${COMFYUI_PORT_HOST:-8188} --disable-auto-launch $cpu"
fi
export COMFY_HOME
export STARTUP_CHECK_MAX_TRIES=${STARTUP_CHECK_MAX_TRIES:-120}
exec "$venv/bin/comfy-sidecar"
