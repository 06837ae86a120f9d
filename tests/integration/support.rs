//! Test helpers: an in-process server on port 0, a WebSocket client (tokio-tungstenite),
//! a raw frame-level client for the cases a well-behaved client library refuses to
//! produce, and a TLS client configuration that trusts one certificate.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::CloseFrame},
};
use ws_echo::Settings;

/// How long any single step of a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// Tests that load the machine (a thousand connections, RSS bounds, timings under
/// load) take this first, so that two of them never run at once on CI's two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other heavy test runs; the guard ends this one's turn.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// A client connected with tokio-tungstenite.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A server running in this process on an ephemeral port; stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ws_echo::Error>>>,
}

impl TestServer {
    /// Starts a server with default settings.
    pub async fn start() -> Self {
        Self::with(Settings::default()).await
    }

    /// Starts a server with `settings` on 127.0.0.1:0.
    pub async fn with(settings: Settings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(ws_echo::run(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects a tokio-tungstenite client to `/ws`.
    pub async fn connect(&self) -> Client {
        let (client, response) = tokio::time::timeout(STEP, connect_async(self.ws_url()))
            .await
            .expect("handshake in time")
            .expect("handshake succeeds");
        assert_eq!(response.status(), 101);
        client
    }

    /// Opens a raw TCP connection and completes the opening handshake with `extra`
    /// request headers. Returns the client and the response head.
    pub async fn raw(&self, extra: &str) -> (RawClient, String) {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        raw_handshake(stream, extra).await
    }

    /// A raw client that offered permessage-deflate with no parameters, after checking
    /// that the server agreed to it.
    pub async fn raw_deflate(&self) -> RawClient {
        let (client, head) = self
            .raw("Sec-WebSocket-Extensions: permessage-deflate\r\n")
            .await;
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-extensions: permessage-deflate"),
            "permessage-deflate was not agreed: {head}"
        );
        client
    }

    /// Sends a raw HTTP request and returns the whole response (the server closes or
    /// the response ends within the step time).
    pub async fn http(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut client = RawClient::new(stream);
        client.read_head().await
    }

    /// Begins the drain without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server and waits for its drain to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .expect("server stops in time")
                .expect("server task does not panic")
                .expect("server returns Ok");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Receives the next message, failing the test after [`STEP`]. Generic over the
/// transport: TCP, TLS, or an HTTP/2 stream.
pub async fn recv<S>(client: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(STEP, client.next())
        .await
        .expect("a message in time")
        .expect("the stream is open")
        .expect("a valid message")
}

/// Sends `message` and asserts the echo is identical, over any transport.
pub async fn assert_echoes<S>(client: &mut WebSocketStream<S>, message: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client.send(message.clone()).await.expect("send");
    let echo = recv(client).await;
    assert!(echo == message, "echo differs from what was sent");
}

/// The echo checks every transport passes (ws://, wss://, HTTP/2 with and without TLS):
/// text, every byte value as binary, and a 190 KB Unicode text.
pub async fn assert_echoes_text_and_binary<S>(client: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    assert_echoes(client, Message::text("Hello, world!")).await;
    assert_echoes(client, Message::binary((0..=255).collect::<Vec<u8>>())).await;
    assert_echoes(client, Message::text("κόσμε — 🦀 ".repeat(10_000))).await;
}

/// Receives until a Close arrives and returns its code and reason.
pub async fn expect_close<S>(client: &mut WebSocketStream<S>) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match recv(client).await {
            Message::Close(Some(CloseFrame { code, reason })) => {
                return (code.into(), reason.to_string());
            }
            Message::Close(None) => return (1005, String::new()),
            _ => continue,
        }
    }
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a Close frame (1005 when it carries none).
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, 0x8, "expected a Close frame, got {self:?}");
        if self.payload.len() < 2 {
            1005
        } else {
            u16::from_be_bytes([self.payload[0], self.payload[1]])
        }
    }
}

