//! ws_echo behind a real nginx, configured by `deploy/nginx/ws_echo.conf` as shipped:
//! 200 WebSockets spread over two replicas, one replica gets SIGTERM in the middle of
//! every client's sequence, and each client it closes with 1001 reconnects through nginx
//! to the other replica and finishes without losing or reordering a message.
//!
//! This is the rollout of `deploy/README.md` on one machine: both processes are the
//! real binary, and the proxy is the one operators run. Needs `nginx`; without it the
//! test fails when `CI` is set and is skipped, loudly, when it is not (ripgrep's
//! `cmd_exists`, made loud).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
    time::{MissedTickBehavior, sleep, timeout},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

/// WebSocket clients through nginx; nginx needs two connections for each.
const CLIENTS: usize = 200;
/// Messages each client sends, numbered from 1.
const MESSAGES: u32 = 50;
/// Gap between a client's messages: 50 of them take a second, so the SIGTERM below
/// lands in the middle of every sequence.
const SEND_INTERVAL: Duration = Duration::from_millis(20);
/// When the drained replica gets SIGTERM, counted from the first message: about 20
/// messages in.
const TERM_AFTER: Duration = Duration::from_millis(400);
/// `--shutdown-timeout` of both replicas: the deadline the drained one must exit by.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for any single step (a connect, a read, a write, a startup).
const STEP: Duration = Duration::from_secs(10);
/// Upper bound for the whole scenario; it takes a few seconds.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(50);

/// `--instance-name` of the replica that is drained.
const VICTIM: &str = "echo-a";
/// `--instance-name` of the replica that must take its clients.
const SURVIVOR: &str = "echo-b";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_replica_hands_its_clients_to_the_other_through_nginx() {
    let Some(nginx) = nginx_binary() else {
        if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
            panic!(
                "nginx is not installed, and CI is set: this test must run in CI. \
                 Install it (apt-get install -y nginx)."
            );
        }
        // Straight to the process's stderr: the harness captures eprintln! and hides it
        // for a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !! SKIPPED tests/proxy.rs: nginx not found on PATH or in /usr/sbin.\n\
             !! Nothing was tested. Install nginx to run it; under CI it fails.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return;
    };
    timeout(SCENARIO_TIMEOUT, scenario(&nginx))
        .await
        .unwrap_or_else(|_| panic!("the scenario did not finish within {SCENARIO_TIMEOUT:?}"));
}

