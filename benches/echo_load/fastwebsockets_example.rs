//! fastwebsockets' own echo server (its `examples/echo_server.rs` at 0.10.0), run as its
//! own process when the bench binary is started with [`ARG`] (`--against
//! fastwebsockets`): the fast Rust WebSocket library the issue measures ws_echo against.
//!
//! The handler and the runtime are the example's, unchanged: a current-thread runtime,
//! hyper's HTTP/1 upgrade, `FragmentCollector`, one `write_frame` (a write and a flush)
//! per echo, `TCP_NODELAY` left off. Only the address differs (127.0.0.1:0, reported on
//! stderr like the other servers) and the example's per-connection `println!`s are
//! gone, since the bench does not drain this server's stdout.

// The example's code is kept as its authors wrote it.
#![allow(clippy::uninlined_format_args)]

use std::process::ExitCode;

use fastwebsockets::{OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};

/// The hidden argument that turns the bench binary into this server.
pub(crate) const ARG: &str = "--fastwebsockets-server";

/// The stderr line prefix the bench reads the address from.
pub(crate) const LISTENING: &str = "echo_load fastwebsockets listening on ";

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fastwebsockets::FragmentCollector::new(fut.await?);

    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => {
                ws.write_frame(frame).await?;
            }
            _ => {}
        }
    }

    Ok(())
}

async fn server_upgrade(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;

    tokio::task::spawn(async move {
        if let Err(e) = tokio::task::unconstrained(handle_client(fut)).await {
            eprintln!("Error in websocket connection: {}", e);
        }
    });

    Ok(response)
}

/// Serves the example's echo until killed.
pub(crate) fn main() -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("the example's runtime starts");

    rt.block_on(async move {
        let listener = crate::servers::listen_and_report(LISTENING).await;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn_fut = http1::Builder::new()
                    .serve_connection(io, service_fn(server_upgrade))
                    .with_upgrades();
                let _ = conn_fut.await;
            });
        }
    })
}
