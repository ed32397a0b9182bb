#!/usr/bin/env bash
# Set up, then run the default test suite (unit + integration; slow end-to-end tests excluded).
# Extra arguments go to pytest: scripts/test.sh -m slow runs the slow ones.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-browser.sh || echo "test.sh: no Chromium; the report's browser test will be skipped" >&2
export HF_HUB_OFFLINE=1 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
