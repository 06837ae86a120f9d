//! `cargo bench --bench echo_load`: ws_echo against the tutorial's axum echo server, both
//! measured in the same run under the same conditions, reported side by side with the
//! ratio ws_echo/baseline for every figure.
//!
//! Each server runs as its own process pinned to CPU 0 (`taskset -c 0`); the load
//! generator, this process, pins itself to CPU 1 and drives closed-loop WebSocket clients
//! from one current-thread runtime. For every workload both servers are started fresh
//! and measured in alternating rounds (ws_echo first in even rounds, the baseline first
//! in odd ones), so drift on this shared machine falls on both. `--quick` is the short
//! mode CI runs so the bench cannot rot; it asserts nothing about speed. See
//! benches/README.md for the machine, the method and the latest figures.

// A benchmark's report is what it prints.
#![allow(clippy::print_stdout)]

// The modules live in benches/echo_load/ so that Cargo does not take each for a bench.
#[path = "echo_load/baseline.rs"]
mod baseline;
#[path = "echo_load/callgrind.rs"]
mod callgrind;
#[path = "echo_load/ceiling.rs"]
mod ceiling;
#[path = "echo_load/fastwebsockets_example.rs"]
mod fastwebsockets_example;
#[path = "echo_load/load.rs"]
mod load;
#[path = "echo_load/procfs.rs"]
mod procfs;
#[path = "echo_load/raw.rs"]
mod raw;
#[path = "echo_load/report.rs"]
mod report;
#[path = "echo_load/servers.rs"]
mod servers;

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use load::{ClientLib, Control, EchoSpec, Error, Payload, Sends, Tally};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::resource::{Resource, getrlimit, setrlimit},
    unistd::Pid,
};
use report::{EchoFigures, IdlePoint, Outcome, Results};
use servers::{Kind, Server};
use tokio::{task::JoinSet, time::timeout};

/// The CPU the generator pins itself to; the servers share the other one.
const GENERATOR_CPU: usize = 1;

/// Time given to a fresh server before its starting RSS is read.
const SETTLE: Duration = Duration::from_millis(300);

/// Time given to idle connections before the server's RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

/// Longest the in-flight echoes of a stopped round may take to come back.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Handshakes in flight at once while connections are opened.
const PARALLEL_HANDSHAKES: usize = 128;

const USAGE: &str = "\
usage: cargo bench --bench echo_load -- [OPTIONS] [WORKLOAD...]

Runs every workload (W1 W1p W2 W3 W4 W5) or the ones named, against ws_echo and the
tutorial baseline, and prints both servers' figures with the ratio ws_echo/baseline.

options:
  --quick              one short round per server, W4 at 10,000 only (CI; under a minute)
  --callgrind          instructions per echo under valgrind instead (W1 W1p by default)
  --against SERVER     baseline (default): the tutorial's handler; fastwebsockets: that
                       crate's echo example; ceiling: a minimal echo that checks
                       nothing, the floor the kernel sets (targets only for baseline)
  --client LIB         raw (default) or tungstenite: the generator's WebSocket client
                       (tungstenite cannot offer permessage-deflate, which W5 needs)
  --send-each          write every message as it is sent, as a browser does, instead of
                       coalescing a connection's sends into one write per wake-up
  --ws-echo-arg ARG    pass ARG to ws_echo (repeatable), e.g. --ws-echo-arg=--no-compression

environment:
  ECHO_LOAD_WRAP       words put before each server's command, e.g. \"valgrind --tool=massif\"";

/// The command line, after the hidden baseline mode has been ruled out.
#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) quick: bool,
    pub(crate) callgrind: bool,
    /// The server ws_echo is compared with.
    pub(crate) against: Kind,
    pub(crate) client: ClientLib,
    /// How the generator's connections write what they send.
    pub(crate) sends: Sends,
    pub(crate) ws_echo_args: Vec<String>,
    pub(crate) names: Vec<String>,
}

