//! Headless Chromium against the real server: the page served at `GET /` connects to
//! `/ws` on the host it was loaded from, echoes, and negotiates permessage-deflate with a
//! browser's own WebSocket client, which no Rust client in the other tests stands in for.
//!
//! Chromium is driven over the Chrome DevTools Protocol (CDP) on its WebSocket endpoint
//! with the same tokio-tungstenite the other tests use, not a browser-automation crate:
//! the handful of CDP methods needed here fit in [`Cdp`]. Without `/usr/bin/chromium` the
//! browser tests fail under CI and skip loudly elsewhere; they never pass silently.

use std::{
    collections::VecDeque,
    ffi::OsStr,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
    time::Instant,
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

/// Where Debian's `chromium` package installs the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for any one thing: Chromium starting, a CDP answer, the socket opening,
/// an echo. Each takes well under a second on the 2-core test machine; the rest is
/// margin for a loaded CI run.
const DEADLINE: Duration = Duration::from_secs(15);
/// How often the DOM is polled while a test waits for it.
const POLL: Duration = Duration::from_millis(25);

/// Errors end a test with the message; `?` works on CDP, JSON and I/O errors alike.
type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// True once the page's socket is open, as the page itself reports it.
const SOCKET_OPEN: &str = r#"document.getElementById("state").dataset.state === "open""#;

/// True once an echoed "Hello, world!" is in the log: a received entry, not the sent one.
const HELLO_ECHOED: &str = r#"Array.from(document.querySelectorAll('#log li[data-dir="in"] .data'))
    .some((entry) => entry.textContent === "Hello, world!")"#;

/// Sends 1 MiB of JSON lines through the page's own send, twice, and reports each echo
/// against what was sent. The second send matters: the browser keeps its deflate context
/// between messages (it is not asked for client_no_context_takeover), so the second
/// message may start with back-references into the last 32 KiB of the first, which the
/// server can inflate only if it kept its side of that context (RFC 7692 §7.1.1).
const ONE_MIB_ROUND_TRIPS: &str = r#"(async () => {
    const size = 1024 * 1024;
    const lines = [];
    for (let id = 0, length = 0; length < size; id++) {
        const line = JSON.stringify({ id, kind: "echo", tags: ["browser", "deflate"], ok: id % 3 === 0 }) + "\n";
        lines.push(line);
        length += line.length;
    }
    const text = lines.join("").slice(0, size);
    const socket = window.wsEcho.socket;
    const results = [];
    for (let round = 0; round < 2; round++) {
        const echo = await new Promise((resolve, reject) => {
            socket.addEventListener("message", (event) => resolve(event.data), { once: true });
            socket.addEventListener("close", (event) => reject(new Error(`closed with ${event.code} before the echo`)), { once: true });
            window.wsEcho.send(text);
        });
        results.push({
            sent: text.length,
            received: typeof echo === "string" ? echo.length : -1,
            identical: echo === text,
        });
    }
    return results;
})()"#;

