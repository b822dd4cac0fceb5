#!/usr/bin/env bash
# Set up the environment and run the test suite (the README's second command, and CI's).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$here/scripts/setup.sh" | tail -n 1)" || exit 1
cd "$here"
# The dashboard's real-browser test needs Debian's chromium: installed here when missing and we are
# root (CI is); otherwise that test is skipped and says how to install it.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the dashboard's real-browser test (apt-get install chromium)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Bounded (at most about 5 minutes): the suite must still finish within CI's limit.
    { timeout 120 apt-get install -y -q --no-install-recommends chromium \
      || { timeout 45 apt-get update -q && timeout 120 apt-get install -y -q --no-install-recommends chromium; }; } \
      >/dev/null 2>&1 || echo "could not install chromium: the dashboard's real-browser test will be skipped" >&2
  else
    echo "chromium is missing: the dashboard's real-browser test will be skipped (as root: apt-get install chromium)" >&2
  fi
fi
"$venv/bin/python" -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no tests; that is not a failure of the code under test.
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
