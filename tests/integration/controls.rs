//! Test controls in the WebSocket URL (`/ws?delay=…`), one test per control, asserting
//! what goes over the wire: raw clients see frame boundaries, Close frames and resets;
//! tokio-tungstenite stands in for an ordinary client.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};

use crate::support::{RawClient, RawFrame, STEP, TestServer, raw_handshake_to, recv};

/// Opens `/ws?QUERY` with a raw client; panics unless the server answers 101.
async fn raw(server: &TestServer, query: &str) -> (RawClient, String) {
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let (client, head) = raw_handshake_to(stream, &format!("/ws?{query}"), "").await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got: {head}"
    );
    (client, head)
}

/// The response to an upgrade of `/ws?QUERY` that the server refuses: head and body.
async fn refused(server: &TestServer, query: &str) -> (String, String) {
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    exchange(server, &request).await
}

/// Sends `request` on a fresh connection and reads the response to its end.
async fn exchange(server: &TestServer, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("response");
    let response = String::from_utf8(response).expect("text");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    (head.to_owned(), body.to_owned())
}

/// `GET path` on a fresh connection, read to its end: head and body.
async fn get(server: &TestServer, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    exchange(server, &request).await
}

fn text(payload: &str) -> RawFrame {
    RawFrame {
        fin: true,
        rsv1: false,
        opcode: 0x1,
        payload: payload.into(),
    }
}

#[tokio::test]
async fn delay_holds_each_echo_and_keeps_their_order_and_the_close_behind_them() {
    let server = TestServer::start().await;
    let (mut client, head) = raw(&server, "delay=300ms").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-ws-echo-controls: delay=300ms"),
        "{head}"
    );
    let sent = Instant::now();
    client.send(true, 0x1, b"first").await;
    client.send(true, 0x1, b"second").await;
    // The Close right behind them (as `websocat` sends at the end of its input) must
    // not overtake the delayed echoes.
    client.send(true, 0x8, &1000u16.to_be_bytes()).await;
    assert_eq!(client.read_frame().await, Some(text("first")));
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "echo after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "echo after {waited:?}");
    assert_eq!(client.read_frame().await, Some(text("second")));
    assert_eq!(client.expect_close().await.close_code(), 1000);
    client.expect_eof().await;
}

#[tokio::test]
async fn jitter_adds_up_to_its_bound_and_keeps_the_order() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "delay=100ms&jitter=200ms").await;
    let mut latest = Duration::ZERO;
    let mut spread = (Duration::MAX, Duration::ZERO);
    for round in 0..8 {
        let sent = Instant::now();
        client.send(true, 0x1, format!("m{round}").as_bytes()).await;
        assert_eq!(client.read_frame().await, Some(text(&format!("m{round}"))));
        let waited = sent.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        latest = latest.max(waited);
        spread = (spread.0.min(waited), spread.1.max(waited));
    }
    assert!(latest < Duration::from_millis(1500), "{latest:?}");
    assert!(
        spread.1 - spread.0 > Duration::from_millis(20),
        "8 jittered delays all alike: {spread:?}"
    );
}

#[tokio::test]
async fn fragment_splits_every_echo_into_frames_of_at_most_n_bytes() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "fragment=3").await;
    client.send(true, 0x2, b"abcdefgh").await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(client.read_frame().await.expect("a frame"));
    }
    let shape: Vec<(bool, u8, &[u8])> = frames
        .iter()
        .map(|frame| (frame.fin, frame.opcode, frame.payload.as_slice()))
        .collect();
    assert_eq!(
        shape,
        [
            (false, 0x2, b"abc".as_slice()),
            (false, 0x0, b"def".as_slice()),
            (true, 0x0, b"gh".as_slice())
        ]
    );
    // A short message is one frame.
    client.send(true, 0x1, b"ok").await;
    assert_eq!(client.read_frame().await, Some(text("ok")));
}

