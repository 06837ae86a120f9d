//! Configuration: [`Config`] is what the user typed (flags and `WS_ECHO_*` variables),
//! and [`Config::into_settings`] checks it and produces the [`Settings`] the server runs
//! with.
//!
//! Every default is a `const` here, so `--help`, the README and the code cannot disagree.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{
    CommandFactory, FromArgMatches, Parser, ValueEnum,
    builder::{BoolishValueParser, TypedValueParser},
};

use crate::{
    DEFAULT_ADDR, Error,
    http::{origin::OriginPattern, tls::TlsSettings},
};

/// Largest message echoed by default: 16 MiB. Autobahn's 9.x cases send messages of up
/// to 16 MiB, and a test server should take them; the global budget below keeps many
/// such messages from exhausting memory.
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Largest single frame accepted by default: the same as a message.
pub(crate) const DEFAULT_MAX_FRAME_SIZE: usize = DEFAULT_MAX_MESSAGE_SIZE;
/// How long open WebSockets get to close after a shutdown signal before they are cut.
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the server's keepalive pings: below the 60 s idle cut of nginx and most
/// ingresses, so a quiet connection through them stays open.
pub(crate) const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// How long a peer has to answer a keepalive ping before it is closed.
pub(crate) const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client has to send its request headers and finish the upgrade.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for the peer's answer to a Close it sent.
pub(crate) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most WebSockets open at once. The test machine allows 20,000 open files per process.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 19_000;
/// Unsent echo bytes per connection past which the server stops reading from it. It is
/// also the size past which the engine gives a grown write buffer back once flushed, so
/// it is what a connection that has echoed something keeps while idle: with 128 KiB, a
/// connection idle after one 16 KiB echo held 22.6 KiB; with 8 KiB, 3.6 KiB. CPU per
/// message was unchanged (echo_load --quick, 2026-11-25: W1p 0.45 -> 0.43 us, W2 8.67
/// -> 8.46 us, W3 449 -> 411 us), since one flush still writes up to 8 KiB at once.
pub(crate) const DEFAULT_WRITE_BUFFER_LIMIT: usize = 8 * 1024;
/// Bytes all connections together may hold past their free allowance (see
/// `ws::driver`) before reading pauses: bounds memory under bulk traffic.
pub(crate) const DEFAULT_BUFFER_BUDGET: usize = 256 * 1024 * 1024;
/// How long an echo may wait for a client that does not read before it is closed.
pub(crate) const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a message that holds budget may go without progress.
pub(crate) const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest delay, jitter or stream interval a test control may ask for.
pub(crate) const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);
/// Most bytes one connection's `stream` control may send.
pub(crate) const DEFAULT_MAX_STREAM_BYTES: u64 = 64 * 1024 * 1024;
/// Deflate level used when compression is negotiated (0–9).
pub(crate) const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Messages smaller than this are sent uncompressed even when deflate is negotiated.
pub(crate) const DEFAULT_COMPRESSION_THRESHOLD: usize = 64;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The command line of `ws_echo`. Each flag can also be set with the environment
/// variable named in its help; a switch's variable takes `1`/`0`, `true`/`false`,
/// `yes`/`no` or `on`/`off` (read with [`Config::from_args_and_env`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "ws_echo", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on. When unset and the `PORT` variable is set (as hosting
    /// platforms do), listens on 0.0.0.0:$PORT. [default: 127.0.0.1:3001]
    #[arg(long, env = "WS_ECHO_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Port set by hosting platforms; used only when --listen is not given.
    #[arg(long, env = "PORT", hide = true)]
    pub port: Option<u16>,

    /// Log level, or a full tracing filter such as `ws_echo=debug`. `RUST_LOG`, when
    /// set, takes precedence.
    #[arg(
        long,
        env = "WS_ECHO_LOG_LEVEL",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "WS_ECHO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest message echoed, in bytes (after inflation, when compressed); larger ones
    /// are closed with 1009.
    #[arg(long, env = "WS_ECHO_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE, value_name = "BYTES")]
    pub max_message_size: usize,

    /// Largest single frame accepted, in bytes; larger ones are closed with 1009. A
    /// compressed frame may be up to 1/8 larger, deflate's worst case for data that does
    /// not compress.
    #[arg(long, env = "WS_ECHO_MAX_FRAME_SIZE", default_value_t = DEFAULT_MAX_FRAME_SIZE, value_name = "BYTES")]
    pub max_frame_size: usize,

    /// Unsent echo bytes per connection past which the server stops reading from that
    /// connection until the client reads.
    #[arg(long, env = "WS_ECHO_WRITE_BUFFER_LIMIT", default_value_t = DEFAULT_WRITE_BUFFER_LIMIT, value_name = "BYTES")]
    pub write_buffer_limit: usize,

    /// Bytes all connections together may buffer before reading pauses (each connection
    /// also holds up to 64 KiB outside this budget). At least the largest message.
    #[arg(long, env = "WS_ECHO_BUFFER_BUDGET", default_value_t = DEFAULT_BUFFER_BUDGET, value_name = "BYTES")]
    pub buffer_budget: usize,

    /// Close (1008) a client that has not read its echoes for this long; 0 never does.
    #[arg(long, env = "WS_ECHO_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub stall_timeout: Duration,

    /// Close (1008) a connection whose message in progress holds budget (is past the
    /// 64 KiB each connection has free) and makes no progress for this long: no bytes
    /// arrive for it, or it holds more than its share while other connections wait for
    /// the budget; one that itself waits for the budget is closed after three times
    /// this. 0 never does.
    #[arg(long, env = "WS_ECHO_MESSAGE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub message_timeout: Duration,

    /// How long open WebSockets get to close after Ctrl-C or SIGTERM.
    #[arg(long, env = "WS_ECHO_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    /// Interval between keepalive pings; 0 turns them off.
    #[arg(long, env = "WS_ECHO_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub ping_interval: Duration,

    /// How long a peer has to answer a keepalive ping before it is closed.
    #[arg(long, env = "WS_ECHO_PING_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub ping_timeout: Duration,

    /// Close a connection that has sent no message for this long; 0 never does.
    #[arg(long, env = "WS_ECHO_IDLE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// How long a client has to send its request headers and finish the upgrade.
    #[arg(long, env = "WS_ECHO_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// How long the server waits for the peer's answer to a Close it sent.
    #[arg(long, env = "WS_ECHO_CLOSE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub close_timeout: Duration,

    /// Most WebSockets open at once; further handshakes get 503 with Retry-After.
    #[arg(long, env = "WS_ECHO_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,

    /// Most WebSockets open at once from one client address (429 past it); 0 is no cap.
    #[arg(
        long,
        env = "WS_ECHO_MAX_CONNECTIONS_PER_IP",
        default_value_t = 0,
        value_name = "N"
    )]
    pub max_connections_per_ip: usize,

    /// Most TCP connections of any kind (HTTP/1.1, HTTP/2, TLS, WebSocket); past it a
    /// new connection gets 503 with Retry-After (closed at once on the TLS port). 0 is
    /// the process's open-file limit less 128, read at start after raising the soft
    /// limit to the hard one.
    #[arg(
        long,
        env = "WS_ECHO_MAX_TCP_CONNECTIONS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub max_tcp_connections: usize,

    /// Accept browser handshakes only from these origins (repeatable; `*` matches any
    /// run of characters except `/`, e.g. `https://*.example.com`). Refused origins get
    /// 403. By default every origin is allowed.
    #[arg(
        long = "allowed-origin",
        env = "WS_ECHO_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,

    /// Turn permessage-deflate (RFC 7692) off: offers are declined.
    #[arg(long, env = "WS_ECHO_NO_COMPRESSION", value_parser = BoolishValueParser::new())]
    pub no_compression: bool,

    /// Deflate level (0–9) when compression is negotiated.
    #[arg(long, env = "WS_ECHO_COMPRESSION_LEVEL", default_value_t = DEFAULT_COMPRESSION_LEVEL, value_name = "LEVEL")]
    pub compression_level: u32,

    /// Messages smaller than this many bytes are sent uncompressed.
    #[arg(long, env = "WS_ECHO_COMPRESSION_THRESHOLD", default_value_t = DEFAULT_COMPRESSION_THRESHOLD, value_name = "BYTES")]
    pub compression_threshold: usize,

    /// Ask every deflate client to compress each message on its own
    /// (client_no_context_takeover): the server then keeps no inflate window between
    /// messages (less memory per connection, a lower ratio for the client). [default:
    /// off, clients keep their context]
    #[arg(long, env = "WS_ECHO_DEFLATE_CLIENT_NO_CONTEXT_TAKEOVER", value_parser = BoolishValueParser::new())]
    pub deflate_client_no_context_takeover: bool,

    /// Limit the deflate window of clients that allow it to 2^N bytes (9-15,
    /// client_max_window_bits): the inflate memory the server keeps for each.
    /// [default: the client's own, 15 for browsers]
    #[arg(long, env = "WS_ECHO_DEFLATE_CLIENT_MAX_WINDOW_BITS", value_name = "N", value_parser = clap::value_parser!(u8).range(9..=15))]
    pub deflate_client_max_window_bits: Option<u8>,

    /// Accept only these subprotocols (repeatable). By default the first one the client
    /// offers is accepted.
    #[arg(
        long = "subprotocol",
        env = "WS_ECHO_SUBPROTOCOLS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub subprotocols: Vec<String>,

    /// Never select a subprotocol.
    #[arg(
        long,
        env = "WS_ECHO_NO_SUBPROTOCOL",
        value_parser = BoolishValueParser::new(),
        conflicts_with = "subprotocols"
    )]
    pub no_subprotocol: bool,

    /// Longest `delay`, `jitter` and stream `interval` a client may ask for in the URL
    /// (test controls, see `GET /controls`).
    #[arg(long, env = "WS_ECHO_MAX_DELAY", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_delay: Duration,

    /// Most bytes one connection's `stream` control may ask for (stream × size).
    #[arg(long, env = "WS_ECHO_MAX_STREAM_BYTES", default_value_t = DEFAULT_MAX_STREAM_BYTES, value_name = "BYTES")]
    pub max_stream_bytes: u64,

    /// Close (1000) every WebSocket this long after its upgrade; 0 never does.
    #[arg(long, env = "WS_ECHO_MAX_CONNECTION_DURATION", default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_connection_duration: Duration,

    /// Plain echo only: test controls in the URL (`?delay=…`, `?close=…`) are ignored.
    #[arg(long, env = "WS_ECHO_NO_CONTROLS", value_parser = BoolishValueParser::new())]
    pub no_controls: bool,

    /// Serve `/metrics` on this address instead of the main one (for example to keep
    /// it off a public port). [default: on the main address]
    #[arg(long, env = "WS_ECHO_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Worker threads of the runtime; 0 uses one per core (on one core, the
    /// current-thread runtime).
    #[arg(
        long,
        env = "WS_ECHO_WORKER_THREADS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub worker_threads: usize,

    /// Run everything on one thread (tokio's current-thread runtime): the least
    /// overhead for one core, no parallelism.
    #[arg(
        long,
        env = "WS_ECHO_CURRENT_THREAD",
        value_parser = BoolishValueParser::new(),
        conflicts_with = "worker_threads"
    )]
    pub current_thread: bool,

    /// Name sent in the `X-Served-By` header of every response, to tell replicas apart
    /// behind a load balancer. [default: the host name]
    #[arg(long, env = "WS_ECHO_INSTANCE_NAME", value_name = "NAME")]
    pub instance_name: Option<String>,

    /// PEM certificate chain (end-entity first). With --tls-key, the port serves only
    /// https:// and wss://. [default: none, plain HTTP]
    #[arg(
        long,
        env = "WS_ECHO_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key",
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). [default: none]
    #[arg(
        long,
        env = "WS_ECHO_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert",
        help_heading = "TLS"
    )]
    pub tls_key: Option<PathBuf>,

    /// Serve TLS with a certificate generated at startup for localhost, 127.0.0.1, ::1
    /// and every --tls-name; its SHA-256 fingerprint is logged. [default: off]
    #[arg(
        long,
        env = "WS_ECHO_TLS_SELF_SIGNED",
        value_parser = BoolishValueParser::new(),
        conflicts_with_all = ["tls_cert", "tls_key"],
        help_heading = "TLS"
    )]
    pub tls_self_signed: bool,

    /// Another host name or IP address for the self-signed certificate (repeatable).
    /// [default: none]
    #[arg(
        long = "tls-name",
        env = "WS_ECHO_TLS_NAMES",
        value_delimiter = ',',
        value_name = "NAME",
        requires = "tls_self_signed",
        help_heading = "TLS"
    )]
    pub tls_names: Vec<String>,

    /// Write the self-signed certificate here as PEM, for clients to trust
    /// (curl --cacert PATH; SSL_CERT_FILE=PATH for websocat). [default: not written]
    #[arg(
        long,
        env = "WS_ECHO_TLS_WRITE_CERT",
        value_name = "PATH",
        requires = "tls_self_signed",
        help_heading = "TLS"
    )]
    pub tls_write_cert: Option<PathBuf>,
}

