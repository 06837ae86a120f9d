//! The memory promise under abuse, on the real binary with real sockets: the four
//! attacks of the issue "The memory promise holds under abuse", scaled down (a small
//! budget, short timeouts, hundreds of connections). Each asserts what the README
//! promises: the RSS bound, the closes and their codes, a prompt echo for a polite
//! client, the open gauge, and an answer (503) at the TCP connection cap.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{ServerProcess, assert_echoes, deflate, encode_frame, raw_handshake};

const MIB: u64 = 1 << 20;

/// What each connection may hold outside the budget, and what it costs besides
/// (README "Limits"): the free allowance, one read, the task and its buffers.
const PER_CONNECTION: u64 = 64 * 1024 + 64 * 1024 + 16 * 1024;

/// Allocator fragmentation and thread stacks.
const SLACK: u64 = 48 * MIB;

fn addr(server: &ServerProcess) -> SocketAddr {
    format!("127.0.0.1:{}", server.port)
        .parse()
        .expect("address")
}

/// A client socket with a small receive buffer, so that echoes cannot hide in the
/// kernel, upgraded with `extra` handshake headers.
async fn non_reader(server: &ServerProcess, extra: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(addr(server)).await.expect("connect");
    let (client, head) = raw_handshake(stream, extra).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.stream
}

/// The value of the series `name` (with its labels, as Prometheus prints them), 0 when
/// absent.
async fn metric(server: &ServerProcess, name: &str) -> f64 {
    let mut stream = TcpStream::connect(addr(server)).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("response");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// Samples RSS every 100 ms for `period`; the peak.
async fn peak_rss(server: &ServerProcess, period: Duration) -> u64 {
    let mut peak = server.rss();
    let end = Instant::now() + period;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(server.rss());
    }
    peak
}

/// Waits up to `limit` for `ws_echo_connections_open` to reach `open`; how long it took.
async fn open_gauge_reaches(server: &ServerProcess, open: f64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now = metric(server, "ws_echo_connections_open").await;
        if now == open {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "ws_echo_connections_open is {now}, not {open}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_bounded(what: &str, baseline: u64, peak: u64, budget: u64, clients: u64) {
    let bound = baseline + budget + clients * PER_CONNECTION + SLACK;
    assert_peak_below(what, baseline, peak, bound);
}

/// Asserts that the peak RSS stayed below `bound`, after printing the figures.
fn assert_peak_below(what: &str, baseline: u64, peak: u64, bound: u64) {
    eprintln!(
        "{what}: RSS baseline {} MiB, peak {} MiB, bound {} MiB",
        baseline / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound,
        "{what}: RSS {} MiB exceeds the bound {} MiB",
        peak / MIB,
        bound / MIB
    );
}

/// Attack 1: compressed messages that inflate a thousandfold. Each of 40 clients offers
/// permessage-deflate with `server_max_window_bits=9` and sends 4 MiB messages of one
/// 256-byte block repeated, a few KiB each on the wire, never reading. One read holds a
/// whole message: inflating it unbounded held 4 MiB per client (160 MiB for 40 reads).
/// The budget now counts what messages inflate to, and inflating waits for it like
/// reading does. (Measured: with the inflation room unbounded this test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_uploads_are_charged_as_they_inflate() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 40;
    const BUDGET: u64 = 16 * MIB;
    let server = ServerProcess::start(&[
        "--buffer-budget",
        &BUDGET.to_string(),
        "--max-message-size",
        &(4 * MIB).to_string(),
        "--max-frame-size",
        &(4 * MIB).to_string(),
        "--ping-interval",
        "0s",
    ]);
    let baseline = server.rss();
    let block: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let message: Vec<u8> = block.iter().copied().cycle().take(4 << 20).collect();
    let frame = Arc::new(encode_frame(true, true, 0x2, &deflate(&message), true));
    assert!(
        frame.len() < 256 * 1024,
        "{} bytes on the wire",
        frame.len()
    );
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = non_reader(
            &server,
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n",
        )
        .await;
        let frame = Arc::clone(&frame);
        clients.push(tokio::spawn(async move {
            for _ in 0..4 {
                if stream.write_all(&frame).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
        }));
    }
    let peak = peak_rss(&server, Duration::from_secs(3)).await;
    for client in clients {
        client.abort();
    }
    assert_bounded("inflating uploads", baseline, peak, BUDGET, CLIENTS);
}

