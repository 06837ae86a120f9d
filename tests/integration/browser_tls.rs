//! Headless Chromium over https:// against the real binary with `--tls-self-signed`: the
//! page loads over HTTP/2 (ALPN h2), its WebSocket goes to wss:// on the same connection
//! as an RFC 8441 extended CONNECT, and messages echo.
//!
//! The server's own log is the witness for the transport: every WebSocket's span carries
//! `http_version`, and Chromium sends an extended CONNECT only when the server's SETTINGS
//! allow it. Chromium and its DevTools client are `tests/common/chromium.rs`, shared with
//! `tests/browser.rs`. Without `/usr/bin/chromium` this fails under CI and skips loudly
//! elsewhere.

use serde_json::json;

use crate::{
    chromium::{Browser, Result, chromium_or_skip},
    support::ServerProcess,
};

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
async fn chromium_echoes_over_wss_using_http2_extended_connect() -> Result<()> {
    if !chromium_or_skip() {
        return Ok(());
    }
    // A self-signed certificate and JSON debug logs, which show every message.
    let mut server = ServerProcess::start(&["--tls-self-signed", "--log-level", "debug"]);
    // The certificate is self-signed: the point here is HTTP/2, not trust.
    let browser = Browser::launch(&["--ignore-certificate-errors"]).await?;
    let mut page = browser.open_page().await?;
    page.navigate(&format!("https://127.0.0.1:{}/", server.port))
        .await?;

    // The page's own socket, built from `location`: wss:// on the page's host.
    let url = page.evaluate(PAGE_SOCKET_OPEN).await?;
    assert_eq!(url, json!(format!("wss://127.0.0.1:{}/ws", server.port)));
    let opened = server.next_line_with("connection opened").await;
    assert_eq!(
        opened["span"]["http_version"], "HTTP/2.0",
        "the page's WebSocket is an extended CONNECT: {opened}"
    );

    // Its Send button: the server gets the message on that HTTP/2 stream, and the page
    // logs the echo.
    page.evaluate(r#"document.getElementById("send").click()"#)
        .await?;
    let received = server.next_line_with("Got message").await;
    assert_eq!(received["span"]["http_version"], "HTTP/2.0", "{received}");
    assert!(
        received["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("Hello, world!")),
        "{received}"
    );
    page.wait_for_console("onmessage: Hello, world!").await?;

    // A socket of our own from the same page: the browser's client round-trips, with
    // permessage-deflate, over HTTP/2 as well.
    let round_trip = page.evaluate(ROUND_TRIP).await?;
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
    Ok(())
}
