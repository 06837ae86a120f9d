//! Headless Chromium against the real server: the page served at `GET /` connects to
//! `/ws` on the host it was loaded from, echoes, and negotiates permessage-deflate with a
//! browser's own WebSocket client, which no Rust client in the other tests stands in for.
//!
//! Chromium and its DevTools protocol client live in `tests/common/chromium.rs`, shared
//! with the integration binary's https:// test. Without `/usr/bin/chromium` the browser
//! tests fail under CI and skip loudly elsewhere; they never pass silently.

#[path = "common/chromium.rs"]
mod chromium;

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use chromium::{Browser, DEADLINE, Result, chromium_or_skip};

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
    let browser = Browser::launch(&[]).await?;
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
    let browser = Browser::launch(&[]).await?;
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

/// Sets the test-controls builder the way a person would: fragment 3 and hello, then
/// Connect. Each builder input writes its own parameter into the Query field when told
/// of an edit, so the value is announced with an `input` event.
const CONNECT_WITH_FRAGMENT_AND_HELLO: &str = r#"(() => {
    const fragment = document.getElementById("ctl-fragment");
    fragment.value = "3";
    fragment.dispatchEvent(new Event("input", { bubbles: true }));
    const hello = document.getElementById("hello");
    if (!hello.checked) hello.click();
    document.getElementById("connect").click();
})()"#;

/// True once the page's current socket is the one Connect opened and it is open. The
/// socket from the page load stays `window.wsEcho.socket` until it has closed.
const CONTROLLED_SOCKET_OPEN: &str = r#"(() => {
    const socket = window.wsEcho.socket;
    return socket !== null && socket.readyState === WebSocket.OPEN
        && new URL(socket.url).searchParams.get("fragment") === "3";
})()"#;

/// True once "abcdefgh" came back whole (the server sent it as frames of 3, 3 and 2
/// bytes) as a received entry of 8 bytes, not flagged as differing from what was sent.
const ABCDEFGH_ECHOED: &str = r#"Array.from(document.querySelectorAll('#log li[data-dir="in"]'))
    .some((entry) => entry.querySelector(".data").textContent === "abcdefgh"
        && entry.dataset.bytes === "8"
        && !entry.querySelector(".meta").classList.contains("mismatch"))"#;

/// True once the greeting's "controls" field is shown in the handshake panel.
const FRAGMENT_IN_EFFECT: &str =
    r#"document.getElementById("handshake-controls").textContent.includes("fragment=3")"#;

/// The page's builder reaches the server: Connect opens `/ws?fragment=3&hello=1`, the
/// fragmented echo arrives whole, and the greeting reports the control in effect.
#[tokio::test]
async fn page_connects_with_test_controls_from_its_builder() -> Result<()> {
    if !chromium_or_skip() {
        return Ok(());
    }
    let server = Server::start().await?;
    let browser = Browser::launch(&[]).await?;
    let mut page = browser.open_page().await?;

    page.navigate(&format!("http://{}/", server.addr)).await?;
    // The socket of the page load first, so that Connect replaces an open socket.
    page.wait_until(SOCKET_OPEN).await?;

    page.evaluate(CONNECT_WITH_FRAGMENT_AND_HELLO).await?;
    let query = page
        .evaluate(r#"document.getElementById("query").value"#)
        .await?;
    assert_eq!(query, json!("fragment=3&hello=1"));
    page.wait_until(CONTROLLED_SOCKET_OPEN).await?;
    let socket_url = page.evaluate("window.wsEcho.socket.url").await?;
    assert_eq!(
        socket_url,
        json!(format!("ws://{}/ws?fragment=3&hello=1", server.addr))
    );

    page.evaluate(r#"window.wsEcho.send("abcdefgh")"#).await?;
    page.wait_until(ABCDEFGH_ECHOED).await?;
    page.wait_until(FRAGMENT_IN_EFFECT).await?;

    drop(page);
    drop(browser);
    server.stop().await
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
