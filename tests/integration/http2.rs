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
    RawClient, STEP, TestServer, assert_echoes, assert_echoes_text_and_binary, deflate,
    encode_frame, inflate, tls_client_config,
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
    extended_connect_to(sender, scheme, "/ws", protocol, headers).await
}

/// Sends `CONNECT target` (path and query) with `:protocol` set to `protocol`.
async fn extended_connect_to(
    sender: &mut Sender,
    scheme: &str,
    target: &str,
    protocol: &'static str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{scheme}://localhost{target}"))
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

/// Sends `method target` with `body` on `sender`; the status, headers and whole body.
async fn request(
    sender: &mut Sender,
    method: Method,
    target: &str,
    body: &'static str,
) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://localhost{target}"))
        .body(Body::from(body))
        .expect("a valid request");
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    let (head, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .expect("the whole body")
        .to_bytes();
    (head.status, head.headers, body.to_vec())
}

/// Plain requests over HTTP/2 reach the router as over HTTP/1.1: the page with its
/// length, HEAD with the length and no body, a request body read and answered.
#[tokio::test]
async fn ordinary_requests_over_h2c_are_answered_by_the_router() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;
    let (status, headers, page) = request(&mut sender, Method::GET, "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("<html"));
    let length = headers[header::CONTENT_LENGTH].to_str().expect("ASCII");
    assert_eq!(length, page.len().to_string());
    let (status, headers, body) = request(&mut sender, Method::HEAD, "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_LENGTH], length);
    assert!(body.is_empty(), "HEAD has no body");
    let (status, _, body) = request(&mut sender, Method::POST, "/", "a body to read").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body, b"use GET\n");
    let (status, _, body) = request(&mut sender, Method::GET, "/controls", "").await;
    assert_eq!(status, StatusCode::OK);
    let description: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert!(description["parameters"].is_array(), "{description}");
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

/// A raw WebSocket over an h2c extended CONNECT to `/ws?QUERY`, with the response's
/// `x-ws-echo-controls` header.
async fn h2c_raw(sender: &mut Sender, query: &str) -> (RawClient<TokioIo<Upgraded>>, String) {
    let target = format!("/ws?{query}");
    let response = extended_connect_to(sender, "http", &target, "websocket", &[VERSION]).await;
    let controls = response.headers()["x-ws-echo-controls"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    (RawClient::new(upgraded(response).await), controls)
}

#[tokio::test]
async fn controls_shape_http2_websockets_as_they_do_http1_ones() {
    let server = TestServer::start().await;
    let mut sender = h2c(&server).await;

    let (mut client, controls) = h2c_raw(&mut sender, "fragment=2&delay=200ms").await;
    assert_eq!(controls, "delay=200ms, fragment=2");
    let sent = Instant::now();
    client.send(true, 0x1, b"abcde").await;
    let mut shape = Vec::new();
    for _ in 0..3 {
        let frame = client.read_frame().await.expect("a frame");
        shape.push((frame.fin, frame.opcode, frame.payload));
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(200),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(
        shape,
        [
            (false, 0x1, b"ab".to_vec()),
            (false, 0x0, b"cd".to_vec()),
            (true, 0x0, b"e".to_vec())
        ]
    );

    let (mut client, _) = h2c_raw(&mut sender, "stream=3&size=5").await;
    for counter in 1..=3 {
        let frame = client.read_frame().await.expect("a stream message");
        assert_eq!(frame.payload, format!("{counter} abcdefg").as_bytes()[..5]);
    }

    let (mut client, _) = h2c_raw(&mut sender, "close=4002&reason=h2").await;
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), 4002);
    assert_eq!(&close.payload[2..], b"h2");
    client.send(true, 0x8, &4002u16.to_be_bytes()).await;
    client.expect_eof().await;

    // drop: the stream is reset (RST_STREAM) after the echo, with no Close frame, and
    // the connection's other streams go on.
    let (mut dropped, _) = h2c_raw(&mut sender, "drop=1&after=1").await;
    let mut survivor = websocket(&mut sender, "http").await;
    dropped.send(true, 0x1, b"bye").await;
    let echo = dropped
        .read_frame()
        .await
        .expect("the echo before the drop");
    assert_eq!(echo.payload, b"bye");
    assert_eq!(
        dropped.read_frame().await,
        None,
        "no Close frame after a drop"
    );
    assert_echoes_text_and_binary(&mut survivor).await;
}

/// The `drop` control on HTTP/2, seen with h2's own client (hyper's reads a reset with
/// CANCEL as an orderly end): the echo before it arrives, then the stream is reset
/// (RST_STREAM CANCEL), with no Close frame and no END_STREAM.
#[tokio::test]
async fn drop_resets_the_http2_stream_after_its_echoes() {
    let server = TestServer::start().await;
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let deadline = Instant::now() + STEP;
    while !client.is_extended_connect_protocol_enabled() {
        assert!(
            Instant::now() < deadline,
            "no extended CONNECT in the SETTINGS"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost/ws?drop=1&after=1")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .header(VERSION.0, VERSION.1)
        .body(())
        .expect("a valid request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    let response = tokio::time::timeout(STEP, response)
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    send.send_data(encode_frame(true, false, 0x1, b"last", true).into(), false)
        .expect("send the message");
    let mut body = response.into_body();
    let mut received = Vec::new();
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match body.data().await {
                Some(Ok(data)) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    received.extend_from_slice(&data);
                }
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends in time");
    // The unmasked echo, and nothing after it: no Close frame.
    assert_eq!(received, encode_frame(true, false, 0x1, b"last", false));
    match ended {
        Some(Err(error)) => assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}"),
        other => panic!("expected RST_STREAM, got {other:?}"),
    }
}
