#!/usr/bin/env python3
"""Memory and file-descriptor attacks on ws_echo, reproduced at full scale.

Usage:  python3 benches/attacks.py BINARY ATTACK [extra server flags...]
        ATTACK: inflate, stall, hold, h2idle or all. The extra flags go to every server
        started, e.g. `python3 benches/attacks.py target/release/ws_echo stall --ping-interval 0`.

Each attack starts its own server (`BINARY --listen 127.0.0.1:0 ...`, log in a temporary
file), samples its VmRSS every 100 ms while the attack runs (the peak; VmHWM as well),
measures RSS 1 s and 10 s after the attacking clients have left and prints the relevant
/metrics lines. Standard library only: raw sockets on asyncio, hand-made handshakes and
masked frames. Connection errors are counted, never fatal.

inflate  40 clients negotiate permessage-deflate with server_max_window_bits=9 and for
         10 s send 16 MiB messages (one random 16 KiB block repeated, ~130 KB on the
         wire), never reading. Shows what inflating each message and deflating its echo
         with a small window (it barely compresses) costs when nothing bounds it.
stall    (--stall-timeout 10s) 1,000 clients each send 4 x 1 MiB binary messages and
         never read. Samples the open-connections gauge and the close counters every
         second for up to 60 s: how and when the server drops them, and whether memory
         comes back. Run it again with `--ping-interval 0` to see the stall timeout alone.
hold     20 clients each send the first fragment (FIN=0) of a binary message, 16 MiB - 1
         bytes, and go silent; a polite client then times echoes of 100 KiB and 1 MiB
         (60 s limit each). The attackers close; the gauge and the server's CLOSE-WAIT
         sockets are sampled every second for 15 s. Shows whether held fragments starve
         everyone and whether the server notices peers that left.
h2idle   The server runs with RLIMIT_NOFILE ATTACK_H2_NOFILE (4096); ATTACK_H2_CONNS
         (5000) h2c prior-knowledge connections send the preface, an empty SETTINGS and
         one GET /healthz, then idle (acknowledging SETTINGS, answering PING). Counts how
         many stay open at 15 s and at ATTACK_H2_WAIT (80) s, and whether a fresh
         HTTP/1.1 GET /healthz is answered within 5 s meanwhile: idle HTTP/2 connections
         exhausting the server's file descriptors.

ATTACK_ROUNDS=N runs each attack N times against one server: each round's "before" is
what the previous round left, so the rounds show whether what stays resident grows
with every attack or was paid once. ATTACK_SMAPS=DIR saves the server's
/proc/PID/smaps before and 10 s after (DIR/before.smaps, DIR/after.smaps; the last
round's): which mappings hold what stayed.
"""
import asyncio, base64, collections, contextlib, functools, os, re, resource, socket, struct
import subprocess, sys, tempfile, threading, time, zlib

MiB = 1 << 20
HOST = "127.0.0.1"
METRICS = ("ws_echo_connections_open", "ws_echo_handshakes", "ws_echo_closes", "ws_echo_limit_drops",
           "ws_echo_messages_total", "ws_echo_deflate", "ws_echo_pings_sent")


def log(msg=""):
    print(msg, flush=True)


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


class Refused(ConnectionError):
    """The server answered the handshake with something other than 101."""


def describe(e):
    return str(e) if isinstance(e, Refused) else type(e).__name__


# ---------------------------------------------------------------- the server process

def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Server:
    """BINARY on 127.0.0.1:0 (the bound port is read from its log), optionally under a lower fd limit."""

    def __init__(self, binary, flags, nofile=None):
        self.logfile = tempfile.NamedTemporaryFile("w", prefix="ws_echo_attack_", suffix=".log", delete=False)
        cmd = [binary, "--listen", f"{HOST}:0", *flags]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, preexec_fn=limit)
        self.pid, deadline = self.proc.pid, time.monotonic() + 10
        while not (m := re.search(r"127\.0\.0\.1:(\d+)/", self.log())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"server did not start: {' '.join(cmd)}\n{self.log()}")
            time.sleep(0.05)
        self.port = int(m.group(1))
        log(f"server: {' '.join(cmd)}" + (f"   [RLIMIT_NOFILE {nofile}]" if nofile else "")
            + f"\n        pid {self.pid}, port {self.port}, log {self.logfile.name}")

    def log(self):
        with open(self.logfile.name, errors="replace") as f:
            return f.read()

    def rss(self):
        return proc_status(self.pid, "VmRSS")

    def rss_parts(self):
        """VmRSS, and its anonymous part: the rest is file pages (code paged in as it runs)."""
        return proc_status(self.pid, "VmRSS"), proc_status(self.pid, "RssAnon")

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


