#!/usr/bin/env bash
# Installs the system packages that `make test` needs beyond the Python environment.
#
# - tests/test_web_demo.py drives Debian's headless Chromium through /usr/bin/chromedriver
#   (Selenium); browsers are not downloaded at run time, so install Debian's `chromium` and
#   `chromium-driver` here, with apt-get, as root or through sudo.
# - tests/test_native_kernels.py compiles the deformable attention's CPU backward kernel with
#   the system's C compiler (`cc`): Debian's `gcc` and `libc6-dev` if there is none.
# - Without root or sudo (or with a sudo that needs a password and no terminal to ask it on),
#   fails with the one command to run.
# - Idempotent: with every binary present it only checks three paths and returns at once.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

log() { echo "[test-deps] $*"; }

missing=()
PACKAGES=()
[ -x "$CHROMIUM" ] || { missing+=("$CHROMIUM"); PACKAGES+=(chromium); }
[ -x "$CHROMEDRIVER" ] || { missing+=("$CHROMEDRIVER"); PACKAGES+=(chromium-driver); }
command -v cc >/dev/null 2>&1 || { missing+=(cc); PACKAGES+=(gcc libc6-dev); }

if [ ${#missing[@]} = 0 ]; then
  log "chromium, chromedriver and cc present"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
  # passwordless sudo, or a terminal where sudo can ask for the password
  apt_get=(sudo env DEBIAN_FRONTEND=noninteractive apt-get)
else
  echo "[test-deps] error: ${missing[*]} missing (tests/test_web_demo.py needs Debian's headless" >&2
  echo "[test-deps] Chromium, tests/test_native_kernels.py a C compiler) and this user is neither" >&2
  echo "[test-deps] root nor a passwordless sudoer. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[test-deps] error: ${missing[*]} missing and apt-get is not available (not Debian?)." >&2
  echo "[test-deps] Install Debian's ${PACKAGES[*]} packages (for ${missing[*]})." >&2
  exit 1
fi

log "${missing[*]} missing: installing Debian's ${PACKAGES[*]} (tests/test_web_demo.py, tests/test_native_kernels.py)"
"${apt_get[@]}" update -q
"${apt_get[@]}" install -y -q --no-install-recommends "${PACKAGES[@]}"

for binary in "$CHROMIUM" "$CHROMEDRIVER"; do
  if [ ! -x "$binary" ]; then
    echo "[test-deps] error: $binary still missing after installing ${PACKAGES[*]}." >&2
    exit 1
  fi
done
if ! command -v cc >/dev/null 2>&1; then
  echo "[test-deps] error: cc still missing after installing ${PACKAGES[*]}." >&2
  exit 1
fi
log "installed: ${PACKAGES[*]}"
