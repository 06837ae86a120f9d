//! RFC 6455 / RFC 7692 corner cases at the frame level, one or more per Autobahn group,
//! so that a regression shows up in `cargo test` without Python.

use tokio_tungstenite::tungstenite::Message;

use crate::{
    metrics::{scrape_when_closed, value},
    support::{TestServer, assert_echoes, deflate, encode_frame, expect_close, inflate},
};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Autobahn 5.x: control frames may come between the fragments of a message.
#[tokio::test]
async fn fragments_with_interleaved_pings_are_reassembled() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client.send(false, TEXT, b"frag").await;
    client.send(true, PING, b"p1").await;
    client.send(false, CONTINUATION, b"men").await;
    client.send(true, PONG, b"unsolicited").await;
    client.send(true, CONTINUATION, b"ted").await;
    let pong = client.read_frame().await.expect("pong");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (PONG, &b"p1"[..]));
    let echo = client.read_frame().await.expect("echo");
    assert_eq!(
        (echo.opcode, echo.fin, echo.payload.as_slice()),
        (TEXT, true, &b"fragmented"[..])
    );
}

/// Autobahn 6.x: invalid UTF-8 split across fragments fails with 1007, at the bad
/// fragment, before the message ends.
#[tokio::test]
async fn invalid_utf8_across_fragments_closes_with_1007() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client.send(false, TEXT, "κόσ".as_bytes()).await;
    client.send(false, CONTINUATION, &[0xCE]).await; // a character cut in two is fine...
    client.send(false, CONTINUATION, &[0xFF]).await; // ...but this is not a continuation byte
    assert_eq!(client.expect_close().await.close_code(), 1007);
}

#[tokio::test]
async fn invalid_utf8_in_one_frame_closes_with_1007() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client.send(true, TEXT, &[0xED, 0xA0, 0x80]).await; // a UTF-16 surrogate
    assert_eq!(client.expect_close().await.close_code(), 1007);
}

/// Autobahn 3.x: RSV bits without a negotiated extension.
#[tokio::test]
async fn reserved_bits_close_with_1002() {
    for first_byte in [
        0x80 | 0x40 | TEXT,
        0x80 | 0x20 | TEXT,
        0x80 | 0x10 | BINARY,
        0x80 | 0x40 | PING,
    ] {
        let server = TestServer::start().await;
        let (mut client, _) = server.raw("").await;
        let mut frame = encode_frame(true, false, 0, b"x", true);
        frame[0] = first_byte;
        client.send_bytes(&frame).await;
        assert_eq!(
            client.expect_close().await.close_code(),
            1002,
            "first byte {first_byte:#x}"
        );
    }
}

/// Autobahn 4.x: reserved opcodes fail the connection with 1002, after echoing what came
/// before them.
#[tokio::test]
async fn reserved_opcodes_close_with_1002_after_earlier_echoes() {
    for opcode in [0x3, 0x5, 0x7, 0xB, 0xF] {
        let server = TestServer::start().await;
        let (mut client, _) = server.raw("").await;
        let mut bytes = encode_frame(true, false, TEXT, b"first", true);
        bytes.extend(encode_frame(true, false, opcode, b"", true));
        client.send_bytes(&bytes).await;
        let echo = client.read_frame().await.expect("echo");
        assert_eq!(echo.payload, b"first");
        assert_eq!(
            client.expect_close().await.close_code(),
            1002,
            "opcode {opcode:#x}"
        );
    }
}

/// Autobahn 2.x and 7.3.6: control frames carry at most 125 bytes.
#[tokio::test]
async fn oversized_control_frames_close_with_1002() {
    for opcode in [PING, CLOSE, PONG] {
        let server = TestServer::start().await;
        let (mut client, _) = server.raw("").await;
        let mut payload = vec![b'a'; 126];
        if opcode == CLOSE {
            payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        }
        client.send(true, opcode, &payload).await;
        let close = client.expect_close().await;
        assert_eq!(close.close_code(), 1002, "opcode {opcode:#x}");
        assert!(close.payload.len() <= 125, "our own Close obeys the limit");
    }
}

/// Autobahn 5.1/5.2: a fragmented control frame.
#[tokio::test]
async fn fragmented_ping_closes_with_1002() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client.send(false, PING, b"half").await;
    assert_eq!(client.expect_close().await.close_code(), 1002);
}

