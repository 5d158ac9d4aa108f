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
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,dev]'
if [ ! -x node_modules/.bin/azurite-blob ]; then
  npm install --no-save --no-audit --no-fund --silent azurite >/dev/null
fi
# Headless Chromium for the /docs browser test (tests/core/test_docs_browser.py).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "chromium could not be installed; the /docs browser test will be skipped"
fi
# redis-server for the shared job queue tests (tests/jobs/test_redis_queue.py).
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
    || echo "redis-server could not be installed; the Redis job queue tests will be skipped"
fi
# haproxy for the replicas-behind-a-load-balancer tests (tests/jobs/test_replicas.py).
if ! { command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null \
    || echo "haproxy could not be installed; the tests behind HAProxy will be skipped"
fi
# prometheus and promtool for the alert rule tests and the dashboard and rules evaluated by a
# live Prometheus (tests/deploy/test_alerts.py, tests/deploy/test_prometheus_live.py).
if ! { command -v prometheus && command -v promtool; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "prometheus could not be installed; the alert and dashboard tests will be skipped"
fi
export PATH="$PWD/$venv/bin:$PWD/node_modules/.bin:$PATH"
echo "== ruff"; ruff check comfy_sidecar tests bench
echo "== mypy"; mypy
echo "== binary"; pyinstaller --noconfirm --log-level WARN build.spec >/dev/null
dist/comfy-sidecar --version
echo "== pytest"
exec "$venv/bin/python" -m pytest -q -rs "$@"
