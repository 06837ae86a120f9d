//! The figures of a run and the tables that print them: each figure for both servers and
//! the ratio ws_echo/baseline, measured in the same run, then the targets from the
//! issue. Targets are reported, never asserted: the machine is shared and noisy.

use std::{collections::BTreeMap, time::Duration};

use crate::{load::Tally, procfs::CpuTicks, servers::Kind};

/// One server's figures for one echo workload, summed over its rounds.
#[derive(Debug, Clone)]
pub(crate) struct EchoFigures {
    pub(crate) tally: Tally,
    /// Time inside the measured windows.
    pub(crate) elapsed: Duration,
    /// Server CPU inside the measured windows.
    pub(crate) server_ticks: CpuTicks,
    /// Generator CPU inside the same windows.
    pub(crate) generator_ticks: CpuTicks,
    /// Busy time of CPU 0 and CPU 1 that was neither the server's nor the generator's:
    /// other processes on this shared machine, in clock ticks.
    pub(crate) others_ticks: [u64; 2],
    /// The server's RSS before its first connection, in KiB.
    pub(crate) rss_start_kib: u64,
    /// Its highest RSS at the end of a measured window, in KiB.
    pub(crate) rss_peak_kib: u64,
    pub(crate) connections: usize,
}

impl EchoFigures {
    pub(crate) fn new(connections: usize, rss_start_kib: u64) -> Self {
        Self {
            tally: Tally::new(),
            elapsed: Duration::ZERO,
            server_ticks: CpuTicks::default(),
            generator_ticks: CpuTicks::default(),
            others_ticks: [0; 2],
            rss_start_kib,
            rss_peak_kib: rss_start_kib,
            connections,
        }
    }

    fn seconds(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    fn messages_per_second(&self) -> f64 {
        self.tally.messages as f64 / self.seconds()
    }

    fn megabytes_per_second(&self) -> f64 {
        self.tally.bytes as f64 / self.seconds() / 1e6
    }

    fn latency_us(&self, quantile: f64) -> f64 {
        self.tally.latency.value_at_quantile(quantile) as f64 / 1e3
    }

    fn us_per_message(&self, ticks: u64, ticks_per_second: u64) -> f64 {
        ticks as f64 * 1e6 / ticks_per_second as f64 / self.tally.messages as f64
    }

    fn percent(&self, ticks: u64, ticks_per_second: u64) -> f64 {
        ticks as f64 * 100.0 / ticks_per_second as f64 / self.seconds()
    }

    fn server_cpu_us_per_message(&self, ticks_per_second: u64) -> f64 {
        self.us_per_message(self.server_ticks.total(), ticks_per_second)
    }

    fn rss_mib(&self) -> f64 {
        self.rss_peak_kib as f64 / 1024.0
    }

    fn rss_kib_per_connection(&self) -> f64 {
        self.rss_peak_kib.saturating_sub(self.rss_start_kib) as f64 / self.connections as f64
    }
}

/// One server's resident memory with a number of idle connections open.
#[derive(Debug, Clone)]
pub(crate) struct IdlePoint {
    pub(crate) requested: usize,
    pub(crate) reached: usize,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_kib: u64,
    /// The first failed handshake, if any.
    pub(crate) first_error: Option<String>,
}

impl IdlePoint {
    fn kib_per_connection(&self) -> f64 {
        self.rss_kib.saturating_sub(self.rss_before_kib) as f64 / self.reached.max(1) as f64
    }
}

/// What one workload measured, for both servers: index 0 is ws_echo, 1 the baseline.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Echo(Box<[EchoFigures; 2]>),
    Idle([Vec<IdlePoint>; 2]),
}

/// Every workload's outcome, by name.
pub(crate) type Results = BTreeMap<&'static str, Outcome>;

/// A figure of both servers, to print with its ratio.
struct Row {
    label: String,
    ws_echo: f64,
    /// The same figure for the server ws_echo is compared with.
    other: f64,
}

fn print_rows(rows: &[Row], other: Kind) {
    println!(
        "  {:<26} {:>12} {:>12} {:>10}",
        "",
        "ws_echo",
        other.name(),
        "ratio"
    );
    for row in rows {
        let ratio = if row.other == 0.0 {
            "-".to_owned()
        } else {
            format!("{:.2}", row.ws_echo / row.other)
        };
        println!(
            "  {:<26} {:>12} {:>12} {:>10}",
            row.label,
            number(row.ws_echo),
            number(row.other),
            ratio
        );
    }
}

