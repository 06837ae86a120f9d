//! Headless Chromium over https:// against the real binary with `--tls-self-signed`: the
//! page loads over HTTP/2 (ALPN h2), its WebSocket goes to wss:// on the same connection
//! as an RFC 8441 extended CONNECT, and messages echo.
//!
//! The server's own log is the witness for the transport: every WebSocket's span carries
//! `http_version`, and Chromium sends an extended CONNECT only when the server's SETTINGS
//! allow it. Chromium is driven over the DevTools protocol (CDP) with tokio-tungstenite.
//! Without `/usr/bin/chromium` this fails under CI and skips loudly elsewhere.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::mpsc, time::Instant};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

/// Where Debian's `chromium` package installs the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for one step: Chromium starting, a page loading, an echo. Each takes
/// well under a second here; the rest is margin for a loaded 2-core CI run.
const DEADLINE: Duration = Duration::from_secs(20);

/// Resolves once the page's own socket is open. The page keeps it in `window.wsEcho`
/// or in a top-level `socket`, depending on its version; either will do.
const PAGE_SOCKET_OPEN: &str = r#"new Promise((resolve) => {
    const timer = setInterval(() => {
        const pageSocket = (window.wsEcho && window.wsEcho.socket)
            || (typeof socket !== "undefined" ? socket : null);
        if (pageSocket && pageSocket.readyState === WebSocket.OPEN) {
            clearInterval(timer);
            resolve(pageSocket.url);
        }
    }, 20);
})"#;

/// A second WebSocket opened by script on the https:// page: the browser's own client
/// round-trips a message and reports what it negotiated.
const ROUND_TRIP: &str = r#"new Promise((resolve, reject) => {
    const socket = new WebSocket("wss://" + location.host + "/ws");
    socket.onopen = () => socket.send("echo from chromium over h2");
    socket.onmessage = (event) => {
        resolve({ data: event.data, extensions: socket.extensions, url: socket.url });
        socket.close(1000);
    };
    socket.onerror = () => reject(new Error("WebSocket error"));
})"#;

#[tokio::test]
async fn chromium_echoes_over_wss_using_http2_extended_connect() {
    if !chromium_or_skip() {
        return;
    }
    let mut server = Server::start();
    let origin = format!("https://127.0.0.1:{}", server.port);
    let browser = Browser::launch();
    let mut cdp = Cdp::connect(&browser.endpoint).await;

    let target = cdp
        .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
        .await;
    let attached = cdp
        .call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
    let session = attached["sessionId"]
        .as_str()
        .expect("a session id")
        .to_owned();
    cdp.call(Some(&session), "Page.enable", json!({})).await;
    cdp.call(Some(&session), "Runtime.enable", json!({})).await;
    cdp.call(
        Some(&session),
        "Page.navigate",
        json!({ "url": format!("{origin}/") }),
    )
    .await;
    cdp.event(|event| event["method"] == "Page.loadEventFired")
        .await;

    // The page's own socket, built from `location`: wss:// on the page's host.
    let url = cdp.evaluate(&session, PAGE_SOCKET_OPEN).await;
    assert_eq!(url, json!(format!("wss://127.0.0.1:{}/ws", server.port)));
    let opened = server.next_line_with("connection opened").await;
    assert_eq!(
        opened["span"]["http_version"], "HTTP/2.0",
        "the page's WebSocket is an extended CONNECT: {opened}"
    );

    // Its Send button: the server gets the message on that HTTP/2 stream, and the page
    // logs the echo.
    cdp.evaluate(&session, r#"document.getElementById("send").click()"#)
        .await;
    let received = server.next_line_with("Got message").await;
    assert_eq!(received["span"]["http_version"], "HTTP/2.0", "{received}");
    assert!(
        received["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("Hello, world!")),
        "{received}"
    );
    cdp.event(|event| {
        event["method"] == "Runtime.consoleAPICalled"
            && event["params"]["args"][0]["value"] == "onmessage: Hello, world!"
    })
    .await;

    // A socket of our own from the same page: the browser's client round-trips, with
    // permessage-deflate, over HTTP/2 as well.
    let round_trip = cdp.evaluate(&session, ROUND_TRIP).await;
    assert_eq!(round_trip["data"], "echo from chromium over h2");
    assert!(
        round_trip["extensions"]
            .as_str()
            .is_some_and(|extensions| extensions.starts_with("permessage-deflate")),
        "{round_trip}"
    );
    let opened = server.next_line_with("connection opened").await;
    assert_eq!(opened["span"]["http_version"], "HTTP/2.0", "{opened}");
    assert_eq!(opened["fields"]["compressed"], true, "{opened}");
}

/// Whether to run: Chromium is installed. Missing, it fails when `CI` is non-empty and
/// otherwise skips with a message that cannot be missed.
fn chromium_or_skip() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    let message =
        format!("chromium not found at {CHROMIUM}; install it with apt-get install chromium");
    if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
        panic!("{message}");
    }
    eprintln!("\n*** SKIPPED: {message} ***\n");
    false
}

