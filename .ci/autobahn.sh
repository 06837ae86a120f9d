#!/usr/bin/env bash
# Runs the whole Autobahn|Testsuite (517 cases) against the release binary with default
# settings, and fails on any FAILED or UNIMPLEMENTED case, counting an unclean close as a
# failure. Usage: .ci/autobahn.sh  (from the repository root; ../shared must exist)
set -euo pipefail
cd "$(dirname "$0")/.."
runner=../shared/tools/autobahn/autobahn.sh
[ -x "$runner" ] || { echo "autobahn runner not found at $runner" >&2; exit 1; }

source .ci/start-server.sh

WS_AUTOBAHN_UNIMPLEMENTED_FAILS=1 WS_AUTOBAHN_STRICT_CLOSE=1 WS_AUTOBAHN_QUIET=1 \
WS_AUTOBAHN_TIMEOUT="${WS_AUTOBAHN_TIMEOUT:-30m}" WS_AUTOBAHN_OUT="${WS_AUTOBAHN_OUT:-reports/autobahn}" \
  "$runner" "ws://127.0.0.1:$port/ws"