/// Attack 2: 200 clients send 1 MiB messages and never read, past a budget of 16 MiB.
/// Most of them wait for the budget with nothing of theirs unsent, yet every one is
/// closed: by the stall timeout (echoes unread, also while waiting for the budget) or
/// the message timeout (a message holding budget while others wait), and memory stays
/// bounded throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_all_closed_even_when_waiting_for_budget() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 200;
    const BUDGET: u64 = 16 * MIB;
    let server = ServerProcess::start(&[
        "--buffer-budget",
        &BUDGET.to_string(),
        "--stall-timeout",
        "2s",
        "--message-timeout",
        "2s",
        "--close-timeout",
        "1s",
        "--ping-interval",
        "0s",
    ]);
    let baseline = server.rss();
    let message = Arc::new(encode_frame(true, false, 0x2, &vec![b'm'; 1 << 20], true));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = non_reader(&server, "").await;
        let message = Arc::clone(&message);
        clients.push(tokio::spawn(async move {
            for _ in 0..4 {
                if stream.write_all(&message).await.is_err() {
                    break;
                }
            }
            // Never read; keep the socket open.
            std::future::pending::<()>().await;
        }));
    }
    let peak = peak_rss(&server, Duration::from_secs(2)).await;
    let took = open_gauge_reaches(&server, 0.0, Duration::from_secs(30)).await;
    let stalled = metric(&server, "ws_echo_limit_drops_total{limit=\"stall\"}").await;
    let timed_out = metric(
        &server,
        "ws_echo_limit_drops_total{limit=\"message_timeout\"}",
    )
    .await;
    eprintln!("all closed {took:?} after the peak: {stalled} stalled, {timed_out} timed out");
    assert_eq!(stalled + timed_out, CLIENTS as f64);
    assert!(metric(&server, "ws_echo_budget_waits_total").await > 0.0);
    for client in clients {
        client.abort();
    }
    assert_bounded("clients that never read", baseline, peak, BUDGET, CLIENTS);
}

/// Sends the first fragment (FIN=0) of a message of `len` bytes, all of its payload
/// that `len` announces, and stays silent. Dropping it resets the connection: a FIN
/// could not reach a server whose receive window the unread bytes have closed (it waits
/// in the client's kernel behind them), a reset does.
async fn hold_a_fragment(server: &ServerProcess, len: usize) -> tokio::task::JoinHandle<()> {
    let mut stream = non_reader(server, "").await;
    // Deprecated because a nonzero linger blocks the thread on drop; zero does not.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    let fragment = encode_frame(false, false, 0x2, &vec![b'h'; len], true);
    tokio::spawn(async move {
        let _ = stream.write_all(&fragment).await;
        // Silent until aborted; dropping the task closes the socket.
        std::future::pending::<()>().await;
    })
}

/// A server with a budget of `budget` bytes, 8 MiB messages, keepalive off and `extra`
/// flags, and 20 clients each holding the first 4 MiB of a message that never ends
/// ([`hold_a_fragment`]).
async fn twenty_holders(
    budget: u64,
    extra: &[&str],
) -> (ServerProcess, Vec<tokio::task::JoinHandle<()>>) {
    let (budget, size) = (budget.to_string(), (8 * MIB).to_string());
    let mut args = vec![
        "--buffer-budget",
        &budget,
        "--max-message-size",
        &size,
        "--max-frame-size",
        &size,
        "--ping-interval",
        "0s",
    ];
    args.extend_from_slice(extra);
    let server = ServerProcess::start(&args);
    let mut holders = Vec::new();
    for _ in 0..20 {
        holders.push(hold_a_fragment(&server, 4 << 20).await);
    }
    (server, holders)
}

