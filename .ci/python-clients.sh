#!/usr/bin/env bash
# Python `websockets` clients, with and without permessage-deflate, against the release
# binary: every echo must be byte-identical. The client comes from PyPI (pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
pin="websockets==17.4"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/ws_echo/python-clients-${pin#*==}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$pin"
fi
cargo build --release --quiet
log=$(mktemp)
./target/release/ws_echo --listen 127.0.0.1:0 --log-format json >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's|.*"url":"http://127.0.0.1:\([0-9]*\)/".*|\1|p' "$log" | head -n1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "ws_echo did not report its address" >&2; cat "$log" >&2; exit 1; }
"$venv/bin/python" tests/python/websockets_clients.py "ws://127.0.0.1:$port/ws"