/// Autobahn 5.x: a continuation with nothing to continue, and a new message inside one.
#[tokio::test]
async fn broken_fragment_sequences_close_with_1002() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client.send(true, CONTINUATION, b"orphan").await;
    assert_eq!(client.expect_close().await.close_code(), 1002);

    let (mut client, _) = server.raw("").await;
    client.send(false, TEXT, b"one").await;
    client.send(true, TEXT, b"two").await;
    assert_eq!(client.expect_close().await.close_code(), 1002);
}

/// RFC 6455 §5.1: a server must close on an unmasked client frame.
#[tokio::test]
async fn unmasked_client_frame_closes_with_1002() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    client
        .send_bytes(&encode_frame(true, false, TEXT, b"naked", false))
        .await;
    assert_eq!(client.expect_close().await.close_code(), 1002);
}

/// Autobahn 7.3.x, 7.9.x: close payloads of 1 byte and invalid close codes.
#[tokio::test]
async fn invalid_close_payloads_close_with_1002() {
    let invalid: Vec<Vec<u8>> = vec![
        vec![0x03],                     // 1 byte: half a code
        999u16.to_be_bytes().to_vec(),  // below the range
        1004u16.to_be_bytes().to_vec(), // reserved
        1005u16.to_be_bytes().to_vec(), // never sent on the wire
        1006u16.to_be_bytes().to_vec(),
        1015u16.to_be_bytes().to_vec(),
        1100u16.to_be_bytes().to_vec(),
        2999u16.to_be_bytes().to_vec(),
        5000u16.to_be_bytes().to_vec(),
    ];
    for payload in invalid {
        let server = TestServer::start().await;
        let (mut client, _) = server.raw("").await;
        client.send(true, CLOSE, &payload).await;
        assert_eq!(
            client.expect_close().await.close_code(),
            1002,
            "payload {payload:?}"
        );
    }
}

/// Autobahn 7.5.1: a close reason that is not UTF-8.
#[tokio::test]
async fn close_reason_that_is_not_utf8_closes_with_1007_or_1002() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[
        0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80,
    ]);
    client.send(true, CLOSE, &payload).await;
    let code = client.expect_close().await.close_code();
    assert!(code == 1007 || code == 1002, "got {code}");
}

/// Autobahn 7.7.x: every valid close code is echoed back.
#[tokio::test]
async fn valid_close_codes_are_echoed() {
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        let server = TestServer::start().await;
        let (mut client, _) = server.raw("").await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"reason");
        client.send(true, CLOSE, &payload).await;
        let close = client.expect_close().await;
        assert_eq!(close.close_code(), code);
        client.expect_eof().await;
    }
}

/// Autobahn 7.1.x: after the close handshake, the server closes TCP and sends nothing.
#[tokio::test]
async fn nothing_follows_the_close_reply() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let mut bytes = encode_frame(true, false, CLOSE, &1000u16.to_be_bytes(), true);
    bytes.extend(encode_frame(true, false, TEXT, b"after close", true));
    bytes.extend(encode_frame(true, false, PING, b"after close", true));
    client.send_bytes(&bytes).await;
    assert_eq!(client.expect_close().await.close_code(), 1000);
    assert_eq!(
        client.read_frame().await,
        None,
        "no echo and no pong after the Close"
    );
}

/// Autobahn 12.x/13.x in miniature: compressed and uncompressed messages on one
/// connection, with the compressed echoes inflating to what was sent.
#[tokio::test]
async fn compressed_and_uncompressed_messages_mix_on_one_connection() {
    let server = TestServer::start().await;
    let mut client = server.raw_deflate().await;
    let big = "{\"id\":1,\"name\":\"ws_echo\",\"tags\":[\"a\",\"b\"]}".repeat(100);
    client
        .send_bytes(&encode_frame(
            true,
            true,
            TEXT,
            &deflate(big.as_bytes()),
            true,
        ))
        .await;
    client.send(true, TEXT, b"plain").await;
    client
        .send_bytes(&encode_frame(
            true,
            true,
            BINARY,
            &deflate(&[0; 5000]),
            true,
        ))
        .await;

    let first = client.read_frame().await.expect("echo 1");
    assert!(first.rsv1, "a large echo is compressed");
    assert_eq!(inflate(&first.payload), big.as_bytes());
    let second = client.read_frame().await.expect("echo 2");
    assert!(!second.rsv1, "a message below the threshold is sent plain");
    assert_eq!(second.payload, b"plain");
    let third = client.read_frame().await.expect("echo 3");
    assert_eq!(
        (third.opcode, inflate(&third.payload)),
        (BINARY, vec![0; 5000])
    );
}