impl Args {
    fn parse(raw: &[String]) -> Result<Self, String> {
        let mut args = Self {
            quick: false,
            callgrind: false,
            against: Kind::Baseline,
            client: ClientLib::Raw,
            sends: Sends::Coalesced,
            ws_echo_args: Vec::new(),
            names: Vec::new(),
        };
        let mut raw = raw.iter();
        while let Some(arg) = raw.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| raw.next().cloned())
                    .ok_or(format!("{flag} needs a value"))
            };
            match flag {
                // `cargo bench` passes --bench to every bench target.
                "--bench" => {}
                "--quick" => args.quick = true,
                "--callgrind" => args.callgrind = true,
                "--send-each" => args.sends = Sends::Each,
                "--against" => {
                    args.against = match value()?.as_str() {
                        "baseline" => Kind::Baseline,
                        "ceiling" => Kind::Ceiling,
                        "fastwebsockets" => Kind::FastWebSockets,
                        other => return Err(format!("unknown server {other:?}")),
                    }
                }
                "--client" => {
                    args.client = match value()?.as_str() {
                        "raw" => ClientLib::Raw,
                        "tungstenite" | "tokio-tungstenite" => ClientLib::Tungstenite,
                        other => return Err(format!("unknown client library {other:?}")),
                    }
                }
                "--ws-echo-arg" => args.ws_echo_args.push(value()?),
                "-h" | "--help" => return Err(String::new()),
                flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
                name if WORKLOADS.iter().any(|w| w.name == name) => args.names.push(name.into()),
                name => return Err(format!("unknown workload {name:?}")),
            }
        }
        Ok(args)
    }
}

/// What a workload does.
#[derive(Debug)]
pub(crate) enum Shape {
    /// A closed-loop echo load.
    Echo(EchoSpec),
    /// Idle connections, opened up to each count in turn.
    Idle {
        full: &'static [usize],
        quick: &'static [usize],
    },
}

/// One named workload of the issue.
#[derive(Debug)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    about: &'static str,
    shape: Shape,
}

impl Workload {
    pub(crate) fn echo_spec(&self) -> Option<EchoSpec> {
        match self.shape {
            Shape::Echo(spec) => Some(spec),
            Shape::Idle { .. } => None,
        }
    }
}

const fn echo(connections: usize, size: usize, depth: usize, payload: Payload) -> Shape {
    Shape::Echo(EchoSpec {
        connections,
        size,
        depth,
        payload,
        compression: matches!(payload, Payload::Json),
    })
}

/// The workloads of the issue, in the order they run.
const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "W1",
        about: "100 connections, 20-byte text, 1 in flight each",
        shape: echo(100, 20, 1, Payload::Text),
    },
    Workload {
        name: "W1p",
        about: "100 connections, 20-byte text, 16 in flight each",
        shape: echo(100, 20, 16, Payload::Text),
    },
    Workload {
        name: "W2",
        about: "100 connections, 16 KiB binary (ASCII bytes), 1 in flight each",
        shape: echo(100, 16 * 1024, 1, Payload::Binary),
    },
    Workload {
        name: "W3",
        about: "10 connections, 1 MiB binary (ASCII bytes), 1 in flight each",
        shape: echo(10, 1024 * 1024, 1, Payload::Binary),
    },
    Workload {
        name: "W4",
        about: "idle connections: server RSS per connection",
        shape: Shape::Idle {
            full: &[10_000, 19_000],
            quick: &[10_000],
        },
    },
    Workload {
        name: "W5",
        about: "100 connections, 16 KiB JSON text, permessage-deflate offered, 1 in flight",
        shape: echo(100, 16 * 1024, 1, Payload::Json),
    },
];

/// How long each server is measured per workload.
#[derive(Debug, Clone, Copy)]
struct Timing {
    rounds: usize,
    warmup: Duration,
    measure: Duration,
}

const FULL: Timing = Timing {
    rounds: 3,
    warmup: Duration::from_millis(500),
    measure: Duration::from_secs(2),
};