/// Three significant figures or more, no exponent.
fn number(value: f64) -> String {
    if !value.is_finite() {
        "-".to_owned()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Prints one echo workload's table.
pub(crate) fn print_echo(figures: &[EchoFigures; 2], other: Kind, ticks_per_second: u64) {
    let [ws, base] = figures;
    let row = |label: &str, f: &dyn Fn(&EchoFigures) -> f64| Row {
        label: label.to_owned(),
        ws_echo: f(ws),
        other: f(base),
    };
    let tck = ticks_per_second;
    print_rows(
        &[
            row("messages/s", &EchoFigures::messages_per_second),
            row(
                "MB/s (payload, one way)",
                &EchoFigures::megabytes_per_second,
            ),
            row("latency p50 µs", &|f| f.latency_us(0.5)),
            row("latency p99 µs", &|f| f.latency_us(0.99)),
            row("latency p99.9 µs", &|f| f.latency_us(0.999)),
            row("server CPU µs/message", &|f| {
                f.server_cpu_us_per_message(tck)
            }),
            row("  of which kernel (sys)", &|f| {
                f.us_per_message(f.server_ticks.system, tck)
            }),
            row("server CPU %", &|f| f.percent(f.server_ticks.total(), tck)),
            row("server RSS MiB", &EchoFigures::rss_mib),
            row(
                "server RSS KiB/connection",
                &EchoFigures::rss_kib_per_connection,
            ),
            row("generator CPU µs/message", &|f| {
                f.us_per_message(f.generator_ticks.total(), tck)
            }),
            row("generator CPU %", &|f| {
                f.percent(f.generator_ticks.total(), tck)
            }),
            row("others' load CPU 0 %", &|f| {
                f.percent(f.others_ticks[0], tck)
            }),
            row("others' load CPU 1 %", &|f| {
                f.percent(f.others_ticks[1], tck)
            }),
            row("messages measured", &|f| f.tally.messages as f64),
        ],
        other,
    );
}

/// Prints the idle-connection table.
pub(crate) fn print_idle(points: &[Vec<IdlePoint>; 2], other: Kind) {
    let [ws, base] = points;
    let mut rows = Vec::new();
    for (ws, base) in ws.iter().zip(base) {
        let n = ws.requested;
        rows.push(Row {
            label: format!("connections open (of {n})"),
            ws_echo: ws.reached as f64,
            other: base.reached as f64,
        });
        rows.push(Row {
            label: format!("server RSS MiB @{n}"),
            ws_echo: ws.rss_kib as f64 / 1024.0,
            other: base.rss_kib as f64 / 1024.0,
        });
        rows.push(Row {
            label: format!("RSS KiB/idle conn @{n}"),
            ws_echo: ws.kib_per_connection(),
            other: base.kib_per_connection(),
        });
    }
    print_rows(&rows, other);
    for (name, side) in [("ws_echo", ws), (other.name(), base)] {
        for point in side {
            if let Some(error) = &point.first_error {
                println!(
                    "  {name}: {} of {} handshakes failed; first: {error}",
                    point.requested - point.reached,
                    point.requested
                );
            }
        }
    }
}

/// Prints each target of the issue against this run's figures.
pub(crate) fn print_targets(results: &Results, ticks_per_second: u64) {
    let echo = |name: &str| match results.get(name) {
        Some(Outcome::Echo(figures)) => Some(&**figures),
        _ => None,
    };
    let ratio =
        |name: &str, f: &dyn Fn(&EchoFigures) -> f64| echo(name).map(|[ws, base]| f(ws) / f(base));
    let cpu = |f: &EchoFigures| f.server_cpu_us_per_message(ticks_per_second);
    let idle = match results.get("W4") {
        Some(Outcome::Idle([ws, _])) => ws.first().map(IdlePoint::kib_per_connection),
        _ => None,
    };
    let targets: [(&str, Option<f64>, &str, bool); 5] = [
        (
            "W1  server CPU/message, ws_echo/baseline",
            ratio("W1", &cpu),
            "<= 0.6",
            ratio("W1", &cpu).is_some_and(|r| r <= 0.6),
        ),
        (
            "W1p messages/s, ws_echo/baseline",
            ratio("W1p", &EchoFigures::messages_per_second),
            ">= 10",
            ratio("W1p", &EchoFigures::messages_per_second).is_some_and(|r| r >= 10.0),
        ),
        (
            "W2  server CPU/message, ws_echo/baseline",
            ratio("W2", &cpu),
            "<= 0.7",
            ratio("W2", &cpu).is_some_and(|r| r <= 0.7),
        ),
        (
            "W4  ws_echo RSS KiB per idle connection",
            idle,
            "<= 4",
            idle.is_some_and(|kib| kib <= 4.0),
        ),
        (
            "W1  latency p99, ws_echo/baseline",
            ratio("W1", &|f| f.latency_us(0.99)),
            "<= 1.0",
            ratio("W1", &|f| f.latency_us(0.99)).is_some_and(|r| r <= 1.0),
        ),
    ];
    println!("\nTargets (reported, not asserted)");
    for (what, value, target, met) in targets {
        let (value, verdict) = match value {
            Some(value) => (number(value), if met { "met" } else { "MISSED" }),
            None => ("-".to_owned(), "not run"),
        };
        println!("  {what:<42} {value:>8}  target {target:<7} {verdict}");
    }
}
