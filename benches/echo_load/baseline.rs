//! The baseline: the tutorial's echo server, its handler exactly as written, run as its
//! own process when the bench binary is started with [`ARG`].
//!
//! `main` is what `#[tokio::main]` expands to (a default multi-thread runtime) around
//! the tutorial's `axum::serve`, bound to 127.0.0.1:0 instead of a fixed port. It reports
//! its address on stderr because its stdout carries one `Got message` line per message
//! and the bench sends that to /dev/null.

// The tutorial prints every message; that cost is part of what is measured.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use axum::{
    Router,
    extract::ws::{WebSocket, WebSocketUpgrade},
    response::IntoResponse,
    routing::get,
};

/// The hidden argument that turns the bench binary into the baseline server.
pub(crate) const ARG: &str = "--baseline-server";

/// The stderr line prefix the bench reads the address from.
pub(crate) const LISTENING: &str = "echo_load baseline listening on ";

/// Serves the tutorial's `/ws` until killed.
pub(crate) fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the baseline's runtime starts");
    runtime.block_on(async {
        let app = Router::new().route("/ws", get(ws_handler));
        let listener = crate::servers::listen_and_report(LISTENING).await;
        axum::serve(listener, app).await.expect("serve");
    });
    ExitCode::SUCCESS
}

// ---- The tutorial's handler, unchanged. ----

async fn ws_handler(ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(handle_socket)
}

async fn handle_socket(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        println!("Got message: {}", msg.to_text().unwrap());
        socket.send(msg).await.unwrap();
    }
}
