//! The `ws_echo` binary: parse the configuration, install logging, bind, serve until
//! Ctrl-C or SIGTERM, exit 0 after the drain.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context;
use tokio::net::TcpListener;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};
use ws_echo::{Config, LogFormat};

/// jemalloc instead of glibc's malloc. Measured with `cargo bench --bench soak`: after
/// rounds of 10,000 connections opened, used and closed, glibc kept the freed memory
/// (RSS settled 34% above its baseline and stayed there), while jemalloc returns it to
/// the system. As in ripgrep's `main.rs`, the allocator is the binary's choice, not the
/// library's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<ExitCode> {
    let config = Config::from_args_and_env();
    init_tracing(&config.log_level, config.log_format)?;
    // On one core (a `taskset`, a container's CPU limit) the current-thread scheduler is
    // the same single thread without the work-stealing machinery: echo_load W1 (100
    // connections, one 20-byte message in flight each), two quick runs each: 6.19 and
    // 6.53 µs of server CPU per message with the multi-thread runtime's one worker,
    // 5.94 and 5.83 with this. `--worker-threads 1` still asks for the former.
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut runtime = if config.current_thread || (config.worker_threads == 0 && one_core) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.worker_threads > 0 {
            builder.worker_threads(config.worker_threads);
        }
        builder
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    // Before the settings, which read the limit for the TCP connection cap.
    let open_files = ws_echo::raise_open_file_limit();
    let settings = config.into_settings()?;
    if let Err(error) = open_files {
        tracing::warn!(%error, "could not read or raise the open-file limit");
    }
    runtime.block_on(async {
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("could not listen on {}", settings.addr))?;
        ws_echo::run(listener, settings, ws_echo::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `--log-level`; a bare
/// level such as `debug` applies to ws_echo and tower_http only, so dependencies stay
/// quiet.
fn init_tracing(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => EnvFilter::try_new(filter),
        _ if level.contains('=') => EnvFilter::try_new(level),
        _ => EnvFilter::try_new(format!("ws_echo={level},tower_http={level}")),
    }
    .context("invalid log filter")?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init(),
    }
    Ok(())
}