const QUICK: Timing = Timing {
    rounds: 1,
    warmup: Duration::from_millis(200),
    measure: Duration::from_secs(1),
};

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    match raw.first().map(String::as_str) {
        Some(baseline::ARG) => return baseline::main(),
        Some(ceiling::ARG) => return ceiling::main(),
        Some(fastwebsockets_example::ARG) => return fastwebsockets_example::main(),
        _ => {}
    }
    let args = match Args::parse(&raw) {
        Ok(args) => args,
        Err(message) if message.is_empty() => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists, so every thread of the generator inherits both.
    let pinned = pin_generator();
    let nofile = raise_nofile();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the generator's runtime starts");
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| {
            if args.names.is_empty() {
                !args.callgrind || matches!(w.name, "W1" | "W1p")
            } else {
                args.names.iter().any(|name| name == w.name)
            }
        })
        .collect();
    print_header(&args, pinned, nofile);
    let result = runtime.block_on(async {
        if args.callgrind {
            callgrind::run(&args, nofile, &workloads).await
        } else {
            run(&args, nofile, &workloads).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("echo_load: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Pins this process to [`GENERATOR_CPU`]; `false` (with a warning) where it cannot.
fn pin_generator() -> bool {
    let mut cpus = CpuSet::new();
    let pinned = cpus
        .set(GENERATOR_CPU)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &cpus));
    if let Err(error) = &pinned {
        eprintln!("echo_load: could not pin the generator to CPU {GENERATOR_CPU}: {error}");
    }
    pinned.is_ok()
}

/// Raises the soft open-file limit to the hard one and returns it: W4 holds up to
/// 19,000 connections, and the machine allows 20,000 files per process.
fn raise_nofile() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    }
}

fn print_header(args: &Args, pinned: bool, nofile: u64) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "echo_load{}: ws_echo vs {}",
        if args.quick { " --quick" } else { "" },
        match args.against {
            Kind::Ceiling => "a minimal echo that checks nothing (ceiling)",
            Kind::FastWebSockets => "fastwebsockets 0.10's echo example",
            _ => "the axum 0.8 tutorial echo (baseline)",
        }
    );
    println!(
        "servers: `prlimit --nofile={nofile}:{nofile} taskset -c {}`, each with its default runtime on one CPU (ws_echo: current-thread; tokio::main: multi-thread, one worker)",
        servers::SERVER_CPU
    );
    println!(
        "generator: {} client, current-thread runtime, {}; {cpu}",
        args.client.name(),
        if pinned {
            format!("pinned to CPU {GENERATOR_CPU}")
        } else {
            format!("NOT pinned ({cores} CPUs allowed)")
        },
    );
    if args.sends == Sends::Each {
        println!("generator sends: each message written on its own (--send-each)");
    }
    if !args.ws_echo_args.is_empty() {
        println!("ws_echo arguments: {}", args.ws_echo_args.join(" "));
    }
}

/// Runs the workloads and prints their tables and the targets.
async fn run(args: &Args, nofile: u64, workloads: &[&Workload]) -> Result<(), Error> {
    let timing = if args.quick { QUICK } else { FULL };
    let ticks = procfs::ticks_per_second();
    let started = Instant::now();
    let mut results = Results::new();
    for workload in workloads {
        match &workload.shape {
            Shape::Echo(spec) => {
                println!(
                    "\n{}  {}  ({} x {:?} per server)",
                    workload.name, workload.about, timing.rounds, timing.measure
                );
                let figures = run_echo(spec, timing, args, nofile).await?;
                report::print_echo(&figures, args.against, ticks);
                results.insert(workload.name, Outcome::Echo(Box::new(figures)));
            }
            Shape::Idle { full, quick } => {
                println!("\n{}  {}", workload.name, workload.about);
                let counts = if args.quick { quick } else { full };
                let points = run_idle(counts, args, nofile).await?;
                report::print_idle(&points, args.against);
                results.insert(workload.name, Outcome::Idle(points));
            }
        }
    }
    if args.against == Kind::Baseline {
        report::print_targets(&results, ticks);
    }
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Starts both servers fresh and measures them in alternating rounds.
async fn run_echo(
    spec: &EchoSpec,
    timing: Timing,
    args: &Args,
    nofile: u64,
) -> Result<[EchoFigures; 2], Error> {
    let servers = [
        Server::start(Kind::WsEcho, nofile, &args.ws_echo_args, None)?,
        Server::start(args.against, nofile, &args.ws_echo_args, None)?,
    ];
    tokio::time::sleep(SETTLE).await;
    let mut figures = [
        EchoFigures::new(spec.connections, servers[0].rss_kib()?),
        EchoFigures::new(spec.connections, servers[1].rss_kib()?),
    ];
    for round in 0..timing.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let figures = &mut figures[i];
            echo_round(&servers[i], spec, timing, args, figures).await?;
        }
    }
    Ok(figures)
}

