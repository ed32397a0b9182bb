#!/usr/bin/env bash
# Test set-up: Debian's chromium for the headless-browser test of eval's report.html.
# Needs root (or passwordless sudo) and the Debian package mirror; does nothing if chromium is there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no apt-get here; install Chromium yourself (the report test is skipped without it)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "setup-browser: not root and no passwordless sudo; the report test will be skipped" >&2
    exit 0
  fi
fi
echo "setup-browser: installing Debian's chromium (once, about a minute)"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
  || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
chromium --version