async fn scenario(nginx_path: &Path) {
    let (mut victim, victim_addr) = start_echo(VICTIM);
    let (mut survivor, survivor_addr) = start_echo(SURVIVOR);
    let nginx = Nginx::start(nginx_path, [victim_addr, survivor_addr]).await;
    let url = format!("ws://127.0.0.1:{}/ws", nginx.port);

    // Every client is connected before any sends, so that all of them are mid-sequence
    // when the SIGTERM arrives.
    let mut connecting = JoinSet::new();
    for id in 0..CLIENTS {
        let url = url.clone();
        connecting.spawn(async move { (id, connect(&url).await) });
    }
    let mut connected = Vec::with_capacity(CLIENTS);
    while let Some(joined) = connecting.join_next().await {
        let (id, result) = joined.expect("connect task");
        let (ws, served_by) = result.unwrap_or_else(|error| panic!("client {id}: {error}"));
        connected.push((id, ws, served_by));
    }
    let mut first_served = BTreeMap::<String, usize>::new();
    for (_, _, served_by) in &connected {
        *first_served.entry(served_by.clone()).or_default() += 1;
    }
    assert_eq!(
        first_served.keys().map(String::as_str).collect::<Vec<_>>(),
        [VICTIM, SURVIVOR],
        "nginx must spread clients over both replicas, got {first_served:?}"
    );

    let mut clients = JoinSet::new();
    for (id, ws, served_by) in connected {
        clients.spawn(run_client(id, url.clone(), ws, served_by));
    }

    sleep(TERM_AFTER).await;
    victim.signal("TERM");
    let terminated = Instant::now();
    let status = victim
        .wait_exit(SHUTDOWN_TIMEOUT + Duration::from_secs(2))
        .await;
    let drain_time = terminated.elapsed();

    let mut outcomes = Vec::with_capacity(CLIENTS);
    while let Some(joined) = clients.join_next().await {
        outcomes.push(
            joined
                .expect("client task")
                .unwrap_or_else(|error| panic!("{error}")),
        );
    }

    // The drained replica exits 0 within its deadline, having closed every WebSocket
    // itself: none was still open when the deadline passed.
    let status =
        status.unwrap_or_else(|| panic!("{VICTIM} still running {drain_time:?} after SIGTERM"));
    assert!(status.success(), "{VICTIM} exited with {status}");
    assert!(
        drain_time <= SHUTDOWN_TIMEOUT + Duration::from_secs(1),
        "{VICTIM} took {drain_time:?} to exit, past its {SHUTDOWN_TIMEOUT:?} deadline"
    );
    assert!(
        victim.log_contains(r#""message":"ws_echo stopped","remaining":0"#),
        "{VICTIM} did not report a complete drain"
    );
    assert!(
        survivor.is_running(),
        "{SURVIVOR} stopped, but only {VICTIM} was signalled"
    );

    let mut moved = 0;
    let mut resent = 0;
    let mut slowest_reconnect = Duration::ZERO;
    for outcome in &outcomes {
        let id = outcome.id;
        if outcome.first == VICTIM {
            // Its replica drained: one Close 1001 mid-sequence, then the survivor.
            assert_eq!(outcome.closes, [1001], "client {id}: close codes");
            let at = outcome.echoed_at_close.expect("a close was recorded");
            assert!(
                0 < at && at < MESSAGES,
                "client {id}: the SIGTERM should land mid-sequence, but it had {at} echoes"
            );
            assert_eq!(
                outcome.second.as_deref(),
                Some(SURVIVOR),
                "client {id}: reconnected to the wrong replica"
            );
            moved += 1;
            resent += outcome.resent;
            slowest_reconnect = slowest_reconnect.max(outcome.reconnect_time);
        } else {
            assert_eq!(outcome.first, SURVIVOR, "client {id}: unknown replica");
            assert!(
                outcome.closes.is_empty() && outcome.second.is_none(),
                "client {id}: was closed ({:?}), though its replica kept running",
                outcome.closes
            );
        }
    }
    assert_eq!(moved, first_served[VICTIM]);
    eprintln!(
        "proxy: {CLIENTS} clients x {MESSAGES} messages through nginx, first served {first_served:?}; \
         {VICTIM} drained in {drain_time:?}; {moved} clients moved to {SURVIVOR}, \
         {resent} unechoed messages resent, slowest reconnect {slowest_reconnect:?}"
    );
    drop(nginx);
}

/// What one client saw, checked by the scenario once all are done.
struct Outcome {
    id: usize,
    /// The replica that served the first connection.
    first: String,
    /// Close codes the server sent before the client finished.
    closes: Vec<u16>,
    /// How many echoes had arrived when the server's Close did.
    echoed_at_close: Option<u32>,
    /// Messages sent on the first connection whose echo had not come, sent again.
    resent: u32,
    /// The replica that served the reconnection, if there was one.
    second: Option<String>,
    /// From the server's Close to the new connection's handshake.
    reconnect_time: Duration,
}

/// Sends `id:1` to `id:MESSAGES`, one every `SEND_INTERVAL`, and checks that the echoes
/// come back in order. When the server closes with 1001, reconnects through the proxy,
/// sends again every message whose echo had not arrived, and goes on.
///
/// Returns `Ok` only when every number from 1 to `MESSAGES` was echoed exactly once,
/// in order: a lost, duplicated or reordered echo is an `Err`.
async fn run_client(id: usize, url: String, mut ws: Ws, first: String) -> Result<Outcome, String> {
    let mut outcome = Outcome {
        id,
        first,
        closes: Vec::new(),
        echoed_at_close: None,
        resent: 0,
        second: None,
        reconnect_time: Duration::ZERO,
    };
    let text = |n: u32| format!("{id}:{n}");
    let mut echoed = 0; // the highest number echoed; all below it were echoed in order
    let mut sent = 0; // the highest number sent
    let mut ticker = tokio::time::interval(SEND_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let close_code = loop {
            tokio::select! {
                frame = timeout(STEP, ws.next()) => match frame {
                    Err(_) => return Err(format!(
                        "client {id}: nothing received for {STEP:?} (echoed {echoed}, sent {sent})"
                    )),
                    Ok(None) => return Err(format!(
                        "client {id}: connection ended without a Close (echoed {echoed}, sent {sent})"
                    )),
                    Ok(Some(Err(error))) => return Err(format!(
                        "client {id}: {error} (echoed {echoed}, sent {sent})"
                    )),
                    Ok(Some(Ok(Message::Text(echo)))) => {
                        let expected = text(echoed + 1);
                        if echo.as_str() != expected {
                            return Err(format!(
                                "client {id}: got echo {echo:?}, expected {expected:?}"
                            ));
                        }
                        echoed += 1;
                        if echoed == MESSAGES {
                            finish(id, &mut ws).await?;
                            return Ok(outcome);
                        }
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        break frame.map_or(1005, |frame| u16::from(frame.code));
                    }
                    // Pings are answered by tungstenite itself.
                    Ok(Some(Ok(_))) => {}
                },
                _ = ticker.tick(), if sent < MESSAGES => {
                    match timeout(STEP, ws.send(Message::text(text(sent + 1)))).await {
                        Ok(Ok(())) => sent += 1,
                        // The connection is closing; the read side says how.
                        Ok(Err(_)) => {}
                        Err(_) => return Err(format!("client {id}: a send took over {STEP:?}")),
                    }
                }
            }
        };
        let closed_at = Instant::now();
        outcome.closes.push(close_code);
        if close_code != 1001 || outcome.second.is_some() {
            return Err(format!(
                "client {id}: closed with {close_code} (closes so far {:?}, echoed {echoed})",
                outcome.closes
            ));
        }
        outcome.echoed_at_close = Some(echoed);
        // Answer the Close and wait for the server to end TCP.
        drain(id, &mut ws).await?;

        let (new_ws, served_by) = connect(&url)
            .await
            .map_err(|error| format!("client {id}: reconnecting: {error}"))?;
        outcome.reconnect_time = closed_at.elapsed();
        outcome.second = Some(served_by);
        ws = new_ws;
        outcome.resent = sent - echoed;
        for n in echoed + 1..=sent {
            timeout(STEP, ws.send(Message::text(text(n))))
                .await
                .map_err(|_| format!("client {id}: a resend took over {STEP:?}"))?
                .map_err(|error| format!("client {id}: resending {n}: {error}"))?;
        }
    }
}

/// Opens a WebSocket to `url` and returns it with the `X-Served-By` of its 101.
async fn connect(url: &str) -> Result<(Ws, String), String> {
    let (ws, response) = timeout(STEP, connect_async(url))
        .await
        .map_err(|_| format!("no handshake within {STEP:?}"))?
        .map_err(|error| format!("handshake failed: {error}"))?;
    let served_by = response
        .headers()
        .get("x-served-by")
        .ok_or("the 101 has no X-Served-By")?
        .to_str()
        .map_err(|error| error.to_string())?
        .to_owned();
    Ok((ws, served_by))
}

/// Closes normally and waits for the server's answer.
async fn finish(id: usize, ws: &mut Ws) -> Result<(), String> {
    timeout(STEP, ws.close(None))
        .await
        .map_err(|_| format!("client {id}: sending Close took over {STEP:?}"))?
        .map_err(|error| format!("client {id}: sending Close: {error}"))?;
    drain(id, ws).await
}

/// Reads until the connection ends: after a Close, that completes the closing handshake.
async fn drain(id: usize, ws: &mut Ws) -> Result<(), String> {
    timeout(STEP, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .map_err(|_| {
            format!("client {id}: the connection did not end within {STEP:?} of the Close")
        })
}

/// Starts the real binary on an ephemeral loopback port and reads the port from its
/// first log line.
fn start_echo(name: &str) -> (Process, SocketAddr) {
    let timeout_arg = format!("{}ms", SHUTDOWN_TIMEOUT.as_millis());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ws_echo"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--log-level", "info", "--instance-name", name])
        .args(["--shutdown-timeout", &timeout_arg])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ws_echo");
    let stdout = child.stdout.take().expect("stdout is piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (first_line, first_line_rx) = mpsc::channel();
    // Keeps reading for as long as the process lives: a full pipe would stall its logging.
    let lines = Arc::clone(&log);
    let reader = std::thread::spawn(move || {
        let mut first_line = Some(first_line);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(first_line) = first_line.take() {
                let _ = first_line.send(line.clone());
            }
            lines.lock().expect("log lock").push(line);
        }
    });
    let process = Process {
        name: name.to_owned(),
        child,
        log,
        reader: Some(reader),
        gentle_stop: false,
    };
    let line = first_line_rx
        .recv_timeout(STEP)
        .unwrap_or_else(|_| panic!("{name} printed no log line within {STEP:?}"));
    (process, listening_addr(name, &line))
}