#[tokio::test]
async fn close_sends_the_code_and_reason_at_once_and_waits_for_the_answer() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "close=4001&reason=going+away%21").await;
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 4001);
    assert_eq!(&close.payload[2..], b"going away!");
    client.send(true, 0x8, &4001u16.to_be_bytes()).await;
    client.expect_eof().await;
}

#[tokio::test]
async fn close_after_n_echoes_follows_the_nth_echo() {
    let server = TestServer::start().await;
    let url = format!("{}?close=3000&after=2", server.ws_url());
    let (mut client, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    for message in ["one", "two"] {
        futures_util::SinkExt::send(&mut client, Message::text(message))
            .await
            .expect("send");
        assert_eq!(recv(&mut client).await, Message::text(message));
    }
    let Message::Close(Some(CloseFrame { code, .. })) = recv(&mut client).await else {
        panic!("a Close after the second echo");
    };
    assert_eq!(u16::from(code), 3000);
}

#[tokio::test]
async fn close_after_a_duration_comes_then() {
    let server = TestServer::start().await;
    let opened = Instant::now();
    let (mut client, _) = raw(&server, "close=1000&after=400ms").await;
    client.send(true, 0x1, b"still echoed").await;
    assert_eq!(client.read_frame().await, Some(text("still echoed")));
    assert_eq!(client.expect_close().await.close_code(), 1000);
    assert!(
        opened.elapsed() >= Duration::from_millis(400),
        "{:?}",
        opened.elapsed()
    );
}

#[tokio::test]
async fn drop_resets_the_connection_after_the_echoes_without_a_close() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "drop=1&after=1").await;
    client.send(true, 0x1, b"last words").await;
    assert_eq!(client.read_frame().await, Some(text("last words")));
    // Then the connection ends with no Close frame: a reset (or EOF) and nothing else.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, client.stream.read_to_end(&mut rest))
        .await
        .expect("the connection ends in time");
    assert!(rest.is_empty(), "no frame after the echo: {rest:?}");
    let error = ended.expect_err("a reset, not an orderly EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn drop_at_once_gives_no_close_frame() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "drop=true").await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, client.stream.read_to_end(&mut rest))
        .await
        .expect("the connection ends in time");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(ended.is_err(), "a reset: {ended:?}");
}

#[tokio::test]
async fn status_refuses_the_handshake_with_that_status() {
    let server = TestServer::start().await;
    let (head, body) = refused(&server, "status=503").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(body.contains("status control"), "{body}");
    let (head, _) = refused(&server, "status=418").await;
    assert!(head.starts_with("HTTP/1.1 418"), "{head}");
}

#[tokio::test]
async fn ping_makes_the_server_ping_at_that_interval() {
    // The default keepalive is 30 s: pings within a second come from the control.
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "ping=100ms").await;
    let started = Instant::now();
    for _ in 0..3 {
        let ping = client.read_frame().await.expect("a Ping");
        assert_eq!(ping.opcode, 0x9, "{ping:?}");
        client.send(true, 0xA, &ping.payload).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn pong_0_leaves_the_clients_pings_unanswered() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "pong=0").await;
    client.send(true, 0x9, b"are you there").await;
    client.send(true, 0x1, b"after the ping").await;
    // The echo comes, and no Pong before it.
    assert_eq!(client.read_frame().await, Some(text("after the ping")));
    // Without the control, the Pong comes first.
    let (mut plain, _) = raw(&server, "").await;
    plain.send(true, 0x9, b"are you there").await;
    assert_eq!(plain.read_frame().await.expect("a Pong").opcode, 0xA);
}