/// RFC 7692 §6.1: a compressed message may be fragmented; RSV1 is on the first frame only.
#[tokio::test]
async fn fragmented_compressed_message_is_inflated() {
    let server = TestServer::start().await;
    let mut client = server.raw_deflate().await;
    let text = "fragmented and compressed ".repeat(50);
    let compressed = deflate(text.as_bytes());
    let (a, b) = compressed.split_at(compressed.len() / 2);
    client
        .send_bytes(&encode_frame(false, true, TEXT, a, true))
        .await;
    client
        .send_bytes(&encode_frame(true, false, CONTINUATION, b, true))
        .await;
    let echo = client.read_frame().await.expect("echo");
    assert_eq!(inflate(&echo.payload), text.as_bytes());
}

#[tokio::test]
async fn rsv1_on_a_continuation_frame_closes_with_1002() {
    let server = TestServer::start().await;
    let mut client = server.raw_deflate().await;
    let compressed = deflate(b"hello hello hello");
    client
        .send_bytes(&encode_frame(false, true, TEXT, &compressed[..2], true))
        .await;
    client
        .send_bytes(&encode_frame(
            true,
            true,
            CONTINUATION,
            &compressed[2..],
            true,
        ))
        .await;
    assert_eq!(client.expect_close().await.close_code(), 1002);
}

#[tokio::test]
async fn compressed_frame_without_negotiation_closes_with_1002() {
    let server = TestServer::start().await;
    let (mut client, head) = server.raw("").await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions")
    );
    client
        .send_bytes(&encode_frame(true, true, TEXT, &deflate(b"hello"), true))
        .await;
    assert_eq!(client.expect_close().await.close_code(), 1002);
}

/// A compressed frame whose payload is not raw deflate data fails that connection with
/// one Close 1007 and a reason, then TCP closes; other connections echo on, and the
/// close is counted as the server's 1007, not as a dropped connection. (The engine
/// itself queues 1011 for this and, before the fix, the loop dropped the connection
/// without sending any Close.)
#[tokio::test]
async fn corrupt_compressed_data_closes_with_1007() {
    let server = TestServer::start().await;
    let mut bystander = server.connect().await;
    let mut client = server.raw_deflate().await;
    // A good message, then one whose data opens a deflate block of type 3, which RFC
    // 1951 §3.2.3 reserves as an error; in one write, so the echo is still queued when
    // the engine fails.
    let mut bytes = encode_frame(true, true, TEXT, &deflate(b"before"), true);
    bytes.extend(encode_frame(true, true, TEXT, &[0xFF; 16], true));
    client.send_bytes(&bytes).await;
    let echo = client
        .read_frame()
        .await
        .expect("the echo before the Close");
    assert_eq!(
        (echo.opcode, echo.payload.as_slice()),
        (TEXT, &b"before"[..])
    );
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 1007, "{close:?}");
    let reason = String::from_utf8(close.payload[2..].to_vec()).expect("UTF-8 reason");
    assert!(reason.contains("deflate"), "reason: {reason:?}");
    assert_eq!(
        client.read_frame().await,
        None,
        "TCP closes after the one Close"
    );

    assert_echoes(&mut bystander, Message::text("still echoing")).await;
    bystander.close(None).await.expect("close");
    assert_eq!(expect_close(&mut bystander).await.0, 1005);

    let scrape = scrape_when_closed(server.addr).await;
    let closes = |side, code| {
        value(
            &scrape,
            "ws_echo_closes_total",
            &[("side", side), ("code", code)],
        )
    };
    assert_eq!(closes("server", "1007"), 1.0);
    assert_eq!(closes("client", "1005"), 1.0);
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "ws_echo_closes_total" && s.labels.get("code") == Some("1006")),
        "the failed connection is not counted as dropped"
    );
}

