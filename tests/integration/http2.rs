//! WebSockets over HTTP/2 (RFC 8441): hyper's HTTP/2 client sends an extended CONNECT
//! with `:protocol = websocket` over h2c (prior knowledge) and over TLS (ALPN h2), and the
//! stream it gets back echoes as an HTTP/1.1 upgrade does.

use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, client::conn::http2, ext::Protocol, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::Role},
};
use ws_echo::{Settings, TlsSettings};

use crate::support::{
    RawClient, STEP, TestServer, assert_echoes, assert_echoes_text_and_binary, deflate, inflate,
    tls_client_config,
};

/// RFC 8441 §5: the version header is sent as in HTTP/1.1; the key is not.
const VERSION: (&str, &str) = ("sec-websocket-version", "13");

/// The client half of an HTTP/2 connection.
type Sender = http2::SendRequest<Body>;

/// Opens HTTP/2 on `io` and waits for the server's SETTINGS to enable extended CONNECT
/// (RFC 8441 §3): a client sends none before it has seen `SETTINGS_ENABLE_CONNECT_PROTOCOL
/// = 1`, so without it no browser would try.
async fn h2_handshake<I>(io: I) -> Sender
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    let mut connection = Box::pin(connection);
    // hyper reads the SETTINGS in a task of its own and wakes no one when they change,
    // so look every few milliseconds, driving the connection meanwhile.
    let deadline = Instant::now() + STEP;
    while !connection.is_extended_connect_protocol_enabled() {
        assert!(
            Instant::now() < deadline,
            "the server's SETTINGS do not enable extended CONNECT"
        );
        tokio::select! {
            result = connection.as_mut() => panic!("the connection ended before SETTINGS: {result:?}"),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    tokio::spawn(connection);
    sender
}

/// HTTP/2 with prior knowledge on plain TCP (h2c).
async fn h2c(server: &TestServer) -> Sender {
    h2_handshake(TcpStream::connect(server.addr).await.expect("connect")).await
}

/// HTTP/2 over TLS, chosen by ALPN, trusting `tls`'s certificate.
async fn h2_over_tls(server: &TestServer, tls: &TlsSettings) -> Sender {
    let connector = TlsConnector::from(tls_client_config(tls.certificate_der(), &[b"h2"]));
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name");
    let stream = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake succeeds");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    h2_handshake(stream).await
}

/// Sends `CONNECT /ws` with `:protocol` set to `protocol` and the given headers.
async fn extended_connect(
    sender: &mut Sender,
    scheme: &str,
    protocol: &'static str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{scheme}://localhost/ws"))
        .extension(Protocol::from_static(protocol));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Body::empty()).expect("a valid request");
    tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response")
}

/// Completes an extended CONNECT that got 200 and returns its stream.
async fn upgraded(response: Response<Incoming>) -> TokioIo<Upgraded> {
    assert_eq!(response.status(), StatusCode::OK);
    // RFC 8441 §5: none of the HTTP/1.1 upgrade headers; HTTP/2 forbids the first two.
    for name in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
    ] {
        assert!(
            !response.headers().contains_key(&name),
            "{name} in {:?}",
            response.headers()
        );
    }
    let upgraded = tokio::time::timeout(STEP, hyper::upgrade::on(response))
        .await
        .expect("upgrade in time")
        .expect("the CONNECT stream is handed over");
    TokioIo::new(upgraded)
}

/// An HTTP/2 WebSocket as a tokio-tungstenite client.
async fn websocket(sender: &mut Sender, scheme: &str) -> WebSocketStream<TokioIo<Upgraded>> {
    let response = extended_connect(sender, scheme, "websocket", &[VERSION]).await;
    WebSocketStream::from_raw_socket(upgraded(response).await, Role::Client, None).await
}

#[tokio::test]
async fn extended_connect_over_h2c_echoes_like_an_http1_upgrade() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let mut client = websocket(&mut sender, "http").await;
    assert_echoes_text_and_binary(&mut client).await;
}

#[tokio::test]
async fn extended_connect_over_tls_h2_echoes_like_an_http1_upgrade() {
    let tls = TlsSettings::self_signed(&[]).expect("generate a certificate");
    let server = TestServer::with(Settings {
        tls: Some(tls.clone()),
        ..Settings::default()
    })
    .await;
    let mut sender = h2_over_tls(&server, &tls).await;
    let mut client = websocket(&mut sender, "https").await;
    assert_echoes_text_and_binary(&mut client).await;
}

/// HTTP/2's point: several WebSockets share one connection, each on its own stream.
#[tokio::test]
async fn websockets_on_one_h2_connection_are_independent() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let mut first = websocket(&mut sender, "http").await;
    let mut second = websocket(&mut sender, "http").await;
    assert_echoes(&mut first, Message::text("first")).await;
    assert_echoes(&mut second, Message::text("second")).await;
    first.close(None).await.expect("close the first");
    assert_echoes(&mut second, Message::binary(vec![2; 70_000])).await;
    let mut third = websocket(&mut sender, "http").await;
    assert_echoes(&mut third, Message::text("third")).await;
}

/// permessage-deflate is negotiated in the CONNECT's headers as in an HTTP/1.1
/// upgrade's, and the echo on the HTTP/2 stream comes back compressed.
#[tokio::test]
async fn extended_connect_negotiates_permessage_deflate() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let response = extended_connect(
        &mut sender,
        "http",
        "websocket",
        &[VERSION, ("sec-websocket-extensions", "permessage-deflate")],
    )
    .await;
    let agreed = response
        .headers()
        .get(header::SEC_WEBSOCKET_EXTENSIONS)
        .expect("deflate is agreed")
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(agreed.starts_with("permessage-deflate"), "{agreed}");
    let mut client = RawClient::new(upgraded(response).await);
    // Above the default compression threshold (64 bytes), so the echo is compressed.
    let text = "echo over HTTP/2, ".repeat(20);
    client
        .send_bytes(&crate::support::encode_frame(
            true,
            true,
            0x1,
            &deflate(text.as_bytes()),
            true,
        ))
        .await;
    let echo = client.read_frame().await.expect("an echo");
    assert_eq!((echo.opcode, echo.fin, echo.rsv1), (0x1, true, true));
    assert_eq!(inflate(&echo.payload), text.as_bytes());
}

/// Only `:protocol = websocket` is ours; any other extended CONNECT is refused.
#[tokio::test]
async fn extended_connect_for_another_protocol_is_405() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let response = extended_connect(&mut sender, "http", "not-websocket", &[VERSION]).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn extended_connect_without_version_13_is_426() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let response = extended_connect(
        &mut sender,
        "http",
        "websocket",
        &[("sec-websocket-version", "8")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
}