#[tokio::test]
async fn stream_sends_counted_messages_at_their_interval_before_any_echo() {
    let server = TestServer::start().await;
    let started = Instant::now();
    let (mut client, _) = raw(&server, "stream=4&size=12&interval=100ms").await;
    client.send(true, 0x1, b"echo me after").await;
    for counter in 1..=4 {
        let frame = client.read_frame().await.expect("a stream message");
        let expected = format!("{counter} abcdefghijklmnopqrstuvwxyz");
        assert_eq!(frame, text(&expected[..12]));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "four messages 100 ms apart took {:?}",
        started.elapsed()
    );
    assert_eq!(client.read_frame().await, Some(text("echo me after")));

    let (mut client, _) = raw(&server, "stream=3&size=10&type=binary").await;
    for counter in 1..=3u8 {
        let frame = client.read_frame().await.expect("a stream message");
        assert_eq!(frame.opcode, 0x2);
        let mut expected = vec![0, 0, 0, 0, 0, 0, 0, counter];
        expected.extend([counter.wrapping_add(8), counter.wrapping_add(9)]);
        assert_eq!(frame.payload, expected);
    }
}

#[tokio::test]
async fn read_rate_makes_the_server_a_slow_reader() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "read_rate=1000").await;
    let payload = vec![b'r'; 2500];
    let sent = Instant::now();
    client.send(true, 0x2, &payload).await;
    let echo = client.read_frame().await.expect("the echo");
    assert_eq!(echo.payload.len(), 2500);
    // 2,508 bytes at 1,000 per second: the third second's share completes it.
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(1900), "read in {took:?}");
    assert!(took < Duration::from_secs(5), "read in {took:?}");
}

/// Reads raw bytes until `want` bytes have arrived (frames a RawClient refuses to parse).
async fn read_bytes(client: &mut RawClient, want: usize) -> Vec<u8> {
    let mut bytes = vec![0; want];
    tokio::time::timeout(STEP, client.stream.read_exact(&mut bytes))
        .await
        .expect("bytes in time")
        .expect("bytes");
    bytes
}

#[tokio::test]
async fn every_frame_fault_replaces_the_first_echo_then_the_echo_resumes() {
    let server = TestServer::start().await;
    for (fault, expected) in [
        ("invalid-utf8", b"\x81\x0dnot UTF-8: \xff\xfe".to_vec()),
        ("rsv1", b"\xc1\x02hi".to_vec()),
        ("reserved-opcode", b"\x83\x02hi".to_vec()),
        ("bad-close-code", b"\x88\x02\x03\xed".to_vec()),
    ] {
        let (mut client, head) = raw(&server, &format!("fault={fault}")).await;
        assert!(head.contains(&format!("fault={fault}")), "{head}");
        client.send(true, 0x1, b"hi").await;
        assert_eq!(
            read_bytes(&mut client, expected.len()).await,
            expected,
            "{fault}"
        );
        if fault != "bad-close-code" {
            client.send(true, 0x1, b"then").await;
            assert_eq!(client.read_frame().await, Some(text("then")), "{fault}");
        }
    }
    let (mut client, _) = raw(&server, "fault=masked-frame").await;
    client.send(true, 0x1, b"hi").await;
    let frame = read_bytes(&mut client, 8).await;
    assert_eq!(frame[..2], [0x81, 0x82]);
    assert_eq!([frame[6] ^ frame[2], frame[7] ^ frame[3]], *b"hi");
    let (mut client, _) = raw(&server, "fault=oversized-ping").await;
    client.send(true, 0x1, b"hi").await;
    let frame = read_bytes(&mut client, 130).await;
    assert_eq!(frame[..4], [0x89, 126, 0, 126]);
}

#[tokio::test]
async fn handshake_faults_break_the_101() {
    let server = TestServer::start().await;
    let (_, head) = raw(&server, "fault=bad-accept").await;
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("sec-websocket-accept: aaaaaaaaaaaaaaaaaaaaaaaaaaa="),
        "{head}"
    );
    let (_, head) = raw(&server, "fault=unrequested-subprotocol").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: ws-echo-unrequested"),
        "{head}"
    );
    // A real client refuses both.
    for fault in ["bad-accept", "unrequested-subprotocol"] {
        let url = format!("{}?fault={fault}", server.ws_url());
        assert!(
            tokio_tungstenite::connect_async(url).await.is_err(),
            "{fault}"
        );
    }
}

