//! `cargo bench --bench soak`: does ws_echo give its memory back? Starts the release
//! binary on loopback, then round after round opens 10,000 WebSockets, echoes a few
//! messages on each, closes them all cleanly, lets the server settle and reads its RSS.
//! The first round is a warm-up (thread pools, allocator arenas and buffers reach their
//! working size); the RSS after it is the baseline. The verdict: the RSS after the last
//! round is within 10% of the baseline (no leak), or not.
//!
//! It runs for `--duration` (5 minutes by default; `--quick` is about 30 s) and stops by
//! itself; the server is killed on exit whatever happens. `--server-env KEY=VALUE` adds
//! to the server's environment, to tell a leak from an allocator keeping freed memory
//! (`MALLOC_ARENA_MAX=2` for glibc's arenas, `LD_PRELOAD` for another allocator). Not a
//! test: it prints a table and a verdict, and exits non-zero
//! when RSS did not come back. See benches/README.md for the latest figures.

// A benchmark's report is what it prints.
#![allow(clippy::print_stdout)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, task::JoinSet};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, client_async, tungstenite::Message};

/// WebSockets open at once in each round.
const CONNECTIONS: usize = 10_000;
/// Messages echoed on each connection per round.
const MESSAGES: usize = 3;
/// Client tasks; each opens, echoes on and closes its share of the connections in turn.
const WORKERS: usize = 32;
/// Time the server gets after a round before its RSS is read: connection tasks end and
/// their memory is freed well within it.
const SETTLE: Duration = Duration::from_secs(2);
/// How far above the baseline the final RSS may be and still count as "returned".
const TOLERANCE: f64 = 0.10;
/// Longest one round may take before the bench gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(120);

const USAGE: &str = "\
usage: cargo bench --bench soak -- [--duration 5m | --quick] [--server-env KEY=VALUE]...

Rounds of 10,000 WebSockets (open, echo 3 messages each, close) against the release
binary; prints the server's RSS after each round and whether it returned to within 10%
of its baseline after the warm-up round.";