/// The `ws_echo` binary with a self-signed certificate and JSON debug logs; killed on
/// drop. Its log lines arrive on a channel, read by a thread.
struct Server {
    child: Child,
    port: u16,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ws_echo"))
            .args(["--listen", "127.0.0.1:0", "--tls-self-signed"])
            .args(["--log-format", "json", "--log-level", "debug"])
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ws_echo");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut first = String::new();
        stdout
            .read_line(&mut first)
            .expect("read the listening line");
        let (send, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let port = first
            .split("\"url\":\"https://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no https URL in {first:?}"));
        Self { child, port, lines }
    }

    /// The next log line whose message contains `needle`, parsed.
    async fn next_line_with(&mut self, needle: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in time"))
                .expect("the server is running");
            let parsed: Value = serde_json::from_str(&line).expect("a JSON log line");
            if parsed["fields"]["message"]
                .as_str()
                .is_some_and(|message| message.contains(needle))
            {
                return parsed;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless Chromium with a throwaway profile; killed and cleaned up on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    /// The browser's DevTools WebSocket.
    endpoint: String,
}

impl Browser {
    fn launch() -> Self {
        let profile = std::env::temp_dir().join(format!("ws_echo-chromium-{}", std::process::id()));
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                // Root in a container has no user namespaces for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                // QUIC would bypass the TCP connection whose HTTP/2 we are testing.
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // The certificate is self-signed: the point here is HTTP/2, not trust.
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("piped stderr");
        let (send, found) = std::sync::mpsc::channel();
        // Keeps reading to the end: a full pipe would block the browser.
        std::thread::spawn(move || {
            let mut send = Some(send);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(endpoint) = line.strip_prefix("DevTools listening on ") {
                    if let Some(send) = send.take() {
                        let _ = send.send(endpoint.trim().to_owned());
                    }
                }
            }
        });
        let endpoint = found
            .recv_timeout(DEADLINE)
            .expect("Chromium prints its DevTools endpoint");
        Self {
            child,
            profile,
            endpoint,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's helper processes outlive the main one by a moment and write to the
        // profile as they go, so a single removal can leave it behind.
        for _ in 0..20 {
            let _ = std::fs::remove_dir_all(&self.profile);
            std::thread::sleep(Duration::from_millis(50));
            if !self.profile.exists() {
                break;
            }
        }
    }
}

/// A minimal CDP client: numbered calls, and events kept until asked for.
struct Cdp {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
}

impl Cdp {
    async fn connect(endpoint: &str) -> Self {
        let (socket, _) = tokio::time::timeout(DEADLINE, connect_async(endpoint))
            .await
            .expect("CDP connects in time")
            .expect("CDP connects");
        Self {
            socket,
            next_id: 1,
            events: Vec::new(),
        }
    }

    /// Calls `method` (on the page `session`, or the browser) and returns its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            request["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .expect("send a CDP call");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let message = self.next_message(deadline).await;
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
            self.events.push(message);
        }
    }

    /// Evaluates `expression` in the page, awaiting a promise, and returns its value.
    async fn evaluate(&mut self, session: &str, expression: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits for an event that `wanted` picks, among those already received or to come.
    async fn event(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.events.iter().position(&wanted) {
            return self.events.remove(index);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let event = self.next_message(deadline).await;
            if wanted(&event) {
                return event;
            }
            self.events.push(event);
        }
    }

    /// The next CDP message, answer or event, failing the test past `deadline`: a page
    /// that keeps sending events must not keep a wait alive.
    async fn next_message(&mut self, deadline: Instant) -> Value {
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a CDP message in time")
                .expect("CDP is open")
                .expect("a CDP message");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).expect("CDP sends JSON");
            }
        }
    }
}