/// Which subprotocol, if any, the server selects from a client's offer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SubprotocolPolicy {
    /// Select the first protocol offered: an echo server speaks any protocol, and
    /// browsers fail a connection that asked for one and got none.
    #[default]
    AcceptFirst,
    /// Select the first offered protocol that is in this list.
    Only(Vec<String>),
    /// Never select one.
    Never,
}

/// permessage-deflate settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionSettings {
    /// Whether offers are accepted at all.
    pub enabled: bool,
    /// Deflate level, 0–9.
    pub level: u32,
    /// Messages below this size are sent uncompressed.
    pub threshold: usize,
    /// Answer every offer with `client_no_context_takeover`: the client compresses each
    /// message on its own, and the server frees its inflater between messages.
    pub client_no_context_takeover: bool,
    /// Answer offers that allow it with `client_max_window_bits=N` (9–15): the window,
    /// and so the memory, the server's inflater needs for that client.
    pub client_max_window_bits: Option<u8>,
}

impl CompressionSettings {
    /// What the handshake's negotiation needs.
    pub(crate) fn deflate_config(&self) -> crate::ws::deflate::DeflateConfig {
        crate::ws::deflate::DeflateConfig {
            level: self.level,
            threshold: self.threshold,
            client_no_context_takeover: self.client_no_context_takeover,
            client_max_window_bits: self.client_max_window_bits,
        }
    }
}