/// The attack 3 at full size, with a budget that covers it: 20 clients each
/// send a 16 MiB − 1 fragment at once and hold it. Messages growing side by side hold
/// what they hold, in chunks that are never moved: when each was one growing buffer,
/// every step copied it and left the old buffer resident until the allocator purged
/// it. Measured on the peak (VmHWM) past baseline and messages: 14–21 MiB with one
/// growing buffer, 2–3 MiB in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_growing_side_by_side_leave_no_copies_behind() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 20;
    const MESSAGE: u64 = 16 * MIB - 1;
    let budget = (CLIENTS * (MESSAGE + 1)).to_string();
    let server = ServerProcess::start(&[
        "--buffer-budget",
        &budget,
        "--ping-interval",
        "0s",
        "--message-timeout",
        "0s",
    ]);
    let baseline = server.rss();
    let mut holders = Vec::new();
    for _ in 0..CLIENTS {
        holders.push(hold_a_fragment(&server, MESSAGE as usize).await);
    }
    // Until every message is whole (then held) and a little longer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server, "ws_echo_connections_open").await < CLIENTS as f64
        || server.rss() < baseline + CLIENTS * MESSAGE / 100 * 95
    {
        assert!(
            Instant::now() < deadline,
            "the messages never arrived whole"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = server.peak_rss();
    let held = CLIENTS * MESSAGE;
    assert_peak_below(
        "20 growing 16 MiB messages",
        baseline,
        peak,
        baseline + held + CLIENTS * PER_CONNECTION + 6 * MIB,
    );
    for holder in holders {
        holder.abort();
    }
}

/// Attack 3: 20 clients each hold the first 4 MiB of a message that never ends, past a
/// 64 MiB budget (the 20 × 16 MiB against 256 MiB, scaled by a quarter). Once
/// the budget is spent, a polite client's 1 MiB message is still echoed within 8 s:
/// holders past their share give way at the message timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_fragments_do_not_freeze_other_clients_messages() {
    let _heavy = crate::support::heavy().await;
    let (server, holders) = twenty_holders(
        64 * MIB,
        &["--message-timeout", "1s", "--close-timeout", "1s"],
    )
    .await;
    // The budget is spent: connections wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&server, "ws_echo_budget_waits_total").await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the holders never spent the budget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut polite, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(8),
        assert_echoes(&mut polite, Message::binary(vec![7; 1 << 20])),
    )
    .await
    .expect("the polite client's 1 MiB message is echoed within 8 s");
    eprintln!("polite 1 MiB echo after {:?}", started.elapsed());
    for holder in holders {
        holder.abort();
    }
}

/// Attack 3, second half: clients waiting for the budget read nothing, so when they
/// leave (here by a reset), only the socket can tell. With no timeout to end them
/// (message and stall timeouts and keepalive off), the open gauge still returns to
/// zero within 2 s, and no socket is left in CLOSE-WAIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_while_waiting_for_budget_are_noticed_at_once() {
    let _heavy = crate::support::heavy().await;
    let (server, holders) = twenty_holders(
        16 * MIB,
        &["--message-timeout", "0s", "--stall-timeout", "0s"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        metric(&server, "ws_echo_budget_waits_total").await > 0.0,
        "some of them wait for the budget"
    );
    assert_eq!(metric(&server, "ws_echo_connections_open").await, 20.0);
    for holder in holders {
        holder.abort();
    }
    let took = open_gauge_reaches(&server, 0.0, Duration::from_secs(2)).await;
    eprintln!("gauge at zero {took:?} after the clients left");
    // /proc/net/tcp: local address (hex port after ':') and state (08 is CLOSE-WAIT).
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = format!(":{:04X}", server.port);
    let close_wait = table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1).is_some_and(|local| local.ends_with(&port))
                && fields.get(3) == Some(&"08")
        })
        .count();
    assert_eq!(close_wait, 0, "server sockets left in CLOSE-WAIT");
}

/// Attack 4, first half: an HTTP/2 connection that made one request and then idles is
/// closed after the handshake timeout, as an idle HTTP/1.1 keep-alive connection is.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let server = ServerProcess::start(&["--handshake-timeout", "1s"]);
    let stream = TcpStream::connect(addr(&server)).await.expect("connect");
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://127.0.0.1:{}/healthz", server.port))
        .body(axum::body::Body::empty())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the server closes the idle HTTP/2 connection")
        .expect("connection task")
        .expect("a graceful close (GOAWAY), not an error");
    eprintln!(
        "idle HTTP/2 connection closed after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        metric(&server, "ws_echo_limit_drops_total{limit=\"http_idle\"}").await,
        1.0
    );
}

