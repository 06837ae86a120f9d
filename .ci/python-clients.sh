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
source .ci/start-server.sh
"$venv/bin/python" tests/python/websockets_clients.py "ws://127.0.0.1:$port/ws"
