# Sourced by CI scripts: builds the release binary, starts it on 127.0.0.1:0 with extra
# arguments "$@", stops it on exit, and sets $port from its first log line.
cargo build --release --quiet
server_log=$(mktemp)
./target/release/ws_echo --listen 127.0.0.1:0 --log-format json "$@" >"$server_log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -f "$server_log"' EXIT
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's|.*"url":"http://127.0.0.1:\([0-9]*\)/".*|\1|p' "$server_log" | head -n1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "ws_echo did not report its address:" >&2; cat "$server_log" >&2; exit 1; }
