//! Graceful shutdown of the real binary: SIGTERM with 50 WebSockets open.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{ServerProcess, expect_close, recv};

/// Every client gets every echo it is owed, then Close 1001, and the process exits 0
/// within the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_echoes_what_was_received_then_closes_with_1001() {
    let server = ServerProcess::start(&["--shutdown-timeout", "5s"]);
    assert!(server.first_line.contains(r#""runtime":"multi-thread""#));
    echoes_everything_owed_then_closes_with_1001(server).await;
}

/// The same on one CPU, where the binary picks tokio's current-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_current_thread_runtime_echoes_and_drains_the_same() {
    let server = ServerProcess::start_on_one_cpu(&["--shutdown-timeout", "5s"]);
    assert!(
        server.first_line.contains(r#""runtime":"current-thread""#),
        "{}",
        server.first_line
    );
    echoes_everything_owed_then_closes_with_1001(server).await;
}

/// 50 clients each write 20 messages, then SIGTERM: every echo, Close 1001, exit 0.
async fn echoes_everything_owed_then_closes_with_1001(mut server: ServerProcess) {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 20;
    let url = server.ws_url();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        clients.push(client);
    }
    // Everything is written to the server's sockets before the signal, so all of it has
    // been received and is owed back.
    for (c, client) in clients.iter_mut().enumerate() {
        for m in 0..MESSAGES {
            client
                .feed(Message::text(format!("{c}:{m}")))
                .await
                .expect("feed");
        }
        client.flush().await.expect("flush");
    }
    let signalled = Instant::now();
    server.terminate();
    for (c, client) in clients.iter_mut().enumerate() {
        for m in 0..MESSAGES {
            assert_eq!(
                recv(client).await,
                Message::text(format!("{c}:{m}")),
                "client {c} echo {m}"
            );
        }
        let (code, reason) = expect_close(client).await;
        assert_eq!(code, 1001, "client {c}: {reason}");
        // tungstenite writes its Close reply on the next flush.
        let _ = client.flush().await;
    }
    let status = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "drained within the deadline"
    );
}

/// New connections are refused once the drain begins, and an idle server exits at once.
#[tokio::test]
async fn idle_server_exits_zero_on_sigterm() {
    let mut server = ServerProcess::start(&[]);
    server.terminate();
    let status = server.wait(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
}

/// During the drain, a new connection is answered at once: 503 from /readyz (so load
/// balancers take the instance out) and 503 for an upgrade, not a hang.
#[tokio::test]
async fn new_connections_during_the_drain_get_503_at_once() {
    let settings = ws_echo::Settings {
        shutdown_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let mut server = crate::support::TestServer::with(settings).await;
    // A client that never answers the server's Close keeps the drain going.
    let _mute = server.connect().await;
    let ready = server.http("GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    server.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let ready = server.http("GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let upgrade = tokio_tungstenite::connect_async(server.ws_url()).await;
    match upgrade {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answers came promptly"
    );
}
