#!/usr/bin/env bash
# Install hf-escrow with everything the demo needs, then run it on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[all]"
exec hf-escrow demo "$@"