/// Validated settings the server runs with. Built by [`Config::into_settings`], or by
/// hand from [`Settings::default`] in tests and embedders.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where `main` binds. [`crate::run`] itself serves whatever listener it is given.
    pub addr: SocketAddr,
    /// Largest message echoed, in bytes.
    pub max_message_size: usize,
    /// Largest frame accepted, in bytes.
    pub max_frame_size: usize,
    /// Unsent bytes per connection past which reading from it pauses.
    pub write_buffer_limit: usize,
    /// Bytes all connections may hold past their free allowance.
    pub buffer_budget: usize,
    /// Close a client that has not read for this long; `None` never does.
    pub stall_timeout: Option<Duration>,
    /// Close a message that holds budget without progress for this long; `None` never
    /// does.
    pub message_timeout: Option<Duration>,
    /// Deadline for open WebSockets after shutdown begins.
    pub shutdown_timeout: Duration,
    /// Keepalive ping interval; `None` sends none.
    pub ping_interval: Option<Duration>,
    /// Time a peer has to answer a keepalive ping.
    pub ping_timeout: Duration,
    /// Close connections silent for this long; `None` never does.
    pub idle_timeout: Option<Duration>,
    /// Time allowed for request headers and the upgrade.
    pub handshake_timeout: Duration,
    /// Time allowed for the peer's answer to our Close.
    pub close_timeout: Duration,
    /// Most WebSockets open at once.
    pub max_connections: usize,
    /// Most WebSockets open at once per client address; `None` is no cap.
    pub max_connections_per_ip: Option<usize>,
    /// Most TCP connections of any kind; `None` is the open-file limit less 128.
    pub max_tcp_connections: Option<usize>,
    /// Origins allowed to open a WebSocket; empty allows all.
    pub allowed_origins: Vec<OriginPattern>,
    /// permessage-deflate settings.
    pub compression: CompressionSettings,
    /// Subprotocol selection.
    pub subprotocols: SubprotocolPolicy,
    /// Value of the `X-Served-By` response header.
    pub instance_name: String,
    /// Where `/metrics` is served when not on the main address.
    pub metrics_addr: Option<SocketAddr>,
    /// Whether clients may use test controls.
    pub controls: bool,
    /// Longest delay a control may ask for.
    pub max_delay: Duration,
    /// Most bytes a `stream` control may ask for.
    pub max_stream_bytes: u64,
    /// Every WebSocket is closed this long after its upgrade.
    pub max_connection_duration: Option<Duration>,
    /// TLS for every connection on the port; `None` serves plain HTTP (and h2c).
    pub tls: Option<TlsSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR
                .parse()
                .expect("DEFAULT_ADDR is a valid socket address"),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            write_buffer_limit: DEFAULT_WRITE_BUFFER_LIMIT,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
            message_timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            ping_timeout: DEFAULT_PING_TIMEOUT,
            idle_timeout: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: None,
            max_tcp_connections: None,
            allowed_origins: Vec::new(),
            compression: CompressionSettings {
                enabled: true,
                level: DEFAULT_COMPRESSION_LEVEL,
                threshold: DEFAULT_COMPRESSION_THRESHOLD,
                client_no_context_takeover: false,
                client_max_window_bits: None,
            },
            subprotocols: SubprotocolPolicy::AcceptFirst,
            instance_name: default_instance_name(),
            metrics_addr: None,
            controls: true,
            max_delay: DEFAULT_MAX_DELAY,
            max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
            max_connection_duration: None,
            tls: None,
        }
    }
}

