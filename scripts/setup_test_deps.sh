#!/usr/bin/env bash
# Installs the system packages that `make test` needs beyond the Python environment.
#
# - tests/test_web_demo.py drives Debian's headless Chromium through /usr/bin/chromedriver
#   (Selenium); browsers are not downloaded at run time, so install Debian's `chromium` and
#   `chromium-driver` here, with apt-get, as root or through sudo.
# - Without root or sudo (or with a sudo that needs a password and no terminal to ask it on),
#   fails with the one command to run.
# - Idempotent: with both binaries present it only checks two paths and returns at once.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver)

log() { echo "[test-deps] $*"; }

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
  log "chromium and chromedriver present"
  exit 0
fi

missing=()
[ -x "$CHROMIUM" ] || missing+=("$CHROMIUM")
[ -x "$CHROMEDRIVER" ] || missing+=("$CHROMEDRIVER")

if [ "$(id -u)" = 0 ]; then
  apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
  # passwordless sudo, or a terminal where sudo can ask for the password
  apt_get=(sudo env DEBIAN_FRONTEND=noninteractive apt-get)
else
  echo "[test-deps] error: ${missing[*]} missing (tests/test_web_demo.py needs Debian's headless" >&2
  echo "[test-deps] Chromium) and this user is neither root nor a passwordless sudoer. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[test-deps] error: ${missing[*]} missing and apt-get is not available (not Debian?)." >&2
  echo "[test-deps] Install Debian's ${PACKAGES[*]} packages (binaries $CHROMIUM, $CHROMEDRIVER)." >&2
  exit 1
fi

log "${missing[*]} missing: installing Debian's ${PACKAGES[*]} (for tests/test_web_demo.py)"
"${apt_get[@]}" update -q
"${apt_get[@]}" install -y -q --no-install-recommends "${PACKAGES[@]}"

for binary in "$CHROMIUM" "$CHROMEDRIVER"; do
  if [ ! -x "$binary" ]; then
    echo "[test-deps] error: $binary still missing after installing ${PACKAGES[*]}." >&2
    exit 1
  fi
done
log "installed: $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
