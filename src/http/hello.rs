//! The opt-in greeting: a client that connects to `/ws?hello=1` first receives one JSON
//! text message describing its connection, then the echo starts.
//!
//! Nothing unsolicited is sent otherwise. Some echo servers greet every client, which
//! breaks clients (and tests) that expect their first message back first.

use std::net::SocketAddr;

use axum::extract::Request;
use serde_json::{Value, json};

use super::state::TlsInfo;
use crate::ws::handshake::Accepted;

/// Whether the query string asks for the greeting: `hello=1`, `hello=true` or a bare
/// `hello`.
pub(crate) fn requested(query: Option<&str>) -> bool {
    query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| matches!(pair, "hello" | "hello=1" | "hello=true"))
    })
}

/// The greeting for the connection that `request` opens.
pub(crate) fn message(
    request: &Request,
    peer: Option<SocketAddr>,
    accepted: &Accepted,
    connection_id: u64,
    instance: &str,
    controls: (&str, bool),
) -> String {
    let headers: Vec<Value> = request
        .headers()
        .iter()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let tls = request.extensions().get::<TlsInfo>().map(
        |tls| json!({ "protocol": tls.protocol, "alpn": tls.alpn, "server_name": tls.server_name }),
    );
    json!({
        "server": "ws_echo",
        "version": env!("CARGO_PKG_VERSION"),
        "instance": instance,
        "connection_id": connection_id,
        "peer": peer.map(|peer| peer.to_string()),
        "http_version": format!("{:?}", request.version()),
        "method": request.method().as_str(),
        "uri": request.uri().to_string(),
        "headers": headers,
        "subprotocol": accepted.subprotocol,
        "extensions": accepted.extensions.as_ref().map(|agreed| &agreed.response),
        "tls": tls,
        "controls": controls.0,
        "controls_enabled": controls.1,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_hello_asks_for_the_greeting() {
        assert!(requested(Some("hello=1")));
        assert!(requested(Some("a=b&hello")));
        assert!(requested(Some("hello=true&x=1")));
        assert!(!requested(None));
        assert!(!requested(Some("hello=0")));
        assert!(!requested(Some("say_hello=1")));
    }
}
