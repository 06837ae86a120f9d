//! The echo itself, through a real client library: what goes in comes back, in order.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::support::{TestServer, assert_echoes, expect_close, recv};

#[tokio::test]
async fn echoes_text_as_text() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::text("Hello, world!")).await;
}

#[tokio::test]
async fn echoes_binary_holding_every_byte_value() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    let every_byte: Vec<u8> = (0..=255).collect();
    assert_echoes(&mut client, Message::binary(every_byte)).await;
}

/// The tutorial's `to_text().unwrap()` panicked on this.
#[tokio::test]
async fn binary_that_is_not_utf8_is_echoed_and_server_survives() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::binary(vec![0xC3, 0x28, 0xFF, 0xFE])).await;
    let mut other = server.connect().await;
    assert_echoes(&mut other, Message::text("still here")).await;
}

#[tokio::test]
async fn echoes_empty_messages() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::text("")).await;
    assert_echoes(&mut client, Message::binary(Vec::new())).await;
}

#[tokio::test]
async fn echoes_unicode_text() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::text("κόσμε — 世界 — 🦀 — e\u{301}")).await;
}

#[tokio::test]
async fn echoes_one_and_eight_mib_messages() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    let one_mib: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    assert_echoes(&mut client, Message::binary(one_mib)).await;
    let eight_mib = "abcdefgh".repeat(1 << 20);
    assert_echoes(&mut client, Message::text(eight_mib)).await;
}

#[tokio::test]
async fn echoes_a_message_of_exactly_the_maximum_size() {
    let settings = ws_echo::Settings {
        max_message_size: 4096,
        max_frame_size: 4096,
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::binary(vec![b'x'; 4096])).await;
}

#[tokio::test]
async fn echoes_ten_thousand_messages_in_order() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    let (mut sink, mut stream) = client.split();
    let writer = tokio::spawn(async move {
        for i in 0..10_000u32 {
            sink.feed(Message::text(i.to_string())).await.expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    for i in 0..10_000u32 {
        let message = tokio::time::timeout(crate::support::STEP, stream.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("valid");
        assert_eq!(
            message,
            Message::text(i.to_string()),
            "echo {i} out of order"
        );
    }
    client = writer
        .await
        .expect("writer")
        .reunite(stream)
        .expect("same connection");
    client.close(None).await.expect("close");
}

#[tokio::test]
async fn serves_two_hundred_concurrent_connections() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    let mut tasks = Vec::new();
    for connection in 0..200u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut client, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            for i in 0..100u32 {
                let message = Message::text(format!("{connection}:{i}"));
                client.send(message.clone()).await.expect("send");
                assert_eq!(recv(&mut client).await, message);
            }
            client.close(None).await.expect("close");
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("in time")
            .expect("client ok");
    }
}

#[tokio::test]
async fn ping_gets_a_pong_and_no_data_message() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    client
        .send(Message::text("after the ping"))
        .await
        .expect("text");
    assert_eq!(
        recv(&mut client).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    assert_eq!(
        recv(&mut client).await,
        Message::text("after the ping"),
        "the ping is not echoed as data"
    );
}

#[tokio::test]
async fn client_close_completes_with_the_same_code() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::text("before close")).await;
    client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Library(4321),
            reason: "bye".into(),
        })))
        .await
        .expect("close");
    let (code, reason) = expect_close(&mut client).await;
    assert_eq!((code, reason.as_str()), (4321, "bye"));
    // The server then closes TCP.
    let end = tokio::time::timeout(crate::support::STEP, client.next())
        .await
        .expect("end in time");
    assert!(
        end.is_none() || matches!(end, Some(Err(_))),
        "nothing after the close handshake"
    );
}

/// Messages sent before the Close are echoed before the Close reply.
#[tokio::test]
async fn echoes_everything_sent_before_the_client_close() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    for i in 0..100 {
        client
            .feed(Message::text(format!("m{i}")))
            .await
            .expect("feed");
    }
    client
        .feed(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await
        .expect("close");
    client.flush().await.expect("flush");
    for i in 0..100 {
        assert_eq!(recv(&mut client).await, Message::text(format!("m{i}")));
    }
    assert_eq!(expect_close(&mut client).await.0, 1000);
}

#[tokio::test]
async fn abrupt_drop_mid_message_leaves_other_connections_served() {
    let server = TestServer::start().await;
    let mut bystander = server.connect().await;
    assert_echoes(&mut bystander, Message::text("before")).await;
    let (mut raw, _) = server.raw("").await;
    // Announce 1000 bytes, send 10, vanish.
    let frame = crate::support::encode_frame(true, false, 0x2, &[7; 1000], true);
    raw.send_bytes(&frame[..18]).await;
    drop(raw);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_echoes(&mut bystander, Message::text("after")).await;
    let mut newcomer = server.connect().await;
    assert_echoes(&mut newcomer, Message::binary(vec![1, 2, 3])).await;
}

#[tokio::test]
async fn peer_vanishing_while_echoes_are_pending_does_not_disturb_others() {
    let server = TestServer::start().await;
    let mut bystander = server.connect().await;
    let mut vanishing = server.connect().await;
    for _ in 0..50 {
        vanishing
            .feed(Message::binary(vec![0u8; 64 * 1024]))
            .await
            .expect("feed");
    }
    vanishing.flush().await.expect("flush");
    drop(vanishing);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_echoes(&mut bystander, Message::text("still served")).await;
}

/// Frames a client writes in the same packet as its handshake are read by the HTTP
/// parser before the upgrade completes; the connection must take them from there
/// (hyper hands them over with the socket) and echo them first, in order.
#[tokio::test]
async fn frames_sent_with_the_handshake_are_echoed_first() {
    use tokio::io::AsyncWriteExt;

    use crate::support::{RawClient, encode_frame};

    let server = TestServer::start().await;
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut bytes = b"GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    bytes.extend(encode_frame(true, false, 0x1, b"early", true));
    bytes.extend(encode_frame(true, false, 0x2, &[1, 2, 3], true));
    stream.write_all(&bytes).await.expect("write");
    let mut client = RawClient::new(stream);
    assert!(client.read_head().await.starts_with("HTTP/1.1 101"));
    let first = client.read_frame().await.expect("first echo");
    assert_eq!(
        (first.opcode, first.payload.as_slice()),
        (0x1, &b"early"[..])
    );
    let second = client.read_frame().await.expect("second echo");
    assert_eq!((second.opcode, second.payload), (0x2, vec![1, 2, 3]));
    client.send(true, 0x1, b"later").await;
    let third = client.read_frame().await.expect("third echo");
    assert_eq!(third.payload, b"later");
}