#[tokio::test]
async fn a_bad_value_gets_400_naming_the_parameter_and_unknown_ones_are_ignored() {
    let server = TestServer::start().await;
    for (query, says) in [
        ("delay=31s", "delay: a duration from 0s to 30s"),
        ("fragment=0", "fragment: an integer from 1"),
        ("close=1006", "close: a close code in 1000-1003"),
        ("stream=100&size=1048576", "--max-stream-bytes"),
        ("reason=hi", "reason: only with close=CODE"),
        ("fault=gremlins", "fault: one of invalid-utf8"),
    ] {
        let (head, body) = refused(&server, query).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{query}: {head}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let (mut client, head) = raw(&server, "token=abc&utm_source=x").await;
    assert!(
        !head.to_ascii_lowercase().contains("x-ws-echo-controls"),
        "{head}"
    );
    client.send(true, 0x1, b"plain").await;
    assert_eq!(client.read_frame().await, Some(text("plain")));
}

#[tokio::test]
async fn controls_are_visible_in_the_greeting_the_description_and_the_metrics() {
    let server = TestServer::start().await;
    let url = format!("{}?hello=1&fragment=3&delay=10ms", server.ws_url());
    let (mut client, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    assert_eq!(
        response.headers()["x-ws-echo-controls"],
        "delay=10ms, fragment=3"
    );
    let Message::Text(greeting) = recv(&mut client).await else {
        panic!("the greeting first");
    };
    let greeting: serde_json::Value = serde_json::from_str(&greeting).expect("JSON");
    assert_eq!(greeting["controls"], "delay=10ms, fragment=3");
    assert_eq!(greeting["controls_enabled"], true);
    let (head, body) = get(&server, "/controls").await;
    assert!(
        head.to_ascii_lowercase().contains("application/json"),
        "{head}"
    );
    let description: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(description["enabled"], true);
    assert_eq!(description["ceilings"]["max_delay"], "30s");
    assert_eq!(
        description["parameters"].as_array().expect("a list").len(),
        16
    );
    let (_, metrics) = get(&server, "/metrics").await;
    for control in ["delay", "fragment"] {
        assert!(
            metrics.contains(&format!(
                "ws_echo_controls_total{{control=\"{control}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn the_root_takes_websockets_and_still_serves_the_page() {
    let server = TestServer::start().await;
    let url = format!("ws://{}/?fragment=2", server.addr);
    let (mut client, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect at /");
    futures_util::SinkExt::send(&mut client, Message::text("root"))
        .await
        .expect("send");
    assert_eq!(recv(&mut client).await, Message::text("root"));
    let (head, body) = get(&server, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("<html"), "the page");
}

#[tokio::test]
async fn no_controls_makes_every_control_a_plain_echo() {
    let server = TestServer::with(ws_echo::Settings {
        controls: false,
        ..Default::default()
    })
    .await;
    let (mut client, head) = raw(&server, "delay=forever&close=1000&status=500").await;
    assert!(
        !head.to_ascii_lowercase().contains("x-ws-echo-controls"),
        "{head}"
    );
    client.send(true, 0x1, b"plain").await;
    assert_eq!(client.read_frame().await, Some(text("plain")));
    let (_, body) = get(&server, "/controls").await;
    let description: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(description["enabled"], false);
}

#[tokio::test]
async fn max_connection_duration_closes_every_websocket_at_its_deadline() {
    let server = TestServer::with(ws_echo::Settings {
        max_connection_duration: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let opened = Instant::now();
    let (mut client, _) = raw(&server, "").await;
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 1000);
    assert_eq!(&close.payload[2..], b"connection duration limit reached");
    assert!(opened.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn delayed_echoes_still_reach_a_client_that_half_closed() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "delay=300ms").await;
    client.send(true, 0x1, b"before my EOF").await;
    client.stream.shutdown().await.expect("half-close");
    assert_eq!(client.read_frame().await, Some(text("before my EOF")));
}

/// A server that pings every `interval` and closes (1001) a Pong 300 ms late.
async fn keepalive_server(interval: Duration) -> TestServer {
    TestServer::with(ws_echo::Settings {
        ping_interval: Some(interval),
        ping_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await
}

/// Reads until a binary echo, answering the server's Pings on the way; its payload.
/// A Close (the keepalive giving up) fails the test.
async fn echo_answering_pings(client: &mut RawClient) -> Vec<u8> {
    loop {
        let frame = client.read_frame().await.expect("a frame");
        match frame.opcode {
            0x9 => client.send(true, 0xA, &frame.payload).await,
            0x2 => return frame.payload,
            _ => panic!("expected the echo, got {frame:?}"),
        }
    }
}

#[tokio::test]
async fn held_back_reads_do_not_count_against_the_keepalive() {
    // A 9 KB echo held for a second fills the 8 KiB write limit, so the server reads
    // nothing meanwhile, the client's Pongs included: that must not close it (1001).
    // The Pong to a Ping already out arrives after the message, so it waits unread for
    // the whole second, three times the ping timeout.
    let server = keepalive_server(Duration::from_millis(100)).await;
    let (mut client, _) = raw(&server, "delay=1s").await;
    let ping = client.read_frame().await.expect("the keepalive Ping");
    assert_eq!(ping.opcode, 0x9);
    client.send(true, 0x2, &[b'k'; 9000]).await;
    let sent = Instant::now();
    // In a read of its own, after the server has stopped reading.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.send(true, 0xA, &ping.payload).await;
    // Given up on, the server would send the echo at once, then Close 1001.
    assert_eq!(echo_answering_pings(&mut client).await.len(), 9000);
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );
    client.send(true, 0x8, &1000u16.to_be_bytes()).await;
    let close = loop {
        let frame = client.read_frame().await.expect("the Close");
        if frame.opcode != 0x9 {
            break frame;
        }
    };
    assert_eq!((close.opcode, close.close_code()), (0x8, 1000));
}

#[tokio::test]
async fn a_stream_still_hears_the_clients_close() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "stream=100&size=8&interval=100ms").await;
    assert_eq!(client.read_frame().await.expect("a message").opcode, 0x1);
    let asked = Instant::now();
    client.send(true, 0x8, &1000u16.to_be_bytes()).await;
    loop {
        let frame = client.read_frame().await.expect("the Close");
        if frame.opcode == 0x8 {
            assert_eq!(frame.close_code(), 1000);
            break;
        }
    }
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn fragment_1_cuts_a_long_echo_into_single_bytes() {
    let server = TestServer::start().await;
    let (mut client, _) = raw(&server, "fragment=1").await;
    let message: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
    client.send(true, 0x2, &message).await;
    let mut echoed = Vec::new();
    for i in 0..message.len() {
        let frame = client.read_frame().await.expect("a frame");
        assert_eq!(frame.opcode, if i == 0 { 0x2 } else { 0x0 });
        assert_eq!(frame.fin, i == message.len() - 1);
        echoed.extend(frame.payload);
    }
    assert_eq!(echoed, message);
}

#[tokio::test]
async fn only_a_websocket_upgrade_at_the_root_is_taken_as_one() {
    let server = TestServer::start().await;
    let (head, body) = exchange(
        &server,
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("<html"), "the page");
}

#[tokio::test]
async fn a_slow_reader_does_not_blame_the_client_for_pongs_it_has_not_read() {
    // 3,000 bytes at 1,000 a second: the Pong behind them is read after 3 s, long
    // past the 300 ms ping timeout; the connection must not be closed for it.
    let server = keepalive_server(Duration::from_millis(200)).await;
    let (mut client, _) = raw(&server, "read_rate=1000").await;
    client.send(true, 0x2, &[b's'; 3000]).await;
    let started = Instant::now();
    assert_eq!(echo_answering_pings(&mut client).await.len(), 3000);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
