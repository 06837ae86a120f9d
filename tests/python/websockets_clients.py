"""Python `websockets` clients against ws_echo: one with permessage-deflate, one without.

Each sends text and binary messages of several sizes (including empty, unicode, every
byte value, 1 MiB) and checks that every echo is byte-identical, that compression was
negotiated exactly when offered, and that the close handshake returns the code sent.
Usage: python websockets_clients.py ws://127.0.0.1:PORT/ws
"""

import asyncio
import os
import sys

import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

MESSAGES = [
    "",
    "Hello, world!",
    "κόσμε — 世界 — 🦀",
    "{\"id\": 1, \"tags\": [\"a\", \"b\"]} " * 5000,
    b"",
    bytes(range(256)),
    os.urandom(1 << 20),
    b"compressible " * 100_000,
]


async def run(url: str, compression: bool) -> None:
    extensions = [ClientPerMessageDeflateFactory()] if compression else []
    async with websockets.connect(
        url, compression=None, extensions=extensions, max_size=1 << 25
    ) as ws:
        negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ("permessage-deflate" in negotiated) == compression, negotiated
        for message in MESSAGES:
            await ws.send(message)
            echo = await ws.recv()
            assert type(echo) is type(message), (type(echo), type(message))
            assert echo == message, f"echo of {len(message)} units differs"
        await ws.close(code=4000, reason="done")
        assert ws.close_code == 4000, ws.close_code
    print(f"python websockets, compression {'on' if compression else 'off'}: "
          f"{len(MESSAGES)} echoes byte-identical ({negotiated or 'no extension'})")


async def main(url: str) -> None:
    await run(url, compression=True)
    await run(url, compression=False)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