/// A client that writes arbitrary frames and reads the server's frames one by one, over
/// TCP or any other stream (an in-memory duplex in the paused-time tests).
pub struct RawClient<S = TcpStream> {
    pub stream: S,
    buffer: BytesMut,
    /// How long a read may wait; [`STEP`] unless a paused-time test sets it longer.
    pub patience: Duration,
}

/// Completes the opening handshake over `stream` with `extra` request headers and
/// returns the client and the response head.
pub async fn raw_handshake<S>(stream: S, extra: &str) -> (RawClient<S>, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (client, head) = raw_handshake_to(stream, "/ws", extra).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got: {head}"
    );
    (client, head)
}

/// Sends an opening handshake for `target` (path and query) over `stream` with `extra`
/// request headers and returns the client and the response head, whatever its status.
pub async fn raw_handshake_to<S>(stream: S, target: &str, extra: &str) -> (RawClient<S>, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = RawClient::new(stream);
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    client.send_bytes(request.as_bytes()).await;
    let head = client.read_head().await;
    (client, head)
}

/// The mask every raw client frame uses; any value is valid.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Encodes a client frame. `masked: false` produces an illegal unmasked client frame.
pub fn encode_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut frame = BytesMut::new();
    frame.put_u8((u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.put_u8(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            frame.put_u8(mask_bit | 126);
            frame.put_u16(len as u16);
        }
        len => {
            frame.put_u8(mask_bit | 127);
            frame.put_u64(len as u64);
        }
    }
    if masked {
        frame.put_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        frame.put_slice(payload);
    }
    frame.to_vec()
}

impl<S> RawClient<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    /// A raw client on a stream whose opening handshake is already done.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: BytesMut::new(),
            patience: STEP,
        }
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_bytes(&encode_frame(fin, false, opcode, payload, true))
            .await;
    }

    /// Sends bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads the response head of an HTTP exchange (status line and headers).
    pub async fn read_head(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.buffer.split_to(end + 4);
                return String::from_utf8_lossy(&head).into_owned();
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("response head in time")
                .expect("read");
            if read == 0 {
                return String::from_utf8_lossy(&self.buffer).into_owned();
            }
        }
    }

    /// Reads the next frame; `None` when the server closed the TCP connection.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            if let Some(frame) = self.parse_frame() {
                return Some(frame);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("a frame in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads frames until a Close and returns it, failing on a data frame.
    pub async fn expect_close(&mut self) -> RawFrame {
        loop {
            let frame = self
                .read_frame()
                .await
                .expect("a Close frame before the connection ends");
            match frame.opcode {
                0x8 => return frame,
                0xA => continue,
                _ => panic!("expected Close, got {frame:?}"),
            }
        }
    }

    /// Asserts the server closes the TCP connection (after any Close frame).
    pub async fn expect_eof(&mut self) {
        while let Some(frame) = self.read_frame().await {
            assert_eq!(
                frame.opcode, 0x8,
                "only a Close may come before the end, got {frame:?}"
            );
        }
    }

    fn parse_frame(&mut self) -> Option<RawFrame> {
        let buf = &self.buffer[..];
        if buf.len() < 2 {
            return None;
        }
        assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
        let (len, header) = match buf[1] & 0x7F {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            short => (short as usize, 2),
        };
        if buf.len() < header + len {
            return None;
        }
        let first = buf[0];
        self.buffer.advance(header);
        let payload = self.buffer.split_to(len).to_vec();
        Some(RawFrame {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            opcode: first & 0x0F,
            payload,
        })
    }
}

/// Compresses `data` as one permessage-deflate message (RFC 7692 §7.2.1).
pub fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("deflate");
    encoder.flush().expect("sync flush");
    let mut out = encoder.get_ref().clone();
    assert!(
        out.ends_with(&[0x00, 0x00, 0xff, 0xff]),
        "a sync flush ends with an empty block"
    );
    out.truncate(out.len() - 4);
    out
}

