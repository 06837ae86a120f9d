//! Headless Chromium for the browser tests, driven over the Chrome DevTools Protocol
//! (CDP): one copy, included by `tests/browser.rs` (the page over http://) and by the
//! integration binary's `browser_tls` (https:// and HTTP/2) with `#[path]`.
//!
//! CDP runs on Chromium's WebSocket endpoint with the same tokio-tungstenite the other
//! tests use, not a browser-automation crate: the handful of CDP methods needed here fit
//! in [`Cdp`]. Without `/usr/bin/chromium` the browser tests fail under CI and skip
//! loudly elsewhere; they never pass silently.

// Each test binary that includes this file uses a different part of it.
#![allow(dead_code)]

use std::{
    collections::VecDeque,
    ffi::OsStr,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::oneshot, time::Instant};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

/// Where Debian's `chromium` package installs the browser.
pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for any one thing: Chromium starting, a CDP answer, a page loading, the
/// socket opening, an echo. Each takes well under a second on the 2-core test machine;
/// the rest is margin for a loaded CI run.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);
/// How often the DOM is polled while a test waits for it.
const POLL: Duration = Duration::from_millis(25);

/// Errors end a test with the message; `?` works on CDP, JSON and I/O errors alike.
pub(crate) type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// What a browser test does about Chromium.
#[derive(Debug)]
pub(crate) enum Chromium {
    /// Installed: run.
    Found,
    /// Missing on a developer's machine: say so loudly, then pass.
    Skip(String),
    /// Missing under CI, where a skipped browser test would be a silent pass: fail.
    Fail(String),
}

/// Decides from the browser's `path` and the `CI` variable; `CI` counts when non-empty,
/// as CI services set it to "true" or "1".
pub(crate) fn chromium_status(path: &Path, ci: Option<&OsStr>) -> Chromium {
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
pub(crate) fn chromium_or_skip() -> bool {
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

/// A headless Chromium with a profile directory of its own. Dropping it kills the
/// browser and removes the profile, also when a test fails halfway.
pub(crate) struct Browser {
    /// The browser process (the Debian wrapper script `exec`s it, so this is Chromium).
    child: Child,
    /// The fresh `--user-data-dir`, removed on drop.
    profile: PathBuf,
    /// The browser's CDP endpoint, `ws://127.0.0.1:PORT/devtools/browser/ID`.
    endpoint: String,
}

impl Browser {
    /// Starts Chromium with `extra_args` and waits for its DevTools endpoint.
    pub(crate) async fn launch(extra_args: &[&str]) -> Result<Self> {
        let profile = fresh_profile_dir()?;
        let spawned = Command::new(CHROMIUM)
            .args([
                "--headless",
                // Root in a container has no user namespaces for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                // QUIC would bypass the TCP connection whose HTTP/1.1 or HTTP/2 is tested.
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .args(extra_args)
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
    pub(crate) async fn open_page(&self) -> Result<Cdp> {
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
pub(crate) struct Cdp {
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
    pub(crate) async fn connect(endpoint: &str) -> Result<Self> {
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
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
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
    pub(crate) async fn wait_for_event(
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
    pub(crate) async fn navigate(&mut self, url: &str) -> Result<()> {
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
    pub(crate) async fn evaluate(&mut self, expression: &str) -> Result<Value> {
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
    pub(crate) async fn wait_until(&mut self, condition: &str) -> Result<()> {
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
    pub(crate) async fn wait_for_console(&mut self, line: &str) -> Result<()> {
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
pub(crate) fn console_line(event: &Value) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