/// The host name (a pod's name in Kubernetes), or `ws_echo` if it is not valid UTF-8.
fn default_instance_name() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "ws_echo".into())
}

/// Turns a zero duration, which users type to mean "off", into `None`.
fn nonzero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

impl Config {
    /// Reads the command line and the `WS_ECHO_*` variables, printing clap's message and
    /// exiting (status 2) when they are invalid: [`Parser::parse`], except that a switch
    /// whose variable says off (`0`, `false`, `no`, `off`) counts as not given.
    ///
    /// clap alone counts any switch set from the environment as given, whatever its
    /// value, so `WS_ECHO_NO_SUBPROTOCOL=0` would still conflict with `--subprotocol`,
    /// and `WS_ECHO_TLS_SELF_SIGNED=false` would still satisfy `--tls-name`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// let settings = ws_echo::Config::from_args_and_env().into_settings()?;
    /// # Ok::<(), ws_echo::Error>(())
    /// ```
    pub fn from_args_and_env() -> Self {
        // A built copy to ask: clap's value errors read fields that building fills in.
        let mut built = Self::command();
        built.build();
        let off: Vec<clap::Id> = built
            .get_arguments()
            .filter(|arg| switched_off_by_environment(&built, arg))
            .map(|arg| arg.get_id().clone())
            .collect();
        let mut command = Self::command();
        for id in off {
            command = command.mut_arg(id, |arg| arg.env(None));
        }
        let matches = command.get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }

