#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian's packages, for the console's browser
# test. Idempotent: silent when both are already there. Never downloads a browser build from
# anywhere but the system's package manager.
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: /usr/bin/chromium and /usr/bin/chromedriver are missing and apt-get is not available;" \
       "install Chromium and chromedriver with your system's package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: installing chromium needs root (or sudo)" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing chromium and chromium-driver from Debian packages (once)..."
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet; update only when the install cannot find them.
if ! $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { echo "error: chromium install did not produce /usr/bin/chromium and /usr/bin/chromedriver" >&2; exit 1; }
