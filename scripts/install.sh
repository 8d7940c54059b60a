#!/usr/bin/env bash
# Install hf-escrow (editable) with EXTRAS, every package pinned by constraints.txt.
# torch first: 2.13.0 is the CPU build on this disk; a bare "torch" would pull a CUDA build.
# Usage: scripts/install.sh EXTRAS [CONSTRAINTS]   (CONSTRAINTS "none": resolve the newest)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"
constraints="${2:-constraints.txt}"
pin=()
[ "$constraints" != none ] && pin=(-c "$constraints")
pip() { python3 -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip "torch==2.13.0" "${pin[@]}"
pip -e ".[$extras]" "${pin[@]}"
