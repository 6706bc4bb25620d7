#!/usr/bin/env bash
# Builds (or checks) the project's virtual environment at ${VENV:-.venv}.
#
# - Finds Python 3.10 by itself (PATH, then pyenv's versions/3.10.*).
# - Installs requirements.txt, then requirements-reference.txt without its dependencies (the
#   official code, a test-only reference whose supervision==0.6.0 pin would clash), then the
#   project itself (`pip install -e .`).
# - Idempotent: a stamp holds the hash of the requirements files + setup.py and the project path;
#   with nothing changed, it returns in seconds.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${VENV:-.venv}"
STAMP="$VENV/.grounding_dino-stamp"

log() { echo "[setup] $*"; }

find_python310() {
  local candidate
  for candidate in "${PYTHON:-}" python3.10; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  local roots=()
  command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
  roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
  for root in "${roots[@]}"; do
    candidate="$(ls -d "$root"/versions/3.10.*/bin/python3.10 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

req_hash="$(cat requirements.txt requirements-reference.txt setup.py | sha256sum | cut -c1-16)"
wanted="$req_hash $ROOT"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && [ -x "$VENV/bin/python" ]; then
  log "environment $VENV is up to date (requirements hash $req_hash)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python310)" || {
    echo "[setup] error: Python 3.10 not found (tried \$PYTHON, python3.10, pyenv versions/3.10.*)." >&2
    echo "[setup] The pinned detectron2 wheel (sal-detectron2) is built for CPython 3.10 only." >&2
    exit 1
  }
  log "creating virtual environment $VENV with $PY"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [ ! -f "$STAMP" ] || [ "$(cut -d' ' -f1 "$STAMP")" != "$req_hash" ]; then
  log "installing the pinned stack from requirements.txt (first time: a few minutes, ~3 GB)"
  "$VENV/bin/python" -m pip install --progress-bar off -r requirements.txt
  log "installing the parity tests' reference (requirements-reference.txt) with --no-deps"
  "$VENV/bin/python" -m pip install --progress-bar off --no-deps -r requirements-reference.txt
fi

log "installing the project (pip install -e .) from $ROOT"
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$wanted" > "$STAMP"
log "done: $VENV"