/// The address in `{"fields":{"message":"ws_echo listening","url":"http://ADDR/",..}}`.
fn listening_addr(name: &str, line: &str) -> SocketAddr {
    const URL: &str = r#""url":"http://"#;
    assert!(
        line.contains(r#""message":"ws_echo listening""#),
        "{name}: the first log line is not the listening line: {line}"
    );
    let start = line.find(URL).expect("the listening line has a url") + URL.len();
    let rest = &line[start..];
    rest[..rest.find('/').expect("the url ends with /")]
        .parse()
        .unwrap_or_else(|error| panic!("{name}: bad address in {line}: {error}"))
}

/// nginx in the foreground, every file it writes inside its own temporary directory.
struct Nginx {
    port: u16,
    /// Dropped first: nginx stops before its directory goes.
    _process: Process,
    _dir: TempDir,
}

impl Nginx {
    /// Writes `deploy/nginx/ws_echo.conf` with `upstreams` and a free loopback port,
    /// starts nginx and waits until it answers through to a replica.
    async fn start(binary: &Path, upstreams: [SocketAddr; 2]) -> Self {
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/nginx/ws_echo.conf"
        ))
        .expect("read deploy/nginx/ws_echo.conf");
        // The port is free when we look; another process could take it before nginx
        // binds, so a failed start is retried on a new one.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = TempDir::new("ws_echo-proxy");
            let port = free_port();
            let site = template
                .replace("@@LISTEN@@", &format!("127.0.0.1:{port}"))
                .replace("@@UPSTREAM_A@@", &upstreams[0].to_string())
                .replace("@@UPSTREAM_B@@", &upstreams[1].to_string());
            assert!(!site.contains("@@"), "a placeholder was left in:\n{site}");
            std::fs::write(dir.path().join("ws_echo.conf"), site).expect("write site");
            std::fs::write(dir.path().join("nginx.conf"), main_conf(dir.path()))
                .expect("write nginx.conf");
            let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr");
            let child = Command::new(binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .arg("-g")
                .arg(format!(
                    "daemon off; pid {};",
                    dir.path().join("nginx.pid").display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start nginx");
            let mut process = Process {
                name: "nginx".into(),
                child,
                log: Arc::default(),
                reader: None,
                // SIGKILL would leave the workers running.
                gentle_stop: true,
            };
            let started = Instant::now();
            while started.elapsed() < STEP {
                if !process.is_running() {
                    break;
                }
                if let Some(head) = http_get(port, "/healthz").await {
                    if head.starts_with("HTTP/1.1 200") {
                        return Self {
                            port,
                            _process: process,
                            _dir: dir,
                        };
                    }
                }
                sleep(Duration::from_millis(50)).await;
            }
            drop(process);
            let read =
                |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
            failures.push(format!(
                "port {port}:\n{}{}",
                read("stderr.log"),
                read("error.log")
            ));
        }
        panic!("nginx did not start:\n{}", failures.join("\n"));
    }
}

/// The main nginx.conf around the site file: logs, pid and temporary files in `dir`.
fn main_conf(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "worker_processes 1;
error_log {dir}/error.log notice;
events {{
    # Two per proxied WebSocket, and reconnections overlap the old ones.
    worker_connections 1024;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/ws_echo.conf;
}}
"
    )
}

