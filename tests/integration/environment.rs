//! The binary configured through `WS_ECHO_*` variables, as containers and Kubernetes
//! configure it: switches take the usual spellings of on and off.

use tokio::net::TcpStream;

use crate::support::{ServerProcess, raw_handshake};

/// The response head of an upgrade offering permessage-deflate and the `chat`
/// subprotocol, lower-cased.
async fn handshake(server: &ServerProcess) -> String {
    let stream = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    let (_, head) = raw_handshake(
        stream,
        "Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Protocol: chat\r\n",
    )
    .await;
    head.to_ascii_lowercase()
}

#[tokio::test]
async fn switch_variable_takes_one_and_zero() {
    for (value, compressed) in [("1", false), ("yes", false), ("0", true), ("off", true)] {
        let server = ServerProcess::start_with_env(&[], &[("WS_ECHO_NO_COMPRESSION", value)]);
        let head = handshake(&server).await;
        assert_eq!(
            head.contains("sec-websocket-extensions: permessage-deflate"),
            compressed,
            "WS_ECHO_NO_COMPRESSION={value}: {head}"
        );
    }
}

#[tokio::test]
async fn switch_variable_with_another_value_stops_the_binary() {
    let output = ServerProcess::command(&[], &[("WS_ECHO_NO_COMPRESSION", "maybe")])
        .output()
        .expect("run ws_echo");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid value 'maybe' for '--no-compression'"),
        "{stderr}"
    );
}

/// clap alone counts a switch set from the environment as given even when it says off,
/// so `WS_ECHO_NO_SUBPROTOCOL=0` used to conflict with `--subprotocol`.
#[tokio::test]
async fn switch_variable_set_off_is_as_if_absent() {
    let server = ServerProcess::start_with_env(
        &["--subprotocol", "chat"],
        &[("WS_ECHO_NO_SUBPROTOCOL", "false")],
    );
    let head = handshake(&server).await;
    assert!(head.contains("sec-websocket-protocol: chat"), "{head}");

    let output = ServerProcess::command(
        &["--subprotocol", "chat"],
        &[("WS_ECHO_NO_SUBPROTOCOL", "1")],
    )
    .output()
    .expect("run ws_echo");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot be used with"),
        "{output:?}"
    );
}
