//! TLS on the same port: wss:// echoes exactly as ws:// does, a client that does not
//! trust the certificate fails only its own handshake, ALPN offers h2, and the binary's
//! `--tls-self-signed --tls-write-cert` hands clients the certificate it serves.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{
    Connector, connect_async_tls_with_config,
    tungstenite::{self, Message},
};
use ws_echo::{Settings, TlsSettings};

use crate::support::{
    Client, STEP, TestServer, assert_echoes, assert_echoes_text_and_binary, tls_client_config,
};

/// A server with a fresh self-signed certificate, and that certificate.
async fn tls_server(settings: Settings) -> (TestServer, TlsSettings) {
    let tls = TlsSettings::self_signed(&[]).expect("generate a certificate");
    let server = TestServer::with(Settings {
        tls: Some(tls.clone()),
        ..settings
    })
    .await;
    (server, tls)
}

/// Connects to `url` (wss://) with a client that trusts only `certificate`.
async fn connect_wss(url: &str, certificate: &[u8]) -> Result<Client, tungstenite::Error> {
    let connector = Connector::Rustls(tls_client_config(certificate, &[]));
    tokio::time::timeout(
        STEP,
        connect_async_tls_with_config(url, None, true, Some(connector)),
    )
    .await
    .expect("handshake in time")
    .map(|(client, response)| {
        assert_eq!(response.status(), 101);
        client
    })
}

#[tokio::test]
async fn echoes_the_same_over_ws_and_wss() {
    let plain = TestServer::start().await;
    let mut client = plain.connect().await;
    assert_echoes_text_and_binary(&mut client).await;

    let (server, tls) = tls_server(Settings::default()).await;
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der())
        .await
        .expect("wss handshake succeeds");
    assert_echoes_text_and_binary(&mut client).await;
    // The certificate names localhost too.
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der())
        .await
        .expect("wss handshake by name succeeds");
    assert_echoes_text_and_binary(&mut client).await;
}

#[tokio::test]
async fn client_that_does_not_trust_the_certificate_fails_and_others_are_served() {
    let (server, tls) = tls_server(Settings::default()).await;
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let stranger = TlsSettings::self_signed(&[]).expect("another certificate");
    let error = connect_wss(&url, stranger.certificate_der())
        .await
        .expect_err("an untrusted certificate fails the handshake");
    assert!(
        matches!(
            error,
            tungstenite::Error::Io(_) | tungstenite::Error::Tls(_)
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .to_ascii_lowercase()
            .contains("certificate"),
        "{error}"
    );
    let mut client = connect_wss(&url, tls.certificate_der())
        .await
        .expect("a trusting client is still served");
    assert_echoes(&mut client, Message::text("still here")).await;
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_refused_and_others_are_served() {
    let (server, tls) = tls_server(Settings::default()).await;
    let plain = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(server.ws_url()))
        .await
        .expect("answered in time");
    assert!(plain.is_err(), "ws:// must not work on a TLS port");
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der()).await.expect("wss");
    assert_echoes(&mut client, Message::text("after a plain client")).await;
}

/// Like nginx's 497: a plain HTTP request on the TLS port gets a 400 that says to use
/// https:// or wss://, and the connection closes; TLS clients are served as before.
#[tokio::test]
async fn plain_http_on_the_tls_port_gets_400_naming_https_and_wss() {
    let (server, tls) = tls_server(Settings {
        instance_name: "replica-3".into(),
        ..Settings::default()
    })
    .await;
    // (request, the status line's version: hyper answers HTTP/1.0 in kind)
    for (request, version) in [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1"),
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "HTTP/1.1",
        ),
        (
            "POST /ws HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.0",
        ),
    ] {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut response))
            .await
            .expect("answered and closed in time")
            .expect("read to the end, not reset");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.starts_with(&format!("{version} 400 Bad Request")),
            "{response}"
        );
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: text/plain"), "{head}");
        assert!(head.contains("x-served-by: replica-3"), "{head}");
        assert!(
            body.contains("speaks TLS") && body.contains("https://") && body.contains("wss://"),
            "{body}"
        );
    }
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der()).await.expect("wss");
    assert_echoes(&mut client, Message::text("TLS still works")).await;
}

/// The TLS handshake runs in the connection's task under the handshake timeout: a
/// client that connects and says nothing neither holds up the next client (served well
/// within the timeout) nor stays connected past it.
#[tokio::test]
async fn silent_tls_client_blocks_no_one_and_is_cut_at_the_handshake_timeout() {
    // Long enough that the next client, given half of it, is served even on a loaded CI run.
    let handshake_timeout = Duration::from_secs(4);
    let (server, tls) = tls_server(Settings {
        handshake_timeout,
        ..Settings::default()
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let started = tokio::time::Instant::now();
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    tokio::time::timeout(handshake_timeout / 2, async {
        let mut client = connect_wss(&url, tls.certificate_der()).await.expect("wss");
        assert_echoes(&mut client, Message::text("not blocked")).await;
    })
    .await
    .expect("the next client is served while the silent one waits");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(STEP, silent.read(&mut buffer))
        .await
        .expect("the server closes the silent connection in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection closed, got {read:?}"
    );
    assert!(started.elapsed() >= handshake_timeout - Duration::from_millis(100));
}

#[tokio::test]
async fn alpn_gives_h2_to_a_client_that_offers_it() {
    let (server, tls) = tls_server(Settings::default()).await;
    for (offered, expected) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], Some(b"h2".as_slice())),
        (&[b"http/1.1".as_slice()][..], Some(b"http/1.1".as_slice())),
        (&[][..], None),
    ] {
        let connector = TlsConnector::from(tls_client_config(tls.certificate_der(), offered));
        let tcp = TcpStream::connect(server.addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name");
        let stream = tokio::time::timeout(STEP, connector.connect(name, tcp))
            .await
            .expect("TLS handshake in time")
            .expect("TLS handshake succeeds");
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            expected,
            "offered {offered:?}"
        );
    }
}

