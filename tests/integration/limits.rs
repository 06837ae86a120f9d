//! Size limits and connection caps: bad input gets a close code or an HTTP status, and
//! the server keeps serving everyone else.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestServer, assert_echoes, encode_frame, expect_close};

fn small_limits() -> ws_echo::Settings {
    ws_echo::Settings {
        max_message_size: 1024,
        max_frame_size: 1024,
        ..Default::default()
    }
}

#[tokio::test]
async fn message_over_the_limit_closes_with_1009_and_server_keeps_running() {
    let server = TestServer::with(small_limits()).await;
    let mut client = server.connect().await;
    client
        .send(Message::binary(vec![0u8; 1025]))
        .await
        .expect("send");
    assert_eq!(expect_close(&mut client).await.0, 1009);
    let mut other = server.connect().await;
    assert_echoes(&mut other, Message::binary(vec![0u8; 1024])).await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_with_1009() {
    let server = TestServer::with(small_limits()).await;
    let (mut client, _) = server.raw("").await;
    client.send(false, 0x2, &[0u8; 300]).await;
    for _ in 0..3 {
        client.send(false, 0x0, &[0u8; 300]).await;
    }
    assert_eq!(client.expect_close().await.close_code(), 1009);
}

/// A frame header announcing 2^63 bytes is refused from the header alone: the answer
/// comes at once, with no payload sent and nothing allocated for it.
#[tokio::test]
async fn frame_announcing_two_to_the_sixty_third_bytes_gets_1009_at_once() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    client.send_bytes(&header).await;
    assert_eq!(client.expect_close().await.close_code(), 1009);
}

#[tokio::test]
async fn compressed_message_inflating_past_the_limit_closes_with_1009() {
    let server = TestServer::with(small_limits()).await;
    let mut client = server.raw_deflate().await;
    let bomb = crate::support::deflate(&[0u8; 100_000]);
    assert!(bomb.len() < 1024);
    client
        .send_bytes(&encode_frame(true, true, 0x2, &bomb, true))
        .await;
    assert_eq!(client.expect_close().await.close_code(), 1009);
}

#[tokio::test]
async fn connection_cap_answers_503_and_recovers_when_clients_leave() {
    let settings = ws_echo::Settings {
        max_connections: 2,
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let mut first = server.connect().await;
    let _second = server.connect().await;
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    first.close(None).await.expect("close");
    drop(first);
    // The permit is released when the connection's task ends.
    let deadline = tokio::time::Instant::now() + crate::support::STEP;
    loop {
        if let Ok((mut client, _)) = tokio_tungstenite::connect_async(server.ws_url()).await {
            assert_echoes(&mut client, Message::text("back")).await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a slot never freed up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Bytes that do not compress, the same on every run.
fn incompressible(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Issue 11: Node's `ws` writes an over-limit message in full before it reads anything.
/// The server must keep reading (and dropping) what the client sends until the
/// client's Close: had it closed with those bytes unread, the kernel's reset would
/// destroy the Close 1009 in flight, and the client would see 1006.
#[tokio::test]
async fn a_client_that_writes_a_whole_over_limit_frame_before_reading_gets_1009() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let frame = encode_frame(true, false, 0x2, &vec![7; 16 * 1024 * 1024 + 1], true);
    client.send_bytes(&frame).await;
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 1009);
    assert_eq!(&close.payload[2..], b"message exceeds the size limit");
    client
        .send_bytes(&encode_frame(true, false, 0x8, &close.payload[..2], true))
        .await;
    client.expect_eof().await;
}

/// Issue 11: a 16 MiB message that does not compress is larger than 16 MiB once
/// deflated, and clients send it as one frame. The message limit applies to the
/// message, so it is echoed.
#[tokio::test]
async fn a_sixteen_mib_message_that_does_not_compress_is_echoed_with_deflate() {
    let server = TestServer::start().await;
    let mut client = server.raw_deflate().await;
    let message = incompressible(16 * 1024 * 1024);
    let compressed = crate::support::deflate(&message);
    assert!(
        compressed.len() > message.len(),
        "deflate adds its block headers"
    );
    client
        .send_bytes(&encode_frame(true, true, 0x2, &compressed, true))
        .await;
    client.patience = std::time::Duration::from_secs(60);
    let echo = client.read_frame().await.expect("the echo");
    assert_eq!((echo.opcode, echo.fin), (0x2, true));
    // Deflate would make it larger, so the server sends it as it is (RFC 7692 lets
    // each message choose).
    assert!(!echo.rsv1, "an incompressible echo is sent uncompressed");
    assert!(echo.payload == message, "echo differs");
}