/// The command line.
#[derive(Debug)]
struct Args {
    duration: Duration,
    server_env: Vec<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(300),
        server_env: Vec::new(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            // `cargo bench` passes this to every bench.
            "--bench" => {}
            "--quick" => args.duration = Duration::from_secs(30),
            "--duration" => {
                let value = argv.next().ok_or("--duration needs a value, like 5m")?;
                args.duration = humantime::parse_duration(&value).map_err(|e| e.to_string())?;
            }
            "--server-env" => {
                let pair = argv.next().ok_or("--server-env needs KEY=VALUE")?;
                let (key, value) = pair.split_once('=').ok_or("--server-env needs KEY=VALUE")?;
                args.server_env.push((key.to_owned(), value.to_owned()));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(args)
}

/// The server process; killed when dropped, so a failing bench leaves nothing behind.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts the release binary on 127.0.0.1:0 and reads its port from the first log
    /// line; the rest of its log is drained on a thread so it never blocks on the pipe.
    fn start(env: &[(String, String)]) -> Result<Self, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ws_echo"));
        command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command.envs(env.iter().map(|(key, value)| (key, value)));
        let mut child = command.spawn().map_err(|e| format!("start ws_echo: {e}"))?;
        let stdout = child.stdout.take().expect("invariant: stdout is piped");
        // From here on `server` kills the child if anything fails.
        let mut server = Self { child, port: 0 };
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .map_err(|e| format!("read ws_echo's first line: {e}"))?;
        server.port = first
            .split("\"url\":\"http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| format!("no listening URL in {first:?}"))?;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(server)
    }

    /// Resident memory (VmRSS), in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one round measured.
struct Round {
    /// Time to open all connections.
    open: Duration,
    /// Time for the whole round (open, echo, close).
    total: Duration,
    /// Server RSS with every connection open and echoed on.
    rss_open: u64,
    /// Server RSS after the round and the settle time.
    rss_after: u64,
    /// Connections, echoes or closes that failed.
    errors: usize,
}

/// Opens `count` WebSockets to the server.
async fn open(port: u16, count: usize) -> (Vec<Client>, usize) {
    let mut clients = Vec::with_capacity(count);
    let mut errors = 0;
    let url = format!("ws://127.0.0.1:{port}/ws");
    for _ in 0..count {
        let opened = async {
            let stream = TcpStream::connect(("127.0.0.1", port)).await?;
            stream.set_nodelay(true)?;
            let (client, _) = client_async(url.as_str(), MaybeTlsStream::Plain(stream))
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(client)
        };
        match opened.await {
            Ok(client) => clients.push(client),
            Err(_) => errors += 1,
        }
    }
    (clients, errors)
}

/// Echoes [`MESSAGES`] messages on each client; counts failures.
async fn echo(clients: &mut [Client], worker: usize) -> usize {
    let mut errors = 0;
    for (i, client) in clients.iter_mut().enumerate() {
        for m in 0..MESSAGES {
            let message = Message::text(format!("soak {worker}/{i}/{m}"));
            let ok = async {
                client.send(message.clone()).await.ok()?;
                loop {
                    match client.next().await?.ok()? {
                        Message::Ping(_) | Message::Pong(_) => continue,
                        echo => return Some(echo == message),
                    }
                }
            };
            if ok.await != Some(true) {
                errors += 1;
            }
        }
    }
    errors
}

/// Closes each client cleanly: our Close, the server's answer, the end of the stream.
async fn close(clients: Vec<Client>) -> usize {
    let mut errors = 0;
    for mut client in clients {
        if client.close(None).await.is_err() {
            errors += 1;
            continue;
        }
        // The server answers our Close and then closes TCP first (RFC 6455 §7.1.1).
        while let Some(Ok(_)) = client.next().await {}
    }
    errors
}

/// One round: every worker opens its share, all wait until everything is open and the
/// server's RSS is read, then every worker echoes on and closes its share.
async fn round(server: &Server) -> Round {
    let started = Instant::now();
    let share = CONNECTIONS / WORKERS;
    let opened = Arc::new(tokio::sync::Barrier::new(WORKERS + 1));
    let measured = Arc::new(tokio::sync::Barrier::new(WORKERS + 1));
    let mut workers = JoinSet::new();
    for worker in 0..WORKERS {
        let (opened, measured) = (Arc::clone(&opened), Arc::clone(&measured));
        let port = server.port;
        workers.spawn(async move {
            let (mut clients, mut errors) = open(port, share).await;
            errors += echo(&mut clients, worker).await;
            opened.wait().await;
            measured.wait().await;
            errors + close(clients).await
        });
    }
    opened.wait().await;
    let open_time = started.elapsed();
    let rss_open = server.rss();
    measured.wait().await;
    let mut errors = 0;
    while let Some(result) = workers.join_next().await {
        errors += result.unwrap_or(share);
    }
    let total = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    Round {
        open: open_time,
        total,
        rss_open,
        rss_after: server.rss(),
        errors,
    }
}

/// Raises the soft open-files limit to the hard one; the server, started after this,
/// inherits it. 10,000 connections need 10,000 descriptors on each side.
fn raise_file_limit() -> Result<u64, String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| e.to_string())?;
    Ok(hard)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("soak: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the soak; `Ok(true)` when RSS returned to its baseline.
fn run(args: &Args) -> Result<bool, String> {
    let files = raise_file_limit()?;
    if files < (CONNECTIONS + 1000) as u64 {
        return Err(format!(
            "the open-files limit is {files}; {CONNECTIONS} connections need more"
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let server = Server::start(&args.server_env)?;
    let started_rss = server.rss();
    println!(
        "soak: {CONNECTIONS} WebSockets per round, {MESSAGES} echoes each, {WORKERS} client tasks; \
         for {}; server environment: {}; open files {files}",
        humantime::format_duration(args.duration),
        if args.server_env.is_empty() {
            "as inherited".to_owned()
        } else {
            args.server_env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(" ")
        },
    );
    println!("server RSS at start: {:.1} MiB", mib(started_rss));
    println!();
    println!(
        "{:>5}  {:>8}  {:>8}  {:>14}  {:>14}  {:>9}  {:>6}",
        "round", "open s", "round s", "RSS open MiB", "RSS after MiB", "vs base", "errors"
    );
    let deadline = Instant::now() + args.duration;
    let mut baseline = None;
    let mut history = Vec::new();
    let mut last = 0;
    let mut number = 0;
    let mut errors = 0;
    while baseline.is_none() || Instant::now() < deadline {
        let result = runtime
            .block_on(async { tokio::time::timeout(ROUND_LIMIT, round(&server)).await })
            .map_err(|_| format!("round {number} took over {ROUND_LIMIT:?}"))?;
        let base = *baseline.get_or_insert(result.rss_after);
        let versus = (result.rss_after as f64 / base as f64 - 1.0) * 100.0;
        println!(
            "{:>5}  {:>8.2}  {:>8.2}  {:>14.1}  {:>14.1}  {:>+8.1}%  {:>6}{}",
            number,
            result.open.as_secs_f64(),
            result.total.as_secs_f64(),
            mib(result.rss_open),
            mib(result.rss_after),
            versus,
            result.errors,
            if number == 0 {
                "  (warm-up: baseline)"
            } else {
                ""
            },
        );
        errors += result.errors;
        last = result.rss_after;
        history.push(last);
        number += 1;
    }
    let base = baseline.expect("invariant: the warm-up round ran");
    let returned = last as f64 <= base as f64 * (1.0 + TOLERANCE);
    println!();
    println!(
        "baseline {:.1} MiB, final {:.1} MiB ({:+.1}%), {} rounds, {} errors",
        mib(base),
        mib(last),
        (last as f64 / base as f64 - 1.0) * 100.0,
        number,
        errors
    );
    // A leak grows with the connections served; memory the allocator keeps does not.
    // The slope over the second half of the rounds tells the two apart.
    let half = &history[history.len() / 2..];
    if half.len() >= 2 {
        let rounds = (half.len() - 1) as f64;
        let growth = half[half.len() - 1] as f64 - half[0] as f64;
        println!(
            "second half of the rounds: RSS {:+.1} MiB over {} rounds = {:+.1} bytes per connection served",
            growth / (1024.0 * 1024.0),
            half.len() - 1,
            growth / (rounds * CONNECTIONS as f64),
        );
    }
    if returned {
        println!("verdict: RSS returned to within 10% of its baseline: no leak");
    } else {
        println!("verdict: RSS did NOT return to within 10% of its baseline");
    }
    Ok(returned && errors == 0)
}
