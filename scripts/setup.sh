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
  "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
fi

stamp="$venv/.visionloop-deps"
want="$(cat "$here/pyproject.toml" "$here/setup.py" | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing visionloop[$extras] into $venv (first time: a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --progress-bar off -e "$here[$extras]"
  echo "$want" > "$stamp"
else
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$here"
fi
echo "$venv"