/// One round against one server: connect, warm up, measure, drain, disconnect.
async fn echo_round(
    server: &Server,
    spec: &EchoSpec,
    timing: Timing,
    args: &Args,
    figures: &mut EchoFigures,
) -> Result<(), Error> {
    let name = server.kind.name();
    let (clients, errors) = load::connect_many(
        server.addr,
        args.client,
        spec,
        spec.connections,
        PARALLEL_HANDSHAKES,
    )
    .await;
    if let Some(error) = errors.first() {
        return Err(format!(
            "{name}: {} of {} handshakes failed; first: {error}",
            errors.len(),
            spec.connections
        ));
    }
    let control = Arc::new(Control::default());
    let mut tasks = JoinSet::new();
    for client in clients {
        tasks.spawn(load::drive(
            client,
            spec.depth,
            None,
            Arc::clone(&control),
            args.sends,
        ));
    }
    tokio::time::sleep(timing.warmup).await;

    // Everything runs on this one thread, so no connection records between these reads
    // and the switch of the phase.
    let server_before = server.cpu_ticks()?;
    let generator_before = procfs::own_cpu_ticks().map_err(|error| error.to_string())?;
    let busy_before = procfs::busy_ticks_per_cpu().map_err(|error| error.to_string())?;
    let started = Instant::now();
    control.measure();
    tokio::time::sleep(timing.measure).await;
    control.stop();
    let elapsed = started.elapsed();
    let server_ticks = server.cpu_ticks()?.since(server_before);
    let generator_ticks = procfs::own_cpu_ticks()
        .map_err(|error| error.to_string())?
        .since(generator_before);
    let busy_after = procfs::busy_ticks_per_cpu().map_err(|error| error.to_string())?;
    let rss = server.rss_kib()?;

    let mut tally = Tally::new();
    timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            tally.add(&joined.map_err(|error| format!("{name}: {error}"))??);
        }
        Ok::<_, Error>(())
    })
    .await
    .map_err(|_| format!("{name}: echoes still missing {DRAIN_TIMEOUT:?} after the round"))?
    .map_err(|error| format!("{name}: {error}"))?;

    let busy = |cpu: usize| {
        busy_after
            .get(cpu)
            .zip(busy_before.get(cpu))
            .map_or(0, |(after, before)| after - before)
    };
    figures.tally.add(&tally);
    figures.elapsed += elapsed;
    figures.server_ticks.add(server_ticks);
    figures.generator_ticks.add(generator_ticks);
    figures.others_ticks[0] += busy(servers::SERVER_CPU).saturating_sub(server_ticks.total());
    figures.others_ticks[1] += busy(GENERATOR_CPU).saturating_sub(generator_ticks.total());
    figures.rss_peak_kib = figures.rss_peak_kib.max(rss);
    Ok(())
}

/// Opens idle connections up to each count on a fresh server of each kind and reads its
/// RSS; connections stay open from one count to the next.
async fn run_idle(
    counts: &[usize],
    args: &Args,
    nofile: u64,
) -> Result<[Vec<IdlePoint>; 2], Error> {
    // Idle clients never send; the spec only shapes the handshake.
    let spec = EchoSpec {
        connections: 0,
        size: 1,
        depth: 0,
        payload: Payload::Text,
        compression: false,
    };
    let mut points: [Vec<IdlePoint>; 2] = Default::default();
    for (i, kind) in [Kind::WsEcho, args.against].into_iter().enumerate() {
        let server = Server::start(kind, nofile, &args.ws_echo_args, None)?;
        tokio::time::sleep(SETTLE).await;
        let rss_before_kib = server.rss_kib()?;
        let mut held = Vec::new();
        for &count in counts {
            let (clients, errors) = load::connect_many(
                server.addr,
                args.client,
                &spec,
                count.saturating_sub(held.len()),
                PARALLEL_HANDSHAKES,
            )
            .await;
            held.extend(clients);
            tokio::time::sleep(IDLE_SETTLE).await;
            points[i].push(IdlePoint {
                requested: count,
                reached: held.len(),
                rss_before_kib,
                rss_kib: server.rss_kib()?,
                first_error: errors.into_iter().next(),
            });
        }
        // Clients first, so the server sees ordinary closes; then the server.
        drop(held);
        drop(server);
    }
    Ok(points)
}