/// Attack 4, second half: with an open-file limit of 256, 300 idle connections would
/// exhaust the process's descriptors, and then nobody got an answer. The TCP cap (256
/// less 128) keeps descriptors free: past it, a new client gets 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_tcp_cap_a_client_gets_503_not_silence() {
    let _heavy = crate::support::heavy().await;
    let server = {
        let inner = ServerProcess::command(&[], &[]);
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
            .arg(inner.get_program())
            .args(inner.get_args());
        ServerProcess::spawn_command(command)
    };
    assert!(
        server.first_line.contains("\"max_tcp_connections\":128"),
        "{}",
        server.first_line
    );
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr(&server)).await.expect("connect"));
    }
    // The 172 refused above hold the server's refusals in flight (64) for up to a
    // second; past those a refusal is answered in one try and closed, and a request
    // sent after that close is answered with a reset (the cap's last resort, seen
    // once in CI). The client below is answered as any single one is.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut stream = TcpStream::connect(addr(&server)).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("an answer, not silence")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(
        metric_after_freeing(&server, &mut idle).await > 0.0,
        "refusals are counted"
    );
}

/// Frees the idle connections and reads the TCP-cap refusal count.
async fn metric_after_freeing(server: &ServerProcess, idle: &mut Vec<TcpStream>) -> f64 {
    idle.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    metric(
        server,
        "ws_echo_limit_drops_total{limit=\"tcp_connections\"}",
    )
    .await
}

/// Opens `count` WebSockets at `target` whose clients never read, each with a small
/// receive buffer; the test process needs as many descriptors.
async fn non_readers_at(server: &ServerProcess, target: &str, count: u64) -> Vec<TcpStream> {
    ws_echo::raise_open_file_limit().expect("raise the open-file limit");
    let mut clients = Vec::new();
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let stream = socket.connect(addr(server)).await.expect("connect");
        let (client, head) = crate::support::raw_handshake_to(stream, target, "").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        clients.push(client.stream);
    }
    clients
}

/// The `stream` control to 1,000 clients that never read: each stream message is
/// charged to the budget before it is made, so the streams wait for it (and for their
/// clients) instead of each holding a message of its own. Made without the budget,
/// 1,000 messages of 1 MiB would hold a GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_clients_that_never_read_stay_within_the_budget() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 1000;
    const BUDGET: u64 = 32 * MIB;
    let server = ServerProcess::start(&[
        "--buffer-budget",
        &BUDGET.to_string(),
        "--ping-interval",
        "0s",
    ]);
    let baseline = server.rss();
    let clients = non_readers_at(&server, "/ws?stream=64&size=1048576", CLIENTS).await;
    let peak = peak_rss(&server, Duration::from_secs(3)).await;
    assert!(metric(&server, "ws_echo_budget_waits_total").await > 0.0);
    assert_eq!(
        metric(&server, "ws_echo_controls_total{control=\"stream\"}").await,
        CLIENTS as f64
    );
    drop(clients);
    assert_bounded("streams to non-readers", baseline, peak, BUDGET, CLIENTS);
}

/// `delay=30s` on 1,000 connections, each with one 256 KiB message: what the server
/// holds is the echoes themselves (taken from the receive buffer, not copied), plus
/// what any open connection costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_echoes_hold_no_more_than_the_echoes() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 1000;
    const SIZE: u64 = 256 * 1024;
    let server = ServerProcess::start(&["--ping-interval", "0s"]);
    let baseline = server.rss();
    let mut clients = non_readers_at(&server, "/ws?delay=30s", CLIENTS).await;
    let frame = encode_frame(true, false, 0x2, &vec![b'd'; SIZE as usize], true);
    for client in &mut clients {
        client.write_all(&frame).await.expect("send");
    }
    let received = "ws_echo_messages_total{direction=\"in\",type=\"binary\"}";
    let started = Instant::now();
    while metric(&server, received).await < CLIENTS as f64 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "all messages read in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = peak_rss(&server, Duration::from_secs(1)).await;
    // None is echoed yet.
    let sent = "ws_echo_messages_total{direction=\"out\",type=\"binary\"}";
    assert_eq!(
        metric(&server, sent).await,
        CLIENTS as f64,
        "counted when accepted"
    );
    let echoes = CLIENTS * SIZE;
    // The echoes, a quarter more for the allocator, and 32 KiB per connection.
    let bound = baseline + echoes + echoes / 4 + CLIENTS * 32 * 1024 + SLACK;
    assert_peak_below("delayed echoes", baseline, peak, bound);
    drop(clients);
}

