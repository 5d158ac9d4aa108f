#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the whole suite:
# lint (ruff), types (mypy --strict), the frozen binary (PyInstaller), and pytest.
#   scripts/test.sh [pytest args...]
# Real-ComfyUI scenarios run too when COMFY_HOME points at a ComfyUI laid out by
# shared/scripts/real-comfyui.sh; otherwise they are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Steps that do not depend on each other overlap (the machine has 2 cores): Azurite's npm
# install runs beside the pip install and the checks; mypy and the other checks beside the
# binary's build. Each one's output is printed, in this order, once it ended.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# started <name> <command...>: run it in the background, its output in $logs/<name>
started() {
  local name=$1
  shift
  "$@" >"$logs/$name" 2>&1 &
  echo $! >"$logs/$name.pid"
}
# finished <name>: wait for it, print its output, fail as it failed
finished() {
  local name=$1 status=0
  wait "$(cat "$logs/$name.pid")" || status=$?
  cat "$logs/$name"
  return $status
}
if [ ! -x node_modules/.bin/azurite-blob ]; then
  started azurite npm install --no-save --no-audit --no-fund --silent azurite
else
  started azurite true
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,dev]'
# The sidecar's bytecode, written once (PYTHONDONTWRITEBYTECODE may be set): each subprocess
# sidecar of the tests then imports it instead of compiling it (0.15 s of CPU a start).
"$venv/bin/python" -m compileall -q comfy_sidecar >/dev/null
# Debian packages some tests start as real servers, installed when missing (as root); a test
# whose server cannot be had is skipped with the reason.
#   need <package> "<why>" <command>...   (installed unless every command is found;
#   APT_FLAGS=... need ... passes more flags to apt-get install)
need() {
  local package=$1 why=$2
  shift 2
  local found=1 cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || found=0
  done
  if [ "$found" = 0 ] && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086  # APT_FLAGS is a list of flags
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      ${APT_FLAGS:-} "$package" >/dev/null \
      || echo "$package could not be installed; $why will be skipped"
  fi
}
need chromium "the /docs browser test (tests/core/test_docs_browser.py)" chromium
need chromium-driver "the /docs browser test" chromedriver
need redis-server "the Redis job queue tests (tests/jobs/test_redis_queue.py)" redis-server
need haproxy "the tests behind HAProxy (tests/jobs/test_replicas.py)" haproxy
need tinyproxy "the forward-proxy tests of the SSRF guard (tests/core/test_netguard_proxy.py)" tinyproxy
# (no recommends: Debian's prometheus recommends node-exporter and friends, unused here)
APT_FLAGS=--no-install-recommends need prometheus "the alert rule and live dashboard tests (tests/deploy/test_alerts.py)" prometheus promtool
export PATH="$PWD/$venv/bin:$PWD/node_modules/.bin:$PATH"
checks() {
  echo "== ruff"; ruff check comfy_sidecar tests bench
  echo "== mypy"; mypy
  echo "== layers"; lint-imports --no-cache
}
started checks checks
started binary pyinstaller --noconfirm --log-level WARN build.spec
finished checks
echo "== binary"
finished binary >/dev/null || { cat "$logs/binary"; exit 1; }
dist/comfy-sidecar --version
finished azurite >/dev/null || { cat "$logs/azurite"; exit 1; }
rm -rf "$logs"
echo "== pytest"
# Test files run in parallel (pytest-xdist): 3 workers on 2 cores, as most tests wait on
# sidecars, ComfyUI doubles and servers rather than compute; each file's tests in one worker
# so its module-scoped sidecars and servers are shared; tests/conftest.py gives each worker
# its own ports. PYTEST_WORKERS=N overrides the count.
exec "$venv/bin/python" -m pytest -q -rs -n "${PYTEST_WORKERS:-3}" --dist loadfile "$@"