ROUNDS = int(os.environ.get("ATTACK_ROUNDS", 1))
KEPT = []  # with ATTACK_ROUNDS > 1: the server every round of one attack runs against


def server(binary, flags, nofile=None):
    """A new server for the attack, or with ATTACK_ROUNDS > 1 the one its first round
    started (stopped by `main` after the last round)."""
    if ROUNDS == 1:
        return Server(binary, flags, nofile)
    if not KEPT:
        KEPT.append(Server(binary, flags, nofile))
    return contextlib.nullcontext(KEPT[0])


class Peak(threading.Thread):
    """The server's VmRSS and RssAnon every 100 ms (a thread, so a busy event loop does not
    skew it): their peaks."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.peak_anon, self.halt = pid, 0, 0, threading.Event()
        self.start()

    def run(self):
        while not self.halt.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
                self.peak_anon = max(self.peak_anon, proc_status(self.pid, "RssAnon"))
            except OSError:
                return
            self.halt.wait(0.1)

    def stop(self):
        self.halt.set()
        self.join()
        return self.peak


TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


def server_sockets(port):
    """States of the server's TCP sockets on `port` (local side; not LISTEN, not TIME_WAIT), from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f][1:]
    return collections.Counter(TCP_STATES.get(int(r[3], 16), r[3]) for r in rows
                               if int(r[1].split(":")[1], 16) == port and r[3] not in ("0A", "06"))


def tcp_state(sock):
    """The client socket's TCP state, read with TCP_INFO (no data is read)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError as e:
        return describe(e)
    return TCP_STATES.get(state, str(state))


# ---------------------------------------------------------------- HTTP and /metrics

async def open_tcp(port, timeout=10.0):
    s = socket.socket()
    s.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (HOST, port)), timeout)
    except BaseException:
        s.close()
        raise
    return s


async def http_get(port, path, timeout=5.0):
    """(status, body) of an HTTP/1.1 GET; raises OSError (TimeoutError included) on failure."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        s = await open_tcp(port, timeout)
        try:
            await loop.sock_sendall(s, f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while chunk := await loop.sock_recv(s, 65536):
                data += chunk
        finally:
            s.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        raise ConnectionError("no HTTP answer")
    return int(head.split()[1]), body.decode(errors="replace")


async def healthz(port):
    """What a fresh HTTP/1.1 GET /healthz gets within 5 s."""
    try:
        status, _ = await http_get(port, "/healthz", 5.0)
        return f"HTTP {status}"
    except OSError as e:
        return "no answer within 5 s" if isinstance(e, TimeoutError) else describe(e)


async def metrics(port):
    """{series: value} from /metrics; {} when the server does not answer."""
    try:
        _, body = await http_get(port, "/metrics")
    except OSError:
        return {}
    out = {}
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def series(m, name):
    """Non-zero series of a labelled family, labels compacted: {'server/1008': 3.0}."""
    return {",".join(re.findall(r'="([^"]*)"', k)): v for k, v in m.items() if k.startswith(name + "{") and v}


def fmt(d):
    return " ".join(f"{k}:{v:g}" for k, v in d.items()) or "-"


# ---------------------------------------------------------------- WebSocket client side

def mask(data, key):
    n = len(data)
    keys = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ keys).to_bytes(n, "little")


