//! `/metrics`: parsed with a Prometheus text parser, counters matching what was sent.

use futures_util::SinkExt;
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestServer, assert_echoes, expect_close};

/// Fetches `/metrics` from `addr` and parses it.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).expect("valid Prometheus text")
}

/// Scrapes until no WebSocket is open any more (closes are counted when a connection's
/// task ends), and returns that scrape.
pub(crate) async fn scrape_when_closed(addr: std::net::SocketAddr) -> Scrape {
    let deadline = tokio::time::Instant::now() + crate::support::STEP;
    loop {
        let scrape = scrape(addr).await;
        if value(&scrape, "ws_echo_connections_open", &[]) == 0.0 {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection never counted as closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the sample `name` whose labels include every pair in `labels`.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

#[tokio::test]
async fn counters_match_what_a_client_sent() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    for i in 0..7 {
        assert_echoes(&mut client, Message::text(format!("text {i:03}"))).await; // 8 bytes each
    }
    for _ in 0..3 {
        assert_echoes(&mut client, Message::binary(vec![1u8; 100])).await;
    }
    let during = scrape(server.addr).await;
    assert_eq!(value(&during, "ws_echo_connections_open", &[]), 1.0);
    assert_eq!(
        value(
            &during,
            "ws_echo_handshakes_total",
            &[("result", "accepted")]
        ),
        1.0
    );
    for direction in ["in", "out"] {
        let text = [("direction", direction), ("type", "text")];
        let binary = [("direction", direction), ("type", "binary")];
        assert_eq!(value(&during, "ws_echo_messages_total", &text), 7.0);
        assert_eq!(value(&during, "ws_echo_message_bytes_total", &text), 56.0);
        assert_eq!(value(&during, "ws_echo_messages_total", &binary), 3.0);
        assert_eq!(
            value(&during, "ws_echo_message_bytes_total", &binary),
            300.0
        );
    }
    let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    };
    client.close(Some(normal)).await.expect("close");
    let _ = expect_close(&mut client).await;
    // The close is counted when the connection's task ends.
    let after = scrape_when_closed(server.addr).await;
    assert_eq!(
        value(
            &after,
            "ws_echo_closes_total",
            &[("side", "client"), ("code", "1000")]
        ),
        1.0
    );
}

#[tokio::test]
async fn refused_handshakes_and_limit_drops_are_counted() {
    let settings = ws_echo::Settings {
        max_message_size: 16,
        max_frame_size: 16,
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let _ = server.http("GET /ws HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let mut client = server.connect().await;
    client
        .send(Message::binary(vec![0u8; 17]))
        .await
        .expect("send");
    assert_eq!(expect_close(&mut client).await.0, 1009);
    let scrape = scrape_when_closed(server.addr).await;
    assert_eq!(
        value(
            &scrape,
            "ws_echo_handshakes_total",
            &[("result", "not_an_upgrade")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "ws_echo_limit_drops_total",
            &[("limit", "message_size")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "ws_echo_closes_total",
            &[("side", "server"), ("code", "1009")]
        ),
        1.0
    );
}

#[tokio::test]
async fn compression_ratio_counters_move_on_deflate_connections() {
    let server = TestServer::start().await;
    let mut client = server.raw_deflate().await;
    let text = "compressible ".repeat(1000);
    client
        .send_bytes(&crate::support::encode_frame(
            true,
            true,
            0x1,
            &crate::support::deflate(text.as_bytes()),
            true,
        ))
        .await;
    let echo = client.read_frame().await.expect("echo");
    assert!(echo.rsv1);
    let scrape = scrape(server.addr).await;
    let payload_out = value(
        &scrape,
        "ws_echo_deflate_message_bytes_total",
        &[("direction", "out")],
    );
    let wire_out = value(
        &scrape,
        "ws_echo_deflate_wire_bytes_total",
        &[("direction", "out")],
    );
    assert_eq!(payload_out, text.len() as f64);
    assert!(
        wire_out > 0.0 && wire_out < payload_out / 10.0,
        "wire {wire_out} vs payload {payload_out}"
    );
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let settings = ws_echo::Settings {
        metrics_addr: Some(free),
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let main = server
        .http("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(main.starts_with("HTTP/1.1 404"), "{main}");
    let deadline = tokio::time::Instant::now() + crate::support::STEP;
    while tokio::net::TcpStream::connect(free).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics listener never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let scrape = scrape(free).await;
    assert_eq!(value(&scrape, "ws_echo_connections_open", &[]), 0.0);
}
