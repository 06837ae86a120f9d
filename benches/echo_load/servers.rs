//! The servers under test, each its own process on CPU 0: ws_echo (the release binary
//! Cargo built for this bench), the baseline, and the ceiling (both this bench binary
//! re-executed with a hidden argument). All are started by the same command line shape, so they get
//! the same CPU, the same open-file limit and the same default tokio runtime; a
//! [`Server`] kills its process when dropped, also when the bench panics.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{baseline, ceiling, fastwebsockets_example, load::Error, procfs};

/// The CPU both servers are pinned to; the generator takes the other one.
pub(crate) const SERVER_CPU: usize = 0;

/// How long a server may take to print its address: valgrind starts slowly.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// glibc tunables that keep memset and memcpy on vector loops at every size.
const GLIBC_VECTOR_STRINGS: &str = "glibc.cpu.x86_rep_stosb_threshold=0x7fffffffffffffff:glibc.cpu.x86_rep_movsb_threshold=0x7fffffffffffffff";

/// The environment variable whose words are put before each server's command.
pub(crate) const WRAP_VARIABLE: &str = "ECHO_LOAD_WRAP";

/// How long a dropped server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    WsEcho,
    /// The tutorial's handler: what ws_echo is compared with by default.
    Baseline,
    /// A minimal echo with no checks (`--against ceiling`): the cost floor.
    Ceiling,
    /// fastwebsockets' echo example (`--against fastwebsockets`).
    FastWebSockets,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::WsEcho => "ws_echo",
            Self::Baseline => "baseline",
            Self::Ceiling => "ceiling",
            Self::FastWebSockets => "fastwebsockets",
        }
    }

    /// The hidden argument that runs this server inside the bench binary.
    fn hidden_arg(self) -> Option<&'static str> {
        match self {
            Self::WsEcho => None,
            Self::Baseline => Some(baseline::ARG),
            Self::Ceiling => Some(ceiling::ARG),
            Self::FastWebSockets => Some(fastwebsockets_example::ARG),
        }
    }
}

/// A running server process.
///
/// Created by [`Server::start`]; the bench holds it for one workload. Dropping it sends
/// SIGKILL and reaps the process, so no server outlives the bench.
pub(crate) struct Server {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    child: Child,
    /// The server's own pid: `prlimit`, `taskset` and valgrind all exec in place.
    pid: u32,
}

