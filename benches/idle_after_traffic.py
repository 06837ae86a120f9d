"""Idle server RSS per connection after one 16 KiB message, with and without
permessage-deflate. Usage (from the repository root, after cargo build --release):
    python benches/idle_after_traffic.py [extra ws_echo flags]
Needs the `websockets` package (17.4): see .ci/python-clients.sh for a venv."""
import asyncio, os, subprocess, sys, time, json, re, resource
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
N = 2000
MSG = json.dumps([{"id": i, "name": "ws_echo", "tags": ["a", "b", "c"], "ok": True} for i in range(250)])[:16384]

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

async def scenario(port, pid, mode):
    conns = []
    base = rss(pid)
    for _ in range(N):
        if mode == "plain":
            ext = []
        elif mode == "deflate":
            ext = [ClientPerMessageDeflateFactory()]
        else:
            ext = [ClientPerMessageDeflateFactory(client_no_context_takeover=True)]
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None, extensions=ext, max_size=None, ping_interval=None)
        conns.append(ws)
    for ws in conns:
        await ws.send(MSG)
        assert await ws.recv() == MSG
    await asyncio.sleep(1.0)
    after = rss(pid)
    neg = conns[0].response.headers.get("Sec-WebSocket-Extensions", "none")
    print(f"{mode:>22}: idle RSS per connection after one 16 KiB message: {(after-base)/N:.2f} KiB   ({neg})")
    for ws in conns:
        await ws.close()

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    for mode in ["plain", "deflate", "client_no_context"]:
        p = subprocess.Popen(["./target/release/ws_echo", "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "warn,ws_echo::http::server=info"] + sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = p.stdout.readline()
        port = int(re.search(r'127\.0\.0\.1:(\d+)/', line).group(1))
        time.sleep(0.3)
        await scenario(port, p.pid, mode)
        p.terminate(); p.wait()
asyncio.run(main())