    /// Checks the raw configuration and produces the settings the server runs with.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSettings`] when a value is out of range; [`Error::TlsMaterial`]
    /// when the certificate or key cannot be loaded, generated or written, or do not
    /// match.
    pub fn into_settings(self) -> Result<Settings, Error> {
        let addr = match (self.listen, self.port) {
            (Some(addr), _) => addr,
            (None, Some(port)) => SocketAddr::from(([0, 0, 0, 0], port)),
            (None, None) => Settings::default().addr,
        };
        if self.max_message_size == 0 || self.max_frame_size == 0 {
            return Err(Error::InvalidSettings(
                "--max-message-size and --max-frame-size must be at least 1".into(),
            ));
        }
        if self.compression_level > 9 {
            return Err(Error::InvalidSettings(format!(
                "--compression-level must be 0-9, got {}",
                self.compression_level
            )));
        }
        let largest = self.max_message_size.max(self.max_frame_size);
        if self.buffer_budget < largest {
            return Err(Error::InvalidSettings(format!(
                "--buffer-budget ({}) must be at least the largest message or frame ({largest})",
                self.buffer_budget
            )));
        }
        // tokio's semaphore holds at most `usize::MAX >> 3` permits (it panics past
        // that), far above any memory a machine has.
        if self.buffer_budget > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(Error::InvalidSettings(format!(
                "--buffer-budget must be at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if self.write_buffer_limit == 0 {
            return Err(Error::InvalidSettings(
                "--write-buffer-limit must be at least 1".into(),
            ));
        }
        let allowed_origins = self
            .allowed_origins
            .iter()
            .map(|pattern| OriginPattern::parse(pattern))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::InvalidSettings)?;
        if self.max_connections == 0 {
            return Err(Error::InvalidSettings(
                "--max-connections must be at least 1".into(),
            ));
        }
        if let Some(bad) = self.subprotocols.iter().find(|p| !handshake_token(p)) {
            return Err(Error::InvalidSettings(format!(
                "--subprotocol {bad:?} is not an HTTP token"
            )));
        }
        let instance_name = self
            .instance_name
            .clone()
            .unwrap_or_else(default_instance_name);
        if axum::http::HeaderValue::from_str(&instance_name).is_err() {
            return Err(Error::InvalidSettings(format!(
                "--instance-name {instance_name:?} cannot be sent in an HTTP header"
            )));
        }
        // Last of the checks, after the cheap ones: it reads files, may generate a key
        // and may write the certificate.
        let tls = self.tls()?;
        let subprotocols = if self.no_subprotocol {
            SubprotocolPolicy::Never
        } else if self.subprotocols.is_empty() {
            SubprotocolPolicy::AcceptFirst
        } else {
            SubprotocolPolicy::Only(self.subprotocols)
        };
        Ok(Settings {
            addr,
            max_message_size: self.max_message_size,
            max_frame_size: self.max_frame_size,
            write_buffer_limit: self.write_buffer_limit,
            buffer_budget: self.buffer_budget,
            stall_timeout: nonzero(self.stall_timeout),
            message_timeout: nonzero(self.message_timeout),
            shutdown_timeout: self.shutdown_timeout,
            ping_interval: nonzero(self.ping_interval),
            ping_timeout: self.ping_timeout,
            idle_timeout: nonzero(self.idle_timeout),
            handshake_timeout: self.handshake_timeout,
            close_timeout: self.close_timeout,
            max_connections: self.max_connections,
            max_connections_per_ip: (self.max_connections_per_ip > 0)
                .then_some(self.max_connections_per_ip),
            max_tcp_connections: (self.max_tcp_connections > 0).then_some(self.max_tcp_connections),
            allowed_origins,
            compression: CompressionSettings {
                enabled: !self.no_compression,
                level: self.compression_level,
                threshold: self.compression_threshold,
                client_no_context_takeover: self.deflate_client_no_context_takeover,
                client_max_window_bits: self.deflate_client_max_window_bits,
            },
            subprotocols,
            instance_name,
            metrics_addr: self.metrics_listen,
            controls: !self.no_controls,
            max_delay: self.max_delay,
            max_stream_bytes: self.max_stream_bytes,
            max_connection_duration: nonzero(self.max_connection_duration),
            tls,
        })
    }

    /// Loads or generates the TLS material, and writes the generated certificate where
    /// `--tls-write-cert` asks. clap has already refused incomplete combinations.
    fn tls(&self) -> Result<Option<TlsSettings>, Error> {
        if self.tls_self_signed {
            let tls = TlsSettings::self_signed(&self.tls_names)?;
            if let Some(path) = &self.tls_write_cert {
                std::fs::write(path, tls.certificate_pem()).map_err(|error| {
                    Error::TlsMaterial(format!(
                        "could not write --tls-write-cert {}: {error}",
                        path.display()
                    ))
                })?;
            }
            return Ok(Some(tls));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsSettings::from_pem_files(cert, key).map(Some),
            _ => Ok(None),
        }
    }
}

/// Whether `arg` is a switch (it takes no value on the command line) whose environment
/// variable is set to one of the spellings of off.
fn switched_off_by_environment(command: &clap::Command, arg: &clap::Arg) -> bool {
    if !matches!(arg.get_action(), clap::ArgAction::SetTrue) {
        return false;
    }
    arg.get_env()
        .and_then(std::env::var_os)
        .is_some_and(|value| {
            matches!(
                BoolishValueParser::new().parse_ref(command, Some(arg), &value),
                Ok(false)
            )
        })
}

/// Whether `name` is an RFC 7230 token, the grammar of a subprotocol name.
fn handshake_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(is_token_byte)
}