/// Whole small messages are echoed where they are read and the rest goes through the
/// engine (`src/fast_echo.rs`); mixed in one write, every echo and the Pong still leave
/// in the order their frames came, the Close last, and the metrics count every echo.
#[tokio::test]
async fn messages_in_one_read_are_echoed_in_order_whatever_path_they_take() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let mut bytes = Vec::new();
    for (fin, opcode, payload) in [
        (true, TEXT, &b"one"[..]),
        (true, BINARY, &[0xFF, 0x00][..]),
        (true, PING, &b"p"[..]),
        (true, TEXT, &b"after the ping"[..]),
        (false, TEXT, &b"frag"[..]),
        (true, CONTINUATION, &b"mented"[..]),
        (true, TEXT, &[0x80][..]), // invalid UTF-8: the lane declines it, the engine fails it
    ] {
        bytes.extend(encode_frame(fin, false, opcode, payload, true));
    }
    client.send_bytes(&bytes).await;
    let mut received = Vec::new();
    for _ in 0..5 {
        let frame = client.read_frame().await.expect("a frame");
        received.push((frame.opcode, frame.payload));
    }
    assert_eq!(
        received,
        [
            (TEXT, b"one".to_vec()),
            (BINARY, vec![0xFF, 0x00]),
            (PONG, b"p".to_vec()),
            (TEXT, b"after the ping".to_vec()),
            (TEXT, b"fragmented".to_vec()),
        ]
    );
    assert_eq!(client.expect_close().await.close_code(), 1007);

    let scrape = scrape_when_closed(server.addr).await;
    let messages = |direction, kind| {
        value(
            &scrape,
            "ws_echo_messages_total",
            &[("direction", direction), ("type", kind)],
        )
    };
    assert_eq!(messages("in", "text"), 3.0);
    assert_eq!(messages("out", "text"), 3.0);
    assert_eq!(messages("out", "binary"), 1.0);
}

/// Pipelined messages taken by the lane in one read are all echoed before the Close
/// answer when the Close comes in the same read.
#[tokio::test]
async fn echoes_of_a_read_go_out_before_the_close_reply() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let mut bytes = Vec::new();
    for i in 0..50 {
        bytes.extend(encode_frame(
            true,
            false,
            TEXT,
            format!("m{i}").as_bytes(),
            true,
        ));
    }
    bytes.extend(encode_frame(
        true,
        false,
        CLOSE,
        &1000u16.to_be_bytes(),
        true,
    ));
    bytes.extend(encode_frame(true, false, TEXT, b"after close", true));
    client.send_bytes(&bytes).await;
    for i in 0..50 {
        let echo = client.read_frame().await.expect("echo");
        assert_eq!(
            (echo.opcode, echo.payload),
            (TEXT, format!("m{i}").into_bytes())
        );
    }
    assert_eq!(client.expect_close().await.close_code(), 1000);
    assert_eq!(
        client.read_frame().await,
        None,
        "nothing after the Close reply"
    );
}

/// Messages larger than a read are received by the fast lane straight into the output
/// queue; sent in pieces with pauses, they are echoed whole, and text that turns out
/// invalid part-way closes with 1007 without any of it echoed.
#[tokio::test]
async fn large_messages_sent_in_pieces_are_echoed_whole_or_refused() {
    let server = TestServer::start().await;
    let (mut client, _) = server.raw("").await;
    let binary: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let text = "é𝄞a".repeat(5_000);
    let mut bytes = encode_frame(true, false, BINARY, &binary, true);
    bytes.extend(encode_frame(true, false, TEXT, text.as_bytes(), true));
    // Pieces that cut headers, characters and payloads at odd places.
    for piece in bytes.chunks(7_777) {
        client.send_bytes(piece).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let echo = client.read_frame().await.expect("binary echo");
    assert_eq!((echo.opcode, echo.fin), (BINARY, true));
    assert!(echo.payload == binary, "binary echoed unchanged");
    let echo = client.read_frame().await.expect("text echo");
    assert_eq!(
        (echo.opcode, echo.payload.as_slice()),
        (TEXT, text.as_bytes())
    );

    let mut bad = "ok".repeat(10_000).into_bytes();
    bad[15_000] = 0xFF;
    let frame = encode_frame(true, false, TEXT, &bad, true);
    client.send_bytes(&frame[..5_000]).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    client.send_bytes(&frame[5_000..]).await;
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 1007);
}
