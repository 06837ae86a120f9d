//! The opening handshake over real HTTP: precise refusals, subprotocols, extension
//! negotiation, and the instance header.

use crate::support::{STEP, TestServer, encode_frame};

fn request(extra: &str) -> String {
    format!("GET /ws HTTP/1.1\r\nHost: test\r\n{extra}\r\n")
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn plain_request_to_ws_gets_426_with_a_pointer_to_the_page() {
    let server = TestServer::start().await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request("Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    assert!(response.contains("WebSocket endpoint"), "{response}");
    assert!(response.contains("The echo page is at /"), "{response}");
}

#[tokio::test]
async fn wrong_version_gets_426_naming_version_13() {
    let server = TestServer::start().await;
    let head = server
        .http(&request(&format!(
            "{UPGRADE}{KEY}Sec-WebSocket-Version: 8\r\n"
        )))
        .await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
}

#[tokio::test]
async fn missing_or_malformed_key_gets_400() {
    let server = TestServer::start().await;
    let head = server
        .http(&request(&format!("{UPGRADE}Sec-WebSocket-Version: 13\r\n")))
        .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let head = server
        .http(&request(&format!(
            "{UPGRADE}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: not base64!\r\n"
        )))
        .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// Sends `request` and reads everything until the server closes: one whole exchange
/// (HTTP/1.0 has no keep-alive unless asked for; HTTP/1.1 requests here ask with
/// `Connection: close`).
async fn exchange_until_close(server: &TestServer, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response))
        .await
        .expect("the server answers and closes in time")
        .expect("read");
    response
}

/// RFC 6455 §4.1: the handshake is HTTP/1.1 or later. hyper alone answered an HTTP/1.0
/// upgrade with `HTTP/1.0 101` and closed; now it is a 400 saying why, and plain
/// HTTP/1.0 requests are still served.
#[tokio::test]
async fn upgrade_over_http_1_0_gets_400_with_the_reason() {
    let server = TestServer::start().await;
    let response = exchange_until_close(
        &server,
        &format!(
            "GET /ws HTTP/1.0\r\nHost: test\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.starts_with("HTTP/1.0 400") || head.starts_with("HTTP/1.1 400"),
        "{response}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    assert!(!head.to_ascii_lowercase().contains("upgrade:"), "{head}");
    assert!(body.contains("HTTP/1.1 or later"), "{body}");

    let health = exchange_until_close(&server, "GET /healthz HTTP/1.0\r\nHost: test\r\n\r\n").await;
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );
}

#[tokio::test]
async fn other_methods_get_405() {
    let server = TestServer::start().await;
    for method in ["POST", "PUT", "DELETE"] {
        let head = server
            .http(&format!(
                "{method} /ws HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
            ))
            .await;
        assert!(head.starts_with("HTTP/1.1 405"), "{method}: {head}");
    }
}

#[tokio::test]
async fn every_response_names_the_instance() {
    let settings = ws_echo::Settings {
        instance_name: "replica-7".into(),
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let (_client, head) = server.raw("").await;
    assert!(
        head.to_ascii_lowercase().contains("x-served-by: replica-7"),
        "{head}"
    );
    let page = server.http("GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert!(
        page.to_ascii_lowercase().contains("x-served-by: replica-7"),
        "{page}"
    );
}

#[tokio::test]
async fn first_offered_subprotocol_is_accepted_by_default() {
    let server = TestServer::start().await;
    let (_client, head) = server.raw("Sec-WebSocket-Protocol: mqtt, chat\r\n").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt"),
        "{head}"
    );
}

#[tokio::test]
async fn subprotocols_can_be_restricted_or_refused() {
    let only = ws_echo::Settings {
        subprotocols: ws_echo::SubprotocolPolicy::Only(vec!["chat".into()]),
        ..Default::default()
    };
    let server = TestServer::with(only).await;
    let (_client, head) = server.raw("Sec-WebSocket-Protocol: mqtt, chat\r\n").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: chat"),
        "{head}"
    );
    let (_client, head) = server.raw("Sec-WebSocket-Protocol: mqtt\r\n").await;
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );

    let never = ws_echo::Settings {
        subprotocols: ws_echo::SubprotocolPolicy::Never,
        ..Default::default()
    };
    let server = TestServer::with(never).await;
    let (_client, head) = server.raw("Sec-WebSocket-Protocol: chat\r\n").await;
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
}

/// Autobahn 13.7.x: the engine alone declined the whole list when the first alternative
/// did not suit it; we pick the first acceptable one.
#[tokio::test]
async fn deflate_offer_list_is_negotiated_past_an_unacceptable_first_alternative() {
    let server = TestServer::start().await;
    let (_client, head) = server
        .raw(
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8, \
             permessage-deflate; client_no_context_takeover\r\n",
        )
        .await;
    assert!(
        head.to_ascii_lowercase().contains(
            "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{head}"
    );
}

#[tokio::test]
async fn malformed_deflate_offer_is_declined_without_failing_the_handshake() {
    let server = TestServer::start().await;
    let (mut client, head) = server
        .raw("Sec-WebSocket-Extensions: permessage-deflate; bogus=1\r\n")
        .await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    client.send(true, 0x1, b"uncompressed").await;
    assert_eq!(
        client.read_frame().await.expect("echo").payload,
        b"uncompressed"
    );
}

#[tokio::test]
async fn compression_can_be_turned_off() {
    let mut settings = ws_echo::Settings::default();
    settings.compression.enabled = false;
    let server = TestServer::with(settings).await;
    let (_client, head) = server
        .raw("Sec-WebSocket-Extensions: permessage-deflate\r\n")
        .await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
}

/// RFC 7692 §7.1.2.1: with `server_max_window_bits=10` the server's output must inflate
/// with a 1 KiB window. The message repeats a block at a distance of 2,000 bytes, which
/// a 15-bit window would reference and a 10-bit inflater could not follow.
#[tokio::test]
async fn server_max_window_bits_is_honoured() {
    let server = TestServer::start().await;
    let (mut client, head) = server
        .raw("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n")
        .await;
    assert!(head.contains("server_max_window_bits=10"), "{head}");
    let block: Vec<u8> = (0..2000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let message = [block.clone(), block.clone(), block].concat();
    client
        .send_bytes(&encode_frame(true, false, 0x2, &message, true))
        .await;
    let echo = client.read_frame().await.expect("echo");
    assert!(echo.rsv1);
    let mut input = echo.payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut inflater = flate2::Decompress::new_with_window_bits(false, 10);
    let mut out = Vec::with_capacity(message.len() + 64);
    inflater
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .expect("inflates with a 10-bit window");
    assert_eq!(out, message);
}

/// Issue 12: an upgrade without Host, or with a body (whose bytes would then be read as
/// frames), was answered with 101.
#[tokio::test]
async fn upgrade_without_host_or_with_a_body_gets_400_naming_it() {
    let server = TestServer::start().await;
    let upgrade = "GET /ws HTTP/1.1\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let requests = [
        (format!("{upgrade}\r\n"), "without a Host header"),
        (
            format!("{upgrade}Host: test\r\nContent-Length: 5\r\n\r\nhello"),
            "with a request body",
        ),
        (
            format!("{upgrade}Host: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "with a request body",
        ),
    ];
    for (request, reason) in requests {
        let answer = exchange_until_close(&server, &request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(reason), "{answer}");
    }
}