impl Server {
    /// Starts `kind` on 127.0.0.1:0 pinned to [`SERVER_CPU`] with the soft open-file
    /// limit raised to `nofile`, optionally under callgrind writing to `callgrind_out`,
    /// and waits for its address.
    ///
    /// The command is `prlimit --nofile=N:N taskset -c 0 [valgrind …] SERVER ARGS`.
    /// ws_echo gets `--listen 127.0.0.1:0 --log-format json` plus `ws_echo_args`, and
    /// its first stdout line carries the URL. The baseline's stdout (one `Got message`
    /// line per message) goes to /dev/null as the brief asks, and it reports its address
    /// on stderr.
    pub(crate) fn start(
        kind: Kind,
        nofile: u64,
        ws_echo_args: &[String],
        callgrind_out: Option<&Path>,
    ) -> Result<Self, Error> {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).args([
            "taskset",
            "-c",
            &SERVER_CPU.to_string(),
        ]);
        if let Some(out) = callgrind_out {
            // Callgrind counts every iteration of `rep stosb`/`rep movsb` as one
            // instruction, that is one per byte, while the CPU does them 32 or more bytes
            // per cycle. glibc uses them for large memset/memcpy, so the counts would be
            // ruled by buffer zeroing; its vector loops count close to what they cost.
            command.env("GLIBC_TUNABLES", GLIBC_VECTOR_STRINGS);
            command.args([
                "valgrind",
                "--tool=callgrind",
                "--quiet",
                &format!("--callgrind-out-file={}", out.display()),
            ]);
        }
        // A profiler to run each server under, e.g. "valgrind --tool=massif"; the
        // server must still print its address, which valgrind's tools all let it do.
        if let Ok(wrap) = std::env::var(WRAP_VARIABLE) {
            command.args(wrap.split_whitespace());
        }
        match kind {
            Kind::WsEcho => {
                command
                    .arg(env!("CARGO_BIN_EXE_ws_echo"))
                    .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
                    .args(ws_echo_args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
            }
            Kind::Baseline | Kind::Ceiling | Kind::FastWebSockets => {
                let this = std::env::current_exe().map_err(|error| error.to_string())?;
                command
                    .arg(this)
                    .args(kind.hidden_arg())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
            }
        }
        command.stdin(Stdio::null());
        let mut child = command
            .spawn()
            .map_err(|error| format!("could not start {}: {error}", kind.name()))?;
        let pid = child.id();
        let output: Box<dyn Read + Send> = match kind {
            Kind::WsEcho => Box::new(child.stdout.take().expect("stdout is piped")),
            Kind::Baseline | Kind::Ceiling | Kind::FastWebSockets => {
                Box::new(child.stderr.take().expect("stderr is piped"))
            }
        };
        let (address, found) = mpsc::channel();
        // Reads the address, then keeps draining so the server never blocks on a full
        // pipe (ws_echo logs a line per connection).
        thread::spawn(move || {
            let mut found = Some(address);
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = found.as_ref().and_then(|_| parse_address(kind, &line)) {
                    let _ = found.take().expect("checked above").send(addr);
                }
            }
        });
        let mut server = Self {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            pid,
        };
        server.addr = found.recv_timeout(START_TIMEOUT).map_err(|_| {
            format!(
                "{} printed no address within {START_TIMEOUT:?}",
                kind.name()
            )
        })?;
        Ok(server)
    }

    /// User plus system CPU time of the whole process so far, in clock ticks.
    pub(crate) fn cpu_ticks(&self) -> Result<procfs::CpuTicks, Error> {
        procfs::cpu_ticks(self.pid).map_err(|error| format!("{}: {error}", self.kind.name()))
    }

    /// Resident set size, in KiB.
    pub(crate) fn rss_kib(&self) -> Result<u64, Error> {
        procfs::rss_kib(self.pid).map_err(|error| format!("{}: {error}", self.kind.name()))
    }

    /// Stops the server with SIGTERM and waits up to `limit` for it to exit, so that
    /// callgrind writes its profile (ws_echo drains and exits; the baseline has no
    /// signal handler and is ended by the signal, which valgrind still reports on).
    pub(crate) fn terminate(mut self, limit: Duration) -> Result<ExitStatus, Error> {
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|error| error.to_string())? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not exit after SIGTERM", self.kind.name()));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    /// SIGTERM first, so that ws_echo drains and a profiler wrapped around either server
    /// (`ECHO_LOAD_WRAP`) writes its output; SIGKILL after [`STOP_GRACE`].
    fn drop(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// For a server run inside this bench binary: binds 127.0.0.1:0 and reports the address
/// on stderr after `prefix`, where [`Server::start`] reads it.
pub(crate) async fn listen_and_report(prefix: &str) -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    eprintln!("{prefix}{addr}");
    listener
}

/// The server's address from one line of its output, if the line carries it.
fn parse_address(kind: Kind, line: &str) -> Option<SocketAddr> {
    match kind {
        // {"fields":{"message":"ws_echo listening","url":"http://127.0.0.1:PORT/",…}}
        Kind::WsEcho => {
            let rest = &line[line.find("\"url\":\"http://")? + "\"url\":\"http://".len()..];
            rest[..rest.find('/')?].parse().ok()
        }
        Kind::Baseline => line.strip_prefix(baseline::LISTENING)?.trim().parse().ok(),
        Kind::Ceiling => line.strip_prefix(ceiling::LISTENING)?.trim().parse().ok(),
        Kind::FastWebSockets => line
            .strip_prefix(fastwebsockets_example::LISTENING)?
            .trim()
            .parse()
            .ok(),
    }
}
