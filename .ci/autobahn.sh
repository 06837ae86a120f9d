#!/usr/bin/env bash
# Runs the whole Autobahn|Testsuite (517 cases) against the release binary with default
# settings, and fails on any FAILED or UNIMPLEMENTED case, counting an unclean close as a
# failure. Usage: .ci/autobahn.sh  (from the repository root; ../shared must exist)
set -euo pipefail
cd "$(dirname "$0")/.."
runner=../shared/tools/autobahn/autobahn.sh
[ -x "$runner" ] || { echo "autobahn runner not found at $runner" >&2; exit 1; }

cargo build --release --quiet
log=$(mktemp)
./target/release/ws_echo --listen 127.0.0.1:0 --log-format json >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
# The first line names the bound address (port 0 picks a free one).
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's|.*"url":"http://127.0.0.1:\([0-9]*\)/".*|\1|p' "$log" | head -n1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "ws_echo did not report its address:" >&2; cat "$log" >&2; exit 1; }

WS_AUTOBAHN_UNIMPLEMENTED_FAILS=1 WS_AUTOBAHN_STRICT_CLOSE=1 WS_AUTOBAHN_QUIET=1 \
WS_AUTOBAHN_TIMEOUT="${WS_AUTOBAHN_TIMEOUT:-30m}" WS_AUTOBAHN_OUT="${WS_AUTOBAHN_OUT:-reports/autobahn}" \
  "$runner" "ws://127.0.0.1:$port/ws"