def ws_frame(opcode, payload, fin=True, rsv1=False):
    """A masked client frame."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += struct.pack("!BH", 0xFE, n)
    else:
        head += struct.pack("!BQ", 0xFF, n)
    key = os.urandom(4)
    return head + key + mask(payload, key)


async def ws_open(port, extensions=None, timeout=10.0):
    """A WebSocket on /ws: (socket, response head, bytes read past the head)."""
    loop = asyncio.get_running_loop()
    s = await open_tcp(port, timeout)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
        await loop.sock_sendall(s, (f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                    f"Sec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
        buf = b""
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in buf:
                if not (chunk := await loop.sock_recv(s, 4096)):
                    raise ConnectionError("closed during the handshake")
                buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        head = head.decode(errors="replace")
        if not head.startswith("HTTP/1.1 101"):
            raise Refused(head.splitlines()[0])
        return s, head, rest
    except BaseException:
        s.close()
        raise


class Reader:
    """Messages from a WebSocket, answering pings on the way."""

    def __init__(self, sock, rest=b""):
        self.sock, self.buf = sock, bytearray(rest)

    async def exact(self, n):
        while len(self.buf) < n:
            if not (chunk := await asyncio.get_running_loop().sock_recv(self.sock, MiB)):
                raise ConnectionError("EOF")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def message(self):
        parts = []
        while True:
            b0, b1 = await self.exact(2)
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(await self.exact(2 if n == 126 else 8), "big")
            payload, op = await self.exact(n), b0 & 0x0F
            if op == 0x9:
                await asyncio.get_running_loop().sock_sendall(self.sock, ws_frame(0xA, payload))
            elif op == 0x8:
                raise ConnectionError(f"server sent Close {int.from_bytes(payload[:2], 'big') if n >= 2 else 1005}")
            elif op != 0xA:
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts)


async def connect_all(n, opener, outcome, concurrency=100):
    """n connections from `opener`, `concurrency` at a time; failures counted in `outcome`."""
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            try:
                return await opener()
            except OSError as e:
                outcome[f"connect failed: {describe(e)}"] += 1

    return [c for c in await asyncio.gather(*(one() for _ in range(n))) if c is not None]


def drain_and_close(sock):
    """Close with a FIN: read what is pending first (unread bytes would make the kernel send RST)."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def save_smaps(srv, label):
    """With ATTACK_SMAPS=DIR, the server's /proc/PID/smaps is copied to DIR/LABEL.smaps: which
    mappings hold the pages that stay resident."""
    if d := os.environ.get("ATTACK_SMAPS"):
        os.makedirs(d, exist_ok=True)
        with open(f"/proc/{srv.pid}/smaps") as src, open(os.path.join(d, f"{label}.smaps"), "w") as dst:
            dst.write(src.read())


async def start(srv):
    await asyncio.sleep(0.5)
    save_smaps(srv, "before")
    return srv.rss_parts(), Peak(srv.pid)


async def aftermath(srv, before, sampler, seconds=10, watch=None):
    """Called once the attacking clients have left: RSS at +1 s and +10 s, then /metrics."""
    peak, t0, rss = sampler.stop(), time.monotonic(), {}
    for t in range(1, max(seconds, 10) + 1):
        await asyncio.sleep(t0 + t - time.monotonic())
        rss[t] = srv.rss_parts()
        if watch:
            await watch(t)
    save_smaps(srv, "after")
    (before, before_anon), (one, _), (ten, ten_anon) = before, rss[1], rss[10]
    log(f"RSS: before {mib(before)}, peak {mib(peak)} (VmHWM {mib(proc_status(srv.pid, 'VmHWM'))}), "
        f"+1 s {mib(one)}, +10 s {mib(ten)}; anonymous: before {mib(before_anon)}, "
        f"peak {mib(sampler.peak_anon)}, +10 s {mib(ten_anon)}")
    log(f"server's sockets on port {srv.port} at +{max(seconds, 10)} s: {fmt(server_sockets(srv.port))}")
    m = await metrics(srv.port)
    log("/metrics:" if m else "/metrics: no answer")
    for k, v in m.items():
        if k.startswith(METRICS) and (v or k == "ws_echo_connections_open"):
            log(f"  {k} {v:g}")
    if n := srv.log().count("accept failed"):
        log(f"server log: {n} 'accept failed' warnings")


def show(outcome):
    for k, v in sorted(outcome.items()):
        log(f"  {v:6d}  {k}")


# ---------------------------------------------------------------- 1. inflate

INFLATE_CONNS, INFLATE_SECONDS = 40, 10


def extensions(head):
    m = re.search(r"(?im)^sec-websocket-extensions:(.*)$", head)
    return m.group(1).strip() if m else ""


