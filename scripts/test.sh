#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the whole suite.
#   scripts/test.sh [pytest args...]
# Real-ComfyUI scenarios run too when COMFY_HOME points at a ComfyUI laid out by
# shared/scripts/real-comfyui.sh; otherwise they are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
if [ ! -x node_modules/.bin/azurite-blob ]; then
  npm install --no-save --no-audit --no-fund --silent azurite >/dev/null
fi
export PATH="$PWD/$venv/bin:$PWD/node_modules/.bin:$PATH"
exec "$venv/bin/python" -m pytest -q -rs "$@"
