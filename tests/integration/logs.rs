//! The per-connection log lines of the real binary: every line of a WebSocket carries
//! its span (`id`, `peer`, `http_version`), at the default info level, where the echo
//! loop runs outside the span and enters it only to log, and at debug level, where the
//! whole task runs inside it.

use futures_util::SinkExt;
use tokio_tungstenite::{
    MaybeTlsStream, connect_async,
    tungstenite::{Message, protocol::CloseFrame},
};

use crate::support::{ServerProcess, assert_echoes, expect_close};

#[tokio::test]
async fn at_info_level_opening_and_closing_lines_carry_the_span_and_the_counts() {
    let mut server = ServerProcess::start(&[]);
    one_connection_logs_its_span_and_counts(&mut server, false).await;
}

#[tokio::test]
async fn at_debug_level_the_same_lines_and_each_message_carry_the_span() {
    let mut server = ServerProcess::start(&["--log-level", "debug"]);
    one_connection_logs_its_span_and_counts(&mut server, true).await;
}

/// Opens one WebSocket, echoes a text and a binary message, closes with 1000, and
/// checks the "connection opened" and "connection closed" lines (and, at `debug` level,
/// the text message's "Got message" line between them).
async fn one_connection_logs_its_span_and_counts(server: &mut ServerProcess, debug: bool) {
    let (mut client, _) = connect_async(server.ws_url()).await.expect("connect");
    let peer = match client.get_ref() {
        MaybeTlsStream::Plain(stream) => stream.local_addr().expect("local address"),
        _ => unreachable!("a ws:// URL connects over plain TCP"),
    };
    assert_echoes(&mut client, Message::text("logged")).await;
    assert_echoes(&mut client, Message::binary(vec![1u8, 2, 3])).await;
    client
        .send(Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: "done".into(),
        })))
        .await
        .expect("send Close");
    assert_eq!(expect_close(&mut client).await.0, 1000);

    let opened = server.next_line_with("connection opened").await;
    let span = &opened["span"];
    assert_eq!(span["name"], "ws", "{opened}");
    assert_eq!(span["peer"], peer.to_string(), "{opened}");
    assert_eq!(span["http_version"], "HTTP/1.1", "{opened}");
    let id = span["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connection id: {opened}"));

    if debug {
        let received = server.next_line_with("Got message").await;
        assert_eq!(received["span"]["id"], id, "{received}");
        assert_eq!(received["span"]["peer"], peer.to_string(), "{received}");
    }

    let closed = server.next_line_with("connection closed").await;
    assert_eq!(closed["span"]["id"], id, "{closed}");
    assert_eq!(closed["span"]["peer"], peer.to_string(), "{closed}");
    let fields = &closed["fields"];
    assert_eq!(fields["messages_in"], 2, "{closed}");
    assert_eq!(fields["messages_out"], 2, "{closed}");
    assert_eq!(fields["bytes_in"], 9, "{closed}");
    assert_eq!(fields["close_code"], 1000, "{closed}");
    assert!(
        fields["message"]
            .as_str()
            .is_some_and(|message| message.ends_with("client closed")),
        "{closed}"
    );
}