@functools.cache
def deflated_message(window_bits):
    """A 16 MiB message (one random 16 KiB block, repeated) as one permessage-deflate frame."""
    c = zlib.compressobj(9, zlib.DEFLATED, -window_bits)
    body = c.compress(os.urandom(16 * 1024) * 1024) + c.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\0\0\xff\xff")
    return ws_frame(0x2, body[:-4], rsv1=True)


async def attack_inflate(binary, extra):
    log(f"== inflate: {INFLATE_CONNS} clients, 16 MiB deflated messages for {INFLATE_SECONDS} s, never reading")
    loop, outcome, sent = asyncio.get_running_loop(), collections.Counter(), [0]
    with server(binary, extra) as srv:
        before, sampler = await start(srv)
        conns = await connect_all(INFLATE_CONNS, lambda: ws_open(srv.port, "permessage-deflate; server_max_window_bits=9"), outcome)
        log(f"wire size of one 16 MiB message: {len(deflated_message(15)):,} bytes")
        end = loop.time() + INFLATE_SECONDS

        async def client(s, head):
            if "permessage-deflate" not in (ext := extensions(head)):
                outcome["deflate declined"] += 1
                return
            bits = re.search(r"client_max_window_bits=(\d+)", ext)
            frame = deflated_message(int(bits.group(1)) if bits else 15)
            try:
                async with asyncio.timeout_at(end):
                    while True:
                        await loop.sock_sendall(s, frame)
                        sent[0] += 1
            except TimeoutError:
                outcome["still connected at the end"] += 1
            except OSError as e:
                outcome[f"send failed: {describe(e)}"] += 1

        if conns:
            log(f"negotiated: {extensions(conns[0][1]) or 'no extension'}")
        await asyncio.gather(*(client(s, head) for s, head, _ in conns))
        for s, _, _ in conns:
            s.close()
        log(f"clients: {sent[0]} messages of 16 MiB ({len(deflated_message(15)) * sent[0] / 1e6:.0f} MB on the wire) fully written to the kernel")
        show(outcome)
        await aftermath(srv, before, sampler)


# ---------------------------------------------------------------- 2. stall

STALL_CONNS, STALL_MESSAGES, STALL_WATCH = 1000, 4, 60


async def attack_stall(binary, extra):
    flags = extra if any(a.startswith("--stall-timeout") for a in extra) else ["--stall-timeout", "10s", *extra]
    log(f"== stall: {STALL_CONNS} clients send {STALL_MESSAGES} x 1 MiB and never read")
    loop, outcome = asyncio.get_running_loop(), collections.Counter()
    with server(binary, flags) as srv:
        before, sampler = await start(srv)
        conns = await connect_all(STALL_CONNS, lambda: ws_open(srv.port), outcome)
        frame = ws_frame(0x2, os.urandom(MiB))
        t0 = loop.time()
        log(f"{len(conns)} connected; all start sending at t=0")

        async def client(s):
            try:
                for _ in range(STALL_MESSAGES):
                    await loop.sock_sendall(s, frame)
                return f"all {STALL_MESSAGES} messages written to the kernel"
            except OSError as e:
                return f"send failed ({describe(e)})"

        tasks = [asyncio.create_task(client(s)) for s, _, _ in conns]
        shown, first_close, zero_at = None, None, None
        for t in range(1, STALL_WATCH + 1):
            await asyncio.sleep(t0 + t - loop.time())
            m = await metrics(srv.port)
            gauge = m.get("ws_echo_connections_open")
            line = (f"open {gauge:g}" if gauge is not None else "no /metrics answer",
                    fmt(series(m, "ws_echo_closes_total")), fmt(series(m, "ws_echo_limit_drops_total")))
            if line != shown:
                log(f"  t={t:2d}s  {line[0]:<9}  closes {line[1]}   limit drops {line[2]}   RSS {mib(srv.rss())}")
                shown = line
            if gauge is not None and gauge < len(conns) and first_close is None:
                first_close = t
            if gauge == 0:
                zero_at = t
                break
        log(f"first server close seen at " + (f"t={first_close} s" if first_close else "no point")
            + "; connections_open reached 0 " + (f"at t={zero_at} s" if zero_at else f"at no point within {STALL_WATCH} s"))
        for task in tasks:
            if task.done():
                outcome[task.result()] += 1
            else:
                outcome["still blocked writing"] += 1
                task.cancel()
        outcome.update(f"client socket {tcp_state(s)}" for s, _, _ in conns)
        await asyncio.gather(*tasks, return_exceptions=True)
        for s, _, _ in conns:
            s.close()
        show(outcome)
        await aftermath(srv, before, sampler)