/// The response head of `GET path` on the loopback `port`, if one arrives within a
/// second.
async fn http_get(port: u16, path: &str) -> Option<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(String::from_utf8_lossy(&response).into_owned())
    };
    timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// `nginx` on PATH, or Debian's `/usr/sbin/nginx` (root's PATH has it, others' may not).
fn nginx_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// A child process, stopped when dropped whatever the test's outcome.
struct Process {
    name: String,
    child: Child,
    /// Lines the child printed, shown when the test fails.
    log: Arc<Mutex<Vec<String>>>,
    /// The thread that fills `log`; it ends when the child's stdout closes.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Stop with SIGTERM first (nginx's master then stops its workers), rather than
    /// SIGKILL at once.
    gentle_stop: bool,
}

impl Process {
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, if the process exits within `limit`; then `log` holds all it
    /// printed.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if started.elapsed() >= limit {
                return None;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .any(|line| line.contains(needle))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            if self.gentle_stop {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(self.child.id().to_string())
                    .status();
                let started = Instant::now();
                while self.is_running() && started.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log.lock().map(|log| log.clone()).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(20)..];
            eprintln!("--- last lines of {} ---\n{}", self.name, tail.join("\n"));
        }
    }
}

/// A directory under the system's temporary directory, removed when dropped unless the
/// test failed (then its path is printed, for nginx's error.log).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temporary directory");
        // nginx's workers drop root for `nobody` and must reach the files in here.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("open the directory to nginx's workers");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
