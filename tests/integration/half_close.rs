//! Clients that send a whole request and then shut down their write side (`nc -N`,
//! some proxies) still get their answer.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{STEP, TestServer};

/// Writes `request`, shuts down the write side, and reads until the server closes.
async fn half_closed_exchange(server: &TestServer, request: &str) -> String {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.shutdown().await.expect("shut down the write side");
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .expect("the server answers and closes in time")
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

/// On a multi-threaded runtime, as the binary runs: whether hyper sees the EOF before
/// the answer is ready is a race there (without half-close support most of these
/// exchanges got nothing; on one thread the answer always won), so each request is
/// made many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_gets_the_page_and_health() {
    let server = TestServer::start().await;
    for _ in 0..200 {
        let page = half_closed_exchange(&server, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("</html>"), "the whole page arrives: {page}");

        let health =
            half_closed_exchange(&server, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }

    // The connection is still usable by others, and a normal exchange is unaffected.
    let head = server
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Connections accepted during the drain are served by a second builder (no
/// keep-alive); it answers half-closed clients too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_is_answered_during_the_drain() {
    let mut server = TestServer::start().await;
    // A client that never answers the server's Close keeps the drain going.
    let _mute = server.connect().await;
    server.begin_stop();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let ready = half_closed_exchange(&server, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if ready.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain never began"
        );
    }
    for _ in 0..50 {
        let ready = half_closed_exchange(&server, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    }
}