/// Loads the page from `host`, sends its default "Hello, world!", and checks the echo in
/// the DOM and the console, and that the socket went to `host` (the URL follows
/// `location`).
async fn assert_page_echoes_hello_world(host: &str) -> Result<()> {
    if !chromium_or_skip() {
        return Ok(());
    }
    let server = Server::start().await?;
    let port = server.addr.port();
    let browser = Browser::launch().await?;
    let mut page = browser.open_page().await?;

    page.navigate(&format!("http://{host}:{port}/")).await?;
    page.wait_until(SOCKET_OPEN).await?;
    let expected_url = format!("ws://{host}:{port}/ws");
    let socket_url = page.evaluate("window.wsEcho.socket.url").await?;
    assert_eq!(socket_url.as_str(), Some(expected_url.as_str()));
    let shown_url = page
        .evaluate(r#"document.getElementById("url").textContent"#)
        .await?;
    assert_eq!(shown_url.as_str(), Some(expected_url.as_str()));

    page.evaluate(r#"document.getElementById("send").click()"#)
        .await?;
    page.wait_until(HELLO_ECHOED).await?;
    page.wait_for_console("onopen").await?;
    page.wait_for_console("onmessage: Hello, world!").await?;

    drop(page);
    drop(browser);
    server.stop().await
}

#[tokio::test]
async fn page_echoes_hello_world_via_localhost() -> Result<()> {
    // `localhost` may resolve to ::1 first and the server listens on 127.0.0.1 only:
    // Chromium's connect to [::1] is refused and it falls back to 127.0.0.1 (seen in
    // its net log), which is what this test relies on.
    assert_page_echoes_hello_world("localhost").await
}

#[tokio::test]
async fn page_echoes_hello_world_via_127_0_0_1() -> Result<()> {
    assert_page_echoes_hello_world("127.0.0.1").await
}

/// The page shows the extension Chromium negotiated, and two 1 MiB compressible texts
/// come back identical through the browser's deflate and the server's inflate.
#[tokio::test]
async fn browser_negotiates_deflate_and_echoes_one_mib_text() -> Result<()> {
    if !chromium_or_skip() {
        return Ok(());
    }
    let server = Server::start().await?;
    let browser = Browser::launch().await?;
    let mut page = browser.open_page().await?;

    page.navigate(&format!("http://{}/", server.addr)).await?;
    page.wait_until(SOCKET_OPEN).await?;
    let extensions = page
        .evaluate(r#"document.getElementById("extensions").textContent"#)
        .await?;
    assert!(
        extensions
            .as_str()
            .is_some_and(|shown| shown.starts_with("permessage-deflate")),
        "extensions shown: {extensions}"
    );

    let outcome = page.evaluate(ONE_MIB_ROUND_TRIPS).await?;
    let round_trip = json!({ "sent": 1 << 20, "received": 1 << 20, "identical": true });
    assert_eq!(outcome, json!([round_trip, round_trip]));

    drop(page);
    drop(browser);
    server.stop().await
}

#[test]
fn missing_chromium_fails_under_ci() {
    let status = chromium_status(Path::new("/nonexistent/chromium"), Some(OsStr::new("true")));
    assert!(
        matches!(&status, Chromium::Fail(message) if message.contains("apt-get install chromium")),
        "{status:?}"
    );
}

#[test]
fn missing_chromium_is_a_loud_skip_outside_ci() {
    for ci in [None, Some(OsStr::new(""))] {
        let status = chromium_status(Path::new("/nonexistent/chromium"), ci);
        assert!(
            matches!(&status, Chromium::Skip(message) if message.starts_with("SKIPPED: chromium not found")),
            "CI={ci:?}: {status:?}"
        );
    }
}

/// What a browser test does about Chromium.
#[derive(Debug)]
enum Chromium {
    /// Installed: run.
    Found,
    /// Missing on a developer's machine: say so loudly, then pass.
    Skip(String),
    /// Missing under CI, where a skipped browser test would be a silent pass: fail.
    Fail(String),
}

/// Decides from the browser's `path` and the `CI` variable; `CI` counts when non-empty,
/// as CI services set it to "true" or "1".
fn chromium_status(path: &Path, ci: Option<&OsStr>) -> Chromium {
    if path.exists() {
        return Chromium::Found;
    }
    let missing = format!(
        "chromium not found at {}; install it with apt-get install chromium",
        path.display()
    );
    if ci.is_some_and(|ci| !ci.is_empty()) {
        Chromium::Fail(format!(
            "{missing} (CI is set, so the browser tests must run)"
        ))
    } else {
        Chromium::Skip(format!("SKIPPED: {missing}"))
    }
}

/// Whether to run a browser test: panics under CI without Chromium, prints the skip
/// elsewhere.
fn chromium_or_skip() -> bool {
    match chromium_status(Path::new(CHROMIUM), std::env::var_os("CI").as_deref()) {
        Chromium::Found => true,
        Chromium::Skip(message) => {
            // Straight to the stderr handle: libtest captures `eprintln!` of passing
            // tests, and a skip nobody sees is the silent pass this is meant to avoid.
            let _ = writeln!(std::io::stderr(), "{message}");
            false
        }
        Chromium::Fail(message) => panic!("{message}"),
    }
}

/// A ws_echo server on an ephemeral loopback port, running in the test's runtime.
struct Server {
    /// The address the listener was bound to, known before serving starts.
    addr: SocketAddr,
    /// Fired by [`Server::stop`]; dropping it (a failed test) also starts shutdown.
    stop: oneshot::Sender<()>,
    /// The `ws_echo::run` task; its result is checked by [`Server::stop`].
    task: JoinHandle<Result<(), ws_echo::Error>>,
}

impl Server {
    /// Binds 127.0.0.1:0 and serves ws_echo with default settings on it.
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let settings = ws_echo::Settings {
            // Chromium is gone when the server stops, so nothing should be left to
            // drain; a short deadline keeps a connection left anyway from costing 10 s.
            shutdown_timeout: Duration::from_secs(2),
            ..ws_echo::Settings::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ws_echo::run(listener, settings, async {
            // A dropped sender means the test ended early; shut down then too.
            let _ = stopped.await;
        }));
        Ok(Self { addr, stop, task })
    }

    /// Shuts the server down and checks that `run` ended without an error.
    async fn stop(self) -> Result<()> {
        // An error here means `run` already returned; the join below says how.
        let _ = self.stop.send(());
        let ended = tokio::time::timeout(DEADLINE, self.task)
            .await
            .map_err(|_| "the server did not stop within the deadline")?;
        ended??;
        Ok(())
    }
}

/// A headless Chromium with a profile directory of its own. Dropping it kills the
/// browser and removes the profile, also when a test fails halfway.
struct Browser {
    /// The browser process (the Debian wrapper script `exec`s it, so this is Chromium).
    child: Child,
    /// The fresh `--user-data-dir`, removed on drop.
    profile: PathBuf,
    /// The browser's CDP endpoint, `ws://127.0.0.1:PORT/devtools/browser/ID`.
    endpoint: String,
}

impl Browser {
    /// Starts Chromium and waits for its DevTools endpoint.
    async fn launch() -> Result<Self> {
        let profile = fresh_profile_dir()?;
        let spawned = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&profile);
                return Err(format!("starting {CHROMIUM}: {error}").into());
            }
        };
        // From here on the guard owns the process and the profile.
        let mut browser = Self {
            child,
            profile,
            endpoint: String::new(),
        };
        let stderr = browser
            .child
            .stderr
            .take()
            .expect("invariant: stderr was piped when spawning");
        let (found, endpoint) = oneshot::channel();
        std::thread::spawn(move || read_devtools_endpoint(stderr, found));
        browser.endpoint = tokio::time::timeout(DEADLINE, endpoint)
            .await
            .map_err(|_| "Chromium printed no DevTools endpoint within the deadline")?
            .map_err(|_| "the thread reading Chromium's stderr ended")??;
        Ok(browser)
    }

    /// Opens a blank tab and a CDP connection attached to it, with page and console
    /// events on.
    async fn open_page(&self) -> Result<Cdp> {
        let mut cdp = Cdp::connect(&self.endpoint).await?;
        let target = cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or("Target.createTarget returned no targetId")?;
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or("Target.attachToTarget returned no sessionId")?;
        cdp.session = Some(session.to_owned());
        cdp.call("Page.enable", json!({})).await?;
        cdp.call("Runtime.enable", json!({})).await?;
        Ok(cdp)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SIGKILL: the helpers (zygote, renderers, crashpad) watch the browser process
        // and exit with it, so nothing outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Helpers exiting can still write into the profile for a moment after the
        // browser is reaped, which makes a single remove fail with "not empty".
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir_all(&self.profile) {
                Ok(()) => return,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
                Err(error) if std::time::Instant::now() >= until => {
                    eprintln!("could not remove {}: {error}", self.profile.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A new, empty directory for a browser profile, unique to this process and call.
fn fresh_profile_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ws_echo-browser-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // Only a killed earlier run with the same process id can have left this behind.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Reads Chromium's stderr on a thread of its own: sends the DevTools endpoint once it is
/// printed (or, at end of file, the last lines as the error), then keeps reading to the
/// end, because a full pipe would block the browser.
fn read_devtools_endpoint(stderr: impl Read, found: oneshot::Sender<Result<String, String>>) {
    const PREFIX: &str = "DevTools listening on ";
    let mut found = Some(found);
    let mut last_lines = VecDeque::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(endpoint) = line.strip_prefix(PREFIX) {
            if let Some(found) = found.take() {
                let _ = found.send(Ok(endpoint.trim().to_owned()));
            }
        } else if found.is_some() {
            if last_lines.len() == 20 {
                last_lines.pop_front();
            }
            last_lines.push_back(line);
        }
    }
    if let Some(found) = found {
        let lines = Vec::from(last_lines).join("\n");
        let _ = found.send(Err(format!(
            "Chromium exited without a DevTools endpoint; its stderr ended with:\n{lines}"
        )));
    }
}

/// One CDP connection to the browser, attached to one page through a flat session.
struct Cdp {
    /// The WebSocket to the browser endpoint; closed on drop.
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The page's session once attached; every call after that is sent to the page.
    session: Option<String>,
    /// The id of the last call; answers are matched to calls by it.
    last_id: u64,
    /// Events read while waiting for answers, oldest first.
    events: Vec<Value>,
}

impl Cdp {
    /// Connects to a CDP WebSocket endpoint; calls go to the browser until attached.
    async fn connect(endpoint: &str) -> Result<Self> {
        let (socket, _) = tokio::time::timeout(DEADLINE, connect_async(endpoint))
            .await
            .map_err(|_| "connecting to Chromium's DevTools timed out")??;
        Ok(Self {
            socket,
            session: None,
            last_id: 0,
            events: Vec::new(),
        })
    }

    /// Calls `method` and returns its result; events that arrive meanwhile are kept.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.last_id += 1;
        let id = self.last_id;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            request["sessionId"] = json!(session);
        }
        self.socket.send(Message::text(request.to_string())).await?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut message = self
                .next_message(deadline)
                .await
                .map_err(|error| format!("{method}: {error}"))?;
            if message["id"] != id {
                self.events.push(message);
            } else if let Some(error) = message.get("error") {
                return Err(format!("{method} failed: {error}").into());
            } else {
                return Ok(message["result"].take());
            }
        }
    }

    /// The next message from Chromium, answer or event.
    async fn next_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| format!("nothing from Chromium within {DEADLINE:?}"))?
                .ok_or("Chromium closed the DevTools connection")??;
            match frame {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Close(close) => {
                    return Err(
                        format!("Chromium closed the DevTools connection: {close:?}").into(),
                    );
                }
                _ => {}
            }
        }
    }

    /// Waits for an event that `matches`, kept or yet to come, after the first `skip`
    /// events.
    async fn wait_for_event(
        &mut self,
        skip: usize,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let mut checked = skip;
        loop {
            if self.events[checked.min(self.events.len())..]
                .iter()
                .any(&matches)
            {
                return Ok(());
            }
            checked = self.events.len();
            let event = self
                .next_message(deadline)
                .await
                .map_err(|error| format!("waiting for {what}: {error}"))?;
            self.events.push(event);
        }
    }

    /// Loads `url` and waits for its load event, so that the page's script has run.
    async fn navigate(&mut self, url: &str) -> Result<()> {
        let before = self.events.len();
        let navigated = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = navigated.get("errorText") {
            return Err(format!("loading {url}: {error}").into());
        }
        self.wait_for_event(before, "the page's load event", |event| {
            event["method"] == "Page.loadEventFired"
        })
        .await
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and returns
    /// its value as JSON; `undefined` comes back as null.
    async fn evaluate(&mut self, expression: &str) -> Result<Value> {
        let mut evaluated = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = evaluated.get("exceptionDetails") {
            let description = &exception["exception"]["description"];
            return Err(format!("`{expression}` threw: {description}").into());
        }
        Ok(evaluated["result"]["value"].take())
    }

    /// Polls `condition` until it evaluates to true; fails at the deadline.
    async fn wait_until(&mut self, condition: &str) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.evaluate(condition).await? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("still false after {DEADLINE:?}: {condition}").into());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the page to `console.log` exactly `line`.
    async fn wait_for_console(&mut self, line: &str) -> Result<()> {
        let waited = self
            .wait_for_event(0, &format!("console line {line:?}"), |event| {
                console_line(event).as_deref() == Some(line)
            })
            .await;
        waited.map_err(|error| {
            let seen: Vec<String> = self
                .events
                .iter()
                .filter_map(console_line)
                .map(|line| line.chars().take(80).collect())
                .collect();
            format!("{error}; the console had {seen:?}").into()
        })
    }
}

/// The text of a `Runtime.consoleAPICalled` event (its arguments joined by spaces, as
/// the console shows them), or `None` for any other event.
fn console_line(event: &Value) -> Option<String> {
    if event["method"] != "Runtime.consoleAPICalled" {
        return None;
    }
    let args = event["params"]["args"].as_array()?;
    let words: Vec<String> = args
        .iter()
        .map(|arg| match &arg["value"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect();
    Some(words.join(" "))
}