/// The binary, killed on drop if a test fails before it exits.
struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A path in the temporary directory unique to this test run, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("ws_echo-{}-{name}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads JSON log lines until one contains `needle`, and returns it.
fn read_line_with(lines: &mut impl BufRead, needle: &str) -> String {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let read = lines.read_line(&mut line).expect("read a log line");
        assert!(read > 0, "no log line with {needle:?} among {seen:#?}");
        if line.contains(needle) {
            return line;
        }
        seen.push(line);
    }
}

/// The value of a JSON string field in a log line, such as `"sha256":"AB:CD:…"`.
fn json_field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = format!("\"{name}\":\"");
    line.split(&start)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// `--tls-self-signed --tls-write-cert` through the real binary: the log shows https://
/// and wss:// URLs and the certificate's fingerprint, the written PEM is the certificate
/// served (its DER hashes to that fingerprint), and a client trusting the file echoes.
#[tokio::test]
async fn self_signed_binary_writes_the_certificate_it_serves() {
    let pem_path = TempPath::new("self-signed.pem");
    let mut binary = Binary(
        Command::new(env!("CARGO_BIN_EXE_ws_echo"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--tls-self-signed", "--tls-name", "echo.test"])
            .arg("--tls-write-cert")
            .arg(&pem_path.0)
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ws_echo"),
    );
    let mut log = BufReader::new(binary.0.stdout.take().expect("piped stdout"));
    let listening = read_line_with(&mut log, "ws_echo listening");
    let url = json_field(&listening, "url");
    let port: u16 = url
        .strip_prefix("https://127.0.0.1:")
        .and_then(|rest| rest.strip_suffix('/'))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("not an https URL: {url}"));
    assert_eq!(
        json_field(&listening, "websocket"),
        format!("wss://127.0.0.1:{port}/ws")
    );
    let certificate_line = read_line_with(&mut log, "TLS certificate");
    let logged = json_field(&certificate_line, "sha256").to_owned();

    let pem = std::fs::read(&pem_path.0).expect("--tls-write-cert wrote the certificate");
    let der = {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(&pem).expect("the file is a PEM certificate")
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let expected: Vec<String> = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect();
    assert_eq!(logged, expected.join(":"));

    let url = format!("wss://127.0.0.1:{port}/ws");
    let mut client = connect_wss(&url, &der)
        .await
        .expect("trusting the file works");
    assert_echoes(&mut client, Message::text("trusted by file")).await;
    // The extra --tls-name is in the certificate too; connect to 127.0.0.1 by that name.
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let connector = TlsConnector::from(tls_client_config(&der, &[]));
    let name = rustls::pki_types::ServerName::try_from("echo.test").expect("a DNS name");
    tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("the certificate names echo.test");
}

/// Bad TLS material is a startup error with a message that names the problem: exit code
/// 1, never a panic (101).
#[test]
fn missing_certificate_file_is_a_clear_startup_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_ws_echo"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", "/nonexistent/cert.pem"])
        .args(["--tls-key", "/nonexistent/key.pem"])
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ws_echo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not read --tls-cert /nonexistent/cert.pem"),
        "{stderr}"
    );
}

#[test]
fn key_that_does_not_match_the_certificate_is_a_clear_startup_error() {
    let cert = TempPath::new("mismatch-cert.pem");
    let key = TempPath::new("mismatch-key.pem");
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&cert.0, one.cert.pem()).unwrap();
    std::fs::write(&key.0, other.signing_key.serialize_pem()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ws_echo"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert.0)
        .arg("--tls-key")
        .arg(&key.0)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ws_echo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the private key does not belong to the certificate"),
        "{stderr}"
    );
}

/// The hello message describes the TLS session the client negotiated.
#[tokio::test]
async fn hello_reports_the_tls_session() {
    let (server, tls) = tls_server(Settings::default()).await;
    let url = format!("wss://localhost:{}/ws?hello=1", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der())
        .await
        .expect("wss handshake");
    let tungstenite::Message::Text(greeting) = crate::support::recv(&mut client).await else {
        panic!("the greeting is text");
    };
    let greeting: serde_json::Value = serde_json::from_str(&greeting).expect("JSON");
    assert_eq!(greeting["tls"]["protocol"], "TLSv1_3", "{greeting}");
    assert_eq!(greeting["tls"]["server_name"], "localhost", "{greeting}");
}

/// `drop` over wss:// resets the TCP connection too: the server drives HTTP/1.1
/// WebSockets on the TLS stream itself, which reaches its socket.
#[tokio::test]
async fn drop_over_wss_resets_the_connection() {
    let (server, tls) = tls_server(Settings::default()).await;
    let url = format!("wss://localhost:{}/ws?drop=1&after=1", server.addr.port());
    let mut client = connect_wss(&url, tls.certificate_der())
        .await
        .expect("wss handshake succeeds");
    assert_echoes(&mut client, Message::text("last")).await;
    let ended = tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut client))
        .await
        .expect("the connection ends in time");
    match ended {
        Some(Err(tungstenite::Error::Io(error))) => {
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        }
        other => panic!("expected a reset, got {other:?}"),
    }
}
