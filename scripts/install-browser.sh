#!/usr/bin/env bash
# Installs Debian's chromium (used headless by tests/test_report_html.py) unless a browser is already
# there. Idempotent and quiet when nothing is needed. Exit 0: a browser is on PATH afterwards;
# exit 1: none could be installed (no apt-get, not root and no passwordless sudo, or apt failed):
# the browser test then skips and says why.
set -u

have_browser() {
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then echo "browser: $(command -v "$b")"; return 0; fi
  done
  return 1
}

have_browser && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install chromium with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-browser: need root (or passwordless sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

echo "install-browser: installing Debian chromium (one time, a few minutes)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium fonts-dejavu-core >/dev/null; }; then
  echo "install-browser: apt-get install chromium failed" >&2
  exit 1
fi
have_browser
