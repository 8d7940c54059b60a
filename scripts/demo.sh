#!/usr/bin/env bash
# Install hf-escrow with everything the demo needs (pinned by constraints.txt), then run it
# on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh all
exec hf-escrow demo "$@"
