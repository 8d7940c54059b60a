#!/usr/bin/env bash
# Install what is missing (pinned by constraints.txt), then run the test suite. Extra
# arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test "${HF_ESCROW_CONSTRAINTS:-constraints.txt}" || exit 1
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"
fi
python3 -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing, a run without tests proves nothing" >&2
  exit 1
fi
exit "$rc"