# ---------------------------------------------------------------- 3. hold

HOLD_CONNS, HOLD_LENGTH = 20, 16 * MiB - 1


async def attack_hold(binary, extra):
    log(f"== hold: {HOLD_CONNS} clients each send a FIN=0 fragment of {HOLD_LENGTH:,} bytes and go silent")
    loop, outcome = asyncio.get_running_loop(), collections.Counter()
    with server(binary, extra) as srv:
        before, sampler = await start(srv)
        conns = await connect_all(HOLD_CONNS, lambda: ws_open(srv.port), outcome)
        frame = memoryview(ws_frame(0x2, os.urandom(HOLD_LENGTH), fin=False))
        sent = [0] * len(conns)

        async def push(i, s):
            for off in range(0, len(frame), MiB):
                await loop.sock_sendall(s, frame[off:off + MiB])
                sent[i] = min(off + MiB, len(frame))

        tasks = [asyncio.create_task(push(i, s)) for i, (s, _, _) in enumerate(conns)]
        t0 = last_progress = loop.time()
        last = -1
        while not all(t.done() for t in tasks) and loop.time() - last_progress < 5 and loop.time() - t0 < 60:
            await asyncio.sleep(0.5)
            if sum(sent) != last:
                last, last_progress = sum(sent), loop.time()
        outcome.update(("whole fragment written" if t.done() and not t.exception() else
                        f"send failed ({describe(t.exception())})" if t.done() else "blocked writing") for t in tasks)
        log(f"attackers after {loop.time() - t0:.1f} s: {sum(sent) / MiB:.0f} of {len(conns) * len(frame) / MiB:.0f} MiB "
            f"written to the kernel; RSS {mib(srv.rss())}")
        show(outcome)

        polite = None
        try:
            polite, _, rest = await ws_open(srv.port)
            reader = Reader(polite, rest)
            for size in (100 * 1024, MiB):
                payload, t = os.urandom(size), loop.time()
                try:
                    async with asyncio.timeout(60):
                        await loop.sock_sendall(polite, ws_frame(0x2, payload))
                        echo = await reader.message()
                except TimeoutError:
                    log(f"polite client: {size // 1024} KiB: no echo within 60 s")
                    break
                log(f"polite client: {size // 1024} KiB echoed in {loop.time() - t:.3f} s" + ("" if echo == payload else " (WRONG BYTES)"))
        except OSError as e:
            log(f"polite client: {describe(e)}")
        polite_open = 0 if polite is None or polite.fileno() < 0 or tcp_state(polite) != "ESTABLISHED" else 1

        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s, _, _ in conns:
            drain_and_close(s)
        log(f"attackers closed their sockets; sampling for 15 s (polite-only count: {polite_open})")
        reached = []

        async def watch(t):
            gauge = (await metrics(srv.port)).get("ws_echo_connections_open")
            log(f"  +{t:2d}s  connections_open {gauge if gauge is None else f'{gauge:g}'}  CLOSE-WAIT {server_sockets(srv.port)['CLOSE_WAIT']}  RSS {mib(srv.rss())}")
            if gauge == polite_open and not reached:
                reached.append(t)

        await aftermath(srv, before, sampler, seconds=15, watch=watch)
        log(f"connections_open reached the polite-only count {polite_open} " + (f"at +{reached[0]} s" if reached else "never within 15 s"))
        if polite:
            polite.close()


# ---------------------------------------------------------------- 4. h2idle

