#!/usr/bin/env bash
# Maintainers: move constraints.txt to the newest versions that pass the whole suite.
# Resolves the newest releases in a fresh virtual environment, runs the suite there, and
# writes constraints.txt only if it passes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/hf-escrow-lock-XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
HF_ESCROW_CONSTRAINTS=none ./scripts/test.sh "$@"
{
  echo "# The exact versions the test suite passed with (scripts/refresh-lock.sh, $(date -u +%Y-%m-%d),"
  echo "# Python $(python3 -c 'import platform; print(platform.python_version())')). Used by scripts/install.sh."
  python3 -m pip freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt refreshed: $(grep -vc '^#' constraints.txt) packages"