/// Decompresses one permessage-deflate message.
pub fn inflate(data: &[u8]) -> Vec<u8> {
    use flate2::{Decompress, FlushDecompress};
    let mut input = data.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut decompressor = Decompress::new(false);
    let mut out = Vec::with_capacity(data.len() * 4 + 1024);
    loop {
        let before = decompressor.total_in();
        decompressor
            .decompress_vec(&input[before as usize..], &mut out, FlushDecompress::Sync)
            .expect("inflate");
        if decompressor.total_in() as usize == input.len() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// The real binary, started on 127.0.0.1:0 and killed on drop if a test fails before it
/// exits.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub port: u16,
    /// The "ws_echo listening" log line (JSON).
    pub first_line: String,
    /// The log lines after the first, as a thread reads them.
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ServerProcess {
    /// Starts `ws_echo` with `args` and reads its port from the first log line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Starts `ws_echo` with `args` and the variables `env` set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(Self::command(args, env))
    }

    /// Starts `ws_echo` with `args` under `taskset -c 0`: a process allowed one CPU.
    pub fn start_on_one_cpu(args: &[&str]) -> Self {
        let server = Self::command(args, &[]);
        let mut command = std::process::Command::new("taskset");
        command
            .args(["-c", "0"])
            .arg(server.get_program())
            .args(server.get_args());
        for (name, value) in server.get_envs() {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        Self::spawn_command(command)
    }

    /// Spawns `command` and reads the port from its first log line.
    pub fn spawn_command(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start ws_echo");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut first_line = String::new();
        reader
            .read_line(&mut first_line)
            .expect("read the listening line");
        // `http://` or, with TLS, `https://`.
        let port = first_line
            .split("://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no listening URL in {first_line:?}"));
        // Keep draining the log so the server never blocks on a full pipe; keep it in a
        // file when WS_ECHO_TEST_LOG names one (for debugging a failing test).
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut copy = std::env::var_os("WS_ECHO_TEST_LOG")
                .map(|path| std::fs::File::create(path).expect("log file"));
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(file) = copy.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
                // Lines no test reads wait in the channel (a few per connection)
                // until the process handle is dropped.
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            port,
            first_line,
            lines,
        }
    }

    /// The next log line whose message contains `needle`, parsed; panics after [`STEP`].
    pub async fn next_line_with(&mut self, needle: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in time"))
                .expect("the server is running");
            let parsed: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            if parsed["fields"]["message"]
                .as_str()
                .is_some_and(|message| message.contains(needle))
            {
                return parsed;
            }
        }
    }

    /// The binary on 127.0.0.1:0 with `args`, JSON logs, `env` set, and nothing from the
    /// test's environment that would change how it starts.
    pub fn command(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ws_echo"));
        command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .envs(env.iter().copied());
        command
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Resident memory of the process, in bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The most resident memory the process has had, in bytes (VmHWM): peaks too short
    /// for sampling to see count too.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// A `/proc/PID/status` field given in kB, in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// CPU time the process's threads have used, to the nanosecond (the first field
    /// of each `/proc/PID/task/TID/schedstat`; `/proc/PID/stat` counts in 10 ms ticks,
    /// too coarse to see a timer firing every millisecond).
    pub fn cpu_time(&self) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .expect("list the process's threads");
        let nanos: u64 = tasks
            .filter_map(|task| {
                let path = task.ok()?.path().join("schedstat");
                let stat = std::fs::read_to_string(path).ok()?;
                stat.split(' ').next()?.parse::<u64>().ok()
            })
            .sum();
        Duration::from_nanos(nanos)
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "ws_echo did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rustls client configuration that trusts only `certificate` (DER) and offers `alpn`
/// (nothing offered when empty), on the same ring provider as the server.
pub fn tls_client_config(certificate: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            certificate.to_vec(),
        ))
        .expect("the certificate is a valid trust anchor");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Arc::new(config)
}