def h2_frame(ftype, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


H2_STATUS = {0x88: "200", 0x89: "204", 0x8A: "206", 0x8B: "304", 0x8C: "400", 0x8D: "404", 0x8E: "500"}


async def h2_idle(s, hello, stats):
    """One idle h2c client: the request, then answer SETTINGS and PING until the server leaves."""
    loop, buf = asyncio.get_running_loop(), bytearray()
    try:
        await loop.sock_sendall(s, hello)
        while chunk := await loop.sock_recv(s, 65536):
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + (length := int.from_bytes(buf[:3], "big")):
                ftype, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload = bytes(buf[9:9 + length])
                del buf[:9 + length]
                if ftype == 4 and not flags & 1:
                    await loop.sock_sendall(s, h2_frame(4, 1, 0))
                elif ftype == 6 and not flags & 1:
                    await loop.sock_sendall(s, h2_frame(6, 1, 0, payload))
                elif ftype == 1 and stream == 1:
                    stats[f"answered {H2_STATUS.get(payload[0], 'other status') if payload else '?'}"] += 1
                elif ftype == 7:
                    stats["GOAWAY received"] += 1
        stats["closed by the server (EOF)"] += 1
    except OSError as e:
        stats[f"closed by the server ({describe(e)})"] += 1


async def attack_h2idle(binary, extra):
    nofile = int(os.environ.get("ATTACK_H2_NOFILE", 4096))
    count = int(os.environ.get("ATTACK_H2_CONNS", 5000))
    wait = float(os.environ.get("ATTACK_H2_WAIT", 80))
    log(f"== h2idle: {count} idle h2c connections against RLIMIT_NOFILE {nofile}")
    loop, outcome, stats = asyncio.get_running_loop(), collections.Counter(), collections.Counter()
    with server(binary, extra, nofile=nofile) as srv:
        before, sampler = await start(srv)
        authority, path = f"{HOST}:{srv.port}".encode(), b"/healthz"
        # HPACK: :method GET, :scheme http (indexed); :path and :authority literal without indexing.
        block = b"\x82\x86\x04" + bytes([len(path)]) + path + b"\x01" + bytes([len(authority)]) + authority
        hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0) + h2_frame(1, 0x4 | 0x1, 1, block)
        tasks = []

        async def opener():  # each client speaks as soon as it is connected
            s = await open_tcp(srv.port, 10.0)
            tasks.append(asyncio.create_task(h2_idle(s, hello, stats)))
            return s

        t_open = loop.time()
        socks = await connect_all(count, opener, outcome, concurrency=200)
        t0 = loop.time()
        log(f"{len(socks)} of {count} TCP connections open after {t0 - t_open:.1f} s")
        show(outcome)

        async def checkpoint(label):
            closed = sum(v for k, v in stats.items() if k.startswith("closed"))
            answered = {k.split()[1]: v for k, v in stats.items() if k.startswith("answered")}
            log(f"  {label}: {len(socks) - closed} open ({closed} closed by the server), answered {fmt(answered)}, "
                f"GOAWAY {stats['GOAWAY received']}; server fds {srv.fds()}, RSS {mib(srv.rss())}; "
                f"new HTTP/1.1 GET /healthz: {await healthz(srv.port)}")

        await asyncio.sleep(1)
        await checkpoint("t=1s")
        for at in sorted({min(15.0, wait), wait}):
            await asyncio.sleep(t0 + at - loop.time())
            await checkpoint(f"t={at:g}s")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in socks:
            s.close()
        log("all clients closed")

        async def recovered(t):
            if t in (1, 10):
                log(f"  +{t}s: server fds {srv.fds()}; new HTTP/1.1 GET /healthz: {await healthz(srv.port)}")

        await aftermath(srv, before, sampler, watch=recovered)


ATTACKS = {"inflate": attack_inflate, "stall": attack_stall, "hold": attack_hold, "h2idle": attack_h2idle}


def main():
    if len(sys.argv) < 3 or sys.argv[2] not in (*ATTACKS, "all"):
        sys.exit(__doc__)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    binary, extra = sys.argv[1], sys.argv[3:]
    for name in ATTACKS if sys.argv[2] == "all" else [sys.argv[2]]:
        for round in range(1, ROUNDS + 1):
            started = time.monotonic()
            if ROUNDS > 1:
                log(f"-- round {round} of {ROUNDS}")
            asyncio.run(ATTACKS[name](binary, extra))
            log(f"({name}: {time.monotonic() - started:.0f} s)\n")
        while KEPT:
            KEPT.pop().stop()


if __name__ == "__main__":
    main()
