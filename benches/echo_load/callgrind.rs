//! `--callgrind`: user-space instructions per echo for both servers, counted by
//! `valgrind --tool=callgrind` over the whole server process.
//!
//! Each server is run twice with the same connections: once echoing a fixed number of
//! messages, once echoing none. The difference, divided by the number of messages,
//! leaves out start-up, handshakes and teardown. Instruction counts do not depend on the
//! machine's load, so this is the figure to compare across runs and commits; the
//! profiles stay on disk for `callgrind_annotate`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{task::JoinSet, time::timeout};

use crate::{
    Args, Workload,
    load::{self, Control, EchoSpec, Error, Tally},
    servers::{Kind, Server},
};

/// Time allowed for one profiled run's echoes: callgrind runs the server ~50x slower.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Parallel handshakes: few, because a server under callgrind accepts slowly.
const PARALLEL_HANDSHAKES: usize = 8;

/// Profiles each selected workload on both servers and prints instructions per echo.
pub(crate) async fn run(args: &Args, nofile: u64, workloads: &[&Workload]) -> Result<(), Error> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("callgrind");
    std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    println!(
        "\n{:<5} {:<9} {:>9} {:>16} {:>16} {:>12} {:>8}",
        "", "server", "messages", "Ir (messages)", "Ir (none)", "Ir/echo", "ratio"
    );
    let mut profiles = Vec::new();
    for workload in workloads {
        let Some(spec) = workload.echo_spec() else {
            continue;
        };
        let messages = if args.quick { 2_000 } else { 20_000 };
        let mut per_echo = [0.0; 2];
        for (i, kind) in [Kind::WsEcho, args.against].into_iter().enumerate() {
            let file =
                |count: u64| dir.join(format!("{}.{}.{count}.out", kind.name(), workload.name));
            let with = profile(kind, &spec, messages, &file(messages), args, nofile).await?;
            let without = profile(kind, &spec, 0, &file(0), args, nofile).await?;
            per_echo[i] = with.saturating_sub(without) as f64 / messages as f64;
            let ratio = if i == 1 {
                format!("{:.2}", per_echo[0] / per_echo[1])
            } else {
                String::new()
            };
            println!(
                "{:<5} {:<9} {:>9} {:>16} {:>16} {:>12.0} {:>8}",
                workload.name,
                kind.name(),
                messages,
                with,
                without,
                per_echo[i],
                ratio
            );
            profiles.push(file(messages));
        }
    }
    println!(
        "\nratio = ws_echo/{}. Top functions of a profile:",
        args.against.name()
    );
    for profile in profiles {
        println!("  callgrind_annotate {} | head -40", profile.display());
    }
    Ok(())
}

/// Starts `kind` under callgrind, opens `spec.connections` connections, echoes
/// `messages` in all, closes them, stops the server and returns its instruction total.
async fn profile(
    kind: Kind,
    spec: &EchoSpec,
    messages: u64,
    out: &std::path::Path,
    args: &Args,
    nofile: u64,
) -> Result<u64, Error> {
    let _ = std::fs::remove_file(out);
    let server = Server::start(kind, nofile, &args.ws_echo_args, Some(out))?;
    let (clients, errors) = load::connect_many(
        server.addr,
        args.client,
        spec,
        spec.connections,
        PARALLEL_HANDSHAKES,
    )
    .await;
    if let Some(error) = errors.first() {
        return Err(format!("{} under callgrind: {error}", kind.name()));
    }
    let quota = messages / spec.connections as u64;
    let control = Arc::new(Control::default());
    control.measure();
    let mut tasks = JoinSet::new();
    for client in clients {
        tasks.spawn(load::drive(
            client,
            spec.depth,
            Some(quota),
            Arc::clone(&control),
            args.sends,
        ));
    }
    let mut tally = Tally::new();
    timeout(RUN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            tally.add(&joined.map_err(|error| error.to_string())??);
        }
        Ok::<_, Error>(())
    })
    .await
    .map_err(|_| format!("{} under callgrind took over {RUN_TIMEOUT:?}", kind.name()))??;
    if tally.messages != messages {
        return Err(format!(
            "{}: {} echoes of {messages}",
            kind.name(),
            tally.messages
        ));
    }
    // Let the server see every connection close before it is stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.terminate(Duration::from_secs(60))?;
    let text = std::fs::read_to_string(out)
        .map_err(|error| format!("callgrind wrote no {}: {error}", out.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no instruction total in {}", out.display()))
}
