#!/usr/bin/env bash
# Create (or reuse) the visionloop environment and install this checkout into it.
#
# The environment lives outside the checkout (default ~/.local/share/visionloop/venv, override
# with VL_VENV) so that fresh clones, CI runs included, reuse the installed torch and friends
# instead of downloading gigabytes again. Dependencies are reinstalled only when pyproject.toml
# or setup.py change; otherwise this only points the editable install at this checkout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VL_VENV:-$HOME/.local/share/visionloop/venv}"
extras="${VL_EXTRAS:-cpu,train,s3,bench,dev}"

# pip's and setuptools' chatter (deprecation warnings of the editable build) goes to a log that is
# shown only when the install fails.
quiet_pip() {
  local log
  log="$(mktemp)"
  if ! "$venv/bin/python" -m pip "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

# Whether the environment's editable install already points at this checkout (nothing to do then).
points_here() {
  "$venv/bin/python" -I - "$here" 2>/dev/null <<'PY'
import pathlib, sys
import visionloop, visionloop.contracts, visionloop.libs, visionloop.services
here = pathlib.Path(sys.argv[1]).resolve()
packages = (visionloop, visionloop.contracts, visionloop.libs, visionloop.services)
sys.exit(0 if all(pathlib.Path(p.__file__).resolve().is_relative_to(here) for p in packages) else 1)
PY
}

pick_python() {
  for candidate in "${VL_PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)'; then
      echo "$candidate"; return 0
    fi
  done
  echo "visionloop needs Python 3.11 or 3.12 (the embedded PostgreSQL wheel has no 3.13 build); set VL_PYTHON" >&2
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  python="$(pick_python)"
  echo "creating $venv with $python" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  quiet_pip install --upgrade pip setuptools wheel
fi

stamp="$venv/.visionloop-deps"
# The folders count too: the editable install maps packages and namespace folders when it is made.
want="$({ cat "$here/pyproject.toml" "$here/setup.py"; cd "$here" && find contracts libs services visionloop -type d \
  -not -name __pycache__ -not -path '*/__pycache__/*' | sort; } | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing visionloop[$extras] into $venv (first time: a few minutes)" >&2
  quiet_pip install --progress-bar off -e "$here[$extras]"
  echo "$want" > "$stamp"
elif ! points_here; then
  quiet_pip install --no-deps --no-build-isolation -e "$here"
fi
echo "$venv"