/// `fragment=1` on an 8 MiB echo to a client that does not read: encoded at once it
/// would be 24 MiB (a 2-byte header per byte), outside the budget; it is framed as the
/// client reads, so the server holds the message and little more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finely_fragmented_echo_is_framed_as_the_client_reads() {
    let _heavy = crate::support::heavy().await;
    let server = ServerProcess::start(&["--ping-interval", "0s"]);
    let baseline = server.rss();
    let mut clients = non_readers_at(&server, "/ws?fragment=1", 1).await;
    let frame = encode_frame(true, false, 0x2, &vec![b'f'; 8 << 20], true);
    clients[0].write_all(&frame).await.expect("send");
    // Once the upload's reallocations are purged (the allocator's decay is 100 ms),
    // what stays is what the server holds for the client.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = server.rss();
    eprintln!(
        "fragment=1, 8 MiB: RSS baseline {} MiB, then {} MiB",
        baseline / MIB,
        held / MIB
    );
    assert!(held < baseline + 16 * MIB, "RSS {} MiB", held / MIB);
}

/// A read rate whose second ran out while delayed echoes fill the write limit: the
/// server waits, it does not spin (its timer once stayed in the past: a core at 100%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_rate_waiting_behind_held_echoes_does_not_spin() {
    let _heavy = crate::support::heavy().await;
    let server = ServerProcess::start(&["--ping-interval", "0s"]);
    let mut clients = non_readers_at(&server, "/ws?read_rate=5000&delay=10s", 1).await;
    let frame = encode_frame(true, false, 0x2, &[b'r'; 9000], true);
    for _ in 0..3 {
        clients[0].write_all(&frame).await.expect("send");
    }
    // The first echo is whole after two seconds of reading, and holds the write limit.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = server.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = server.cpu_time() - before;
    eprintln!("read rate behind held echoes: {used:?} of CPU in 2 s");
    assert!(
        used < Duration::from_millis(20),
        "the server used {used:?} of CPU in 2 s"
    );
}

/// What h2 holds for an HTTP/2 WebSocket is outside the budget: the DATA it received
/// that the WebSocket has not read (up to the receive windows) and what it queued to
/// send. 300 HTTP/2 WebSockets send 1,000-byte messages and never read their echoes:
/// the server stops reading them, and h2 holds what their windows let in. With 1 MiB
/// windows and a 400 KiB send buffer (hyper's) that was 1.3 MiB per connection, 390
/// MiB here; the 128 KiB windows and 64 KiB send buffer keep it within the
/// per-connection constant the README states for HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_websockets_that_never_read_hold_no_more_than_their_windows() {
    let _heavy = crate::support::heavy().await;
    const CLIENTS: u64 = 300;
    /// README: an HTTP/2 connection's receive window and a stream's send buffer, plus
    /// h2's own state (codec buffers, header tables).
    const HTTP2_EXTRA: u64 = 128 * 1024 + 64 * 1024 + 32 * 1024;
    let server = ServerProcess::start(&["--ping-interval", "0s"]);
    let baseline = server.rss();
    let message = encode_frame(true, false, 0x2, &[b'h'; 1000], true);
    let upload = bytes::Bytes::from(message.repeat(2048));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let tcp = TcpStream::connect(addr(&server)).await.expect("connect");
        // A 16 KiB window the client never reopens: the echoes back up in the server.
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(16 * 1024)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://127.0.0.1:{}/ws", server.port))
            .extension(h2::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13")
            .body(())
            .expect("request");
        let (response, mut send) = client.send_request(request, false).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.status(), 200);
        // h2 sends it as the server's windows allow; the client keeps the rest.
        send.send_data(upload.clone(), false).expect("send data");
        clients.push((client, send, response));
    }
    let peak = peak_rss(&server, Duration::from_secs(3)).await;
    let bound = baseline + CLIENTS * (PER_CONNECTION + HTTP2_EXTRA) + SLACK;
    assert_peak_below("HTTP/2 non-readers", baseline, peak, bound);
    drop(clients);
}
