//! Graceful shutdown of the real binary: SIGTERM with 50 WebSockets open.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{expect_close, recv};

/// The binary, killed on drop if a test fails before it exits.
struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    /// Starts `ws_echo` on 127.0.0.1:0 and reads its port from the first log line.
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ws_echo"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ws_echo");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read the listening line");
        let port = first_line
            .split("\"url\":\"http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no listening URL in {first_line:?}"));
        Self { child, port }
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "ws_echo did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every client gets every echo it is owed, then Close 1001, and the process exits 0
/// within the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_echoes_what_was_received_then_closes_with_1001() {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 20;
    let mut server = ServerProcess::start(&["--shutdown-timeout", "5s"]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
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
