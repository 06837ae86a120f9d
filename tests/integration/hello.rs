//! The opt-in greeting (`/ws?hello=1`) and its absence by default.

use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestServer, assert_echoes, recv};

#[tokio::test]
async fn hello_describes_the_connection_before_echoing() {
    let settings = ws_echo::Settings {
        instance_name: "replica-3".into(),
        ..Default::default()
    };
    let server = TestServer::with(settings).await;
    let (mut client, _) = tokio_tungstenite::connect_async(format!("{}?hello=1", server.ws_url()))
        .await
        .expect("connect");
    let Message::Text(greeting) = recv(&mut client).await else {
        panic!("the greeting is a text message");
    };
    let greeting: serde_json::Value = serde_json::from_str(&greeting).expect("JSON");
    assert_eq!(greeting["instance"], "replica-3");
    assert_eq!(greeting["http_version"], "HTTP/1.1");
    assert!(
        greeting["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with("127.0.0.1:"))
    );
    assert!(greeting["headers"].as_array().is_some_and(|headers| {
        headers
            .iter()
            .any(|h| h[0] == "sec-websocket-version" && h[1] == "13")
    }));
    assert_eq!(greeting["tls"], serde_json::Value::Null);
    assert_eq!(greeting["subprotocol"], serde_json::Value::Null);
    assert_echoes(&mut client, Message::text("then the echo")).await;
}

/// By default nothing unsolicited is sent: the first message back is the echo.
#[tokio::test]
async fn no_greeting_unless_asked() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    assert_echoes(&mut client, Message::text("first")).await;
}