/// Whether `byte` may appear in an RFC 7230 token: subprotocol names here, and the
/// handshake's header values (`ws::handshake`).
pub(crate) fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ws_echo").chain(args.iter().copied()))
            .expect("arguments parse")
    }

    #[test]
    fn command_is_well_formed() {
        Config::command().debug_assert();
    }

    /// The README shows `ws_echo -h`; this keeps it from drifting.
    #[test]
    fn readme_shows_the_current_help() {
        let help = Config::command().render_help().to_string();
        let readme = include_str!("../README.md");
        assert!(
            readme.contains(help.trim_end()),
            "README.md's help block differs from `ws_echo -h`; paste this:\n{help}"
        );
    }

    /// Whether the switch `id` is on when its variable holds `value`.
    ///
    /// A test cannot set the process environment: `std::env::set_var` needs `unsafe`
    /// in edition 2024, which the crate forbids, and would race the other tests. So the
    /// value goes in as the switch's default, which clap passes through the same action
    /// and value parser as a variable's value (`Parser::react`). The variables
    /// themselves are tested against the binary (tests/integration/environment.rs).
    fn switch_with_variable(id: &str, value: &'static str) -> Result<bool, clap::Error> {
        Config::command()
            .mut_arg(id, |arg| arg.default_value(value))
            .try_get_matches_from(["ws_echo"])
            .map(|matches| matches.get_flag(id))
    }

    /// Every switch that has a variable: all of them must read the same spellings.
    fn switches() -> Vec<String> {
        let switches: Vec<String> = Config::command()
            .get_arguments()
            .filter(|arg| matches!(arg.get_action(), clap::ArgAction::SetTrue))
            .filter(|arg| arg.get_env().is_some())
            .map(|arg| arg.get_id().to_string())
            .collect();
        assert!(switches.len() >= 4, "{switches:?}");
        switches
    }

    #[test]
    fn switch_variables_take_1_0_yes_false_and_more() {
        for id in switches() {
            for (value, on) in [
                ("1", true),
                ("0", false),
                ("yes", true),
                ("false", false),
                ("true", true),
                ("no", false),
                ("ON", true),
                ("off", false),
            ] {
                assert_eq!(
                    switch_with_variable(&id, value).unwrap(),
                    on,
                    "{id} with {value:?}"
                );
            }
        }
    }

    #[test]
    fn switch_variable_with_garbage_is_an_error() {
        for id in switches() {
            for value in ["garbage", "2", "enabled"] {
                let error = switch_with_variable(&id, value).unwrap_err();
                assert_eq!(
                    error.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{id} with {value:?}"
                );
            }
        }
    }

    #[test]
    fn no_compression_variable_of_1_turns_compression_off() {
        let matches = Config::command()
            .mut_arg("no_compression", |arg| arg.default_value("1"))
            .try_get_matches_from(["ws_echo"])
            .unwrap();
        let settings = Config {
            port: None,
            ..Config::from_arg_matches(&matches).unwrap()
        }
        .into_settings()
        .unwrap();
        assert!(!settings.compression.enabled);
    }

    #[test]
    fn switches_on_the_command_line_take_no_value() {
        assert!(parse(&["--no-compression"]).no_compression);
        assert!(!parse(&[]).no_compression);
        assert!(Config::try_parse_from(["ws_echo", "--no-compression", "0"]).is_err());
    }

    #[test]
    fn defaults_match_the_tutorial_address() {
        let settings = Config {
            port: None,
            ..parse(&[])
        }
        .into_settings()
        .unwrap();
        assert_eq!(settings.addr.to_string(), DEFAULT_ADDR);
    }

    #[test]
    fn port_variable_listens_on_all_interfaces() {
        let settings = Config {
            port: Some(8080),
            listen: None,
            ..parse(&[])
        }
        .into_settings()
        .unwrap();
        assert_eq!(settings.addr.to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn listen_flag_wins_over_port_variable() {
        let settings = Config {
            port: Some(8080),
            ..parse(&["--listen", "127.0.0.1:9"])
        }
        .into_settings()
        .unwrap();
        assert_eq!(settings.addr.to_string(), "127.0.0.1:9");
    }

    #[test]
    fn durations_accept_units_and_zero_turns_off() {
        let settings = Config {
            port: None,
            ..parse(&["--ping-interval", "0s", "--shutdown-timeout", "1500ms"])
        }
        .into_settings()
        .unwrap();
        assert_eq!(settings.ping_interval, None);
        assert_eq!(settings.shutdown_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn compression_level_above_nine_is_rejected() {
        let err = Config {
            port: None,
            ..parse(&["--compression-level", "10"])
        }
        .into_settings();
        assert!(matches!(err, Err(Error::InvalidSettings(_))));
    }

    #[test]
    fn subprotocol_flags_select_the_policy() {
        let only = Config {
            port: None,
            ..parse(&["--subprotocol", "chat", "--subprotocol", "mqtt"])
        };
        assert_eq!(
            only.into_settings().unwrap().subprotocols,
            SubprotocolPolicy::Only(vec!["chat".into(), "mqtt".into()])
        );
        let never = Config {
            port: None,
            ..parse(&["--no-subprotocol"])
        };
        assert_eq!(
            never.into_settings().unwrap().subprotocols,
            SubprotocolPolicy::Never
        );
        assert!(
            Config::try_parse_from(["ws_echo", "--no-subprotocol", "--subprotocol", "x"]).is_err()
        );
    }

    #[test]
    fn budget_smaller_than_a_message_is_rejected() {
        let bad = Config {
            port: None,
            ..parse(&[
                "--buffer-budget",
                "1000",
                "--max-message-size",
                "2000",
                "--max-frame-size",
                "2000",
            ])
        };
        assert!(bad.into_settings().is_err());
    }

    #[test]
    fn origin_patterns_are_parsed_and_checked() {
        let ok = Config {
            port: None,
            ..parse(&[
                "--allowed-origin",
                "https://*.example.com",
                "--allowed-origin",
                "http://localhost:*",
            ])
        };
        assert_eq!(ok.into_settings().unwrap().allowed_origins.len(), 2);
        let bad = Config {
            port: None,
            ..parse(&["--allowed-origin", "example.com"])
        };
        assert!(bad.into_settings().is_err());
    }

    #[test]
    fn subprotocol_that_is_not_a_token_is_rejected() {
        let bad = Config {
            port: None,
            ..parse(&["--subprotocol", "a b"])
        };
        assert!(bad.into_settings().is_err());
    }

    #[test]
    fn tls_flags_that_do_not_go_together_are_refused() {
        for args in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"],
            &[
                "--tls-self-signed",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ],
            &["--tls-name", "echo.test"],
            &["--tls-write-cert", "out.pem"],
        ] {
            let parsed =
                Config::try_parse_from(std::iter::once("ws_echo").chain(args.iter().copied()));
            assert!(parsed.is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn no_tls_flag_means_plain_http() {
        let settings = Config {
            port: None,
            ..parse(&[])
        }
        .into_settings()
        .unwrap();
        assert!(settings.tls.is_none());
    }

    #[test]
    fn self_signed_writes_the_certificate_it_serves() {
        let path =
            std::env::temp_dir().join(format!("ws_echo-config-test-{}.pem", std::process::id()));
        let settings = Config {
            port: None,
            ..parse(&[
                "--tls-self-signed",
                "--tls-write-cert",
                path.to_str().unwrap(),
            ])
        }
        .into_settings()
        .unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let tls = settings.tls.expect("TLS is on");
        assert!(tls.is_self_signed());
        assert_eq!(written, tls.certificate_pem());
    }

    #[test]
    fn unwritable_certificate_path_is_a_tls_error() {
        let result = Config {
            port: None,
            ..parse(&[
                "--tls-self-signed",
                "--tls-write-cert",
                "/nonexistent/dir/cert.pem",
            ])
        }
        .into_settings();
        assert!(
            matches!(&result, Err(Error::TlsMaterial(message)) if message.contains("--tls-write-cert")),
            "{result:?}"
        );
    }
}
