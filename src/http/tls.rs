//! TLS: the rustls configuration, loaded from PEM files or generated self-signed, and
//! the per-connection handshake that turns an accepted TCP stream into a TLS stream.
//!
//! The server branches once per connection, plain or TLS, and then serves both through
//! the same HTTP path (`http::server`), so no handler ever sees TLS. The handshake runs
//! in the connection's own task under the handshake timeout: a client that stalls
//! inside it holds up only itself, never the accept loop. That is why [`Acceptor`] is not an
//! `axum::serve::Listener`: a listener's `accept` runs in the loop, so one slow
//! ClientHello there would delay every connection behind it.
//!
//! A client that speaks plain HTTP to the TLS port (`curl http://…`, `ws://…`) is told
//! so: the first byte is peeked, and anything but a TLS handshake record is handed back
//! to the server, which answers 400 with a pointer to https:// and wss://, as nginx's
//! 497 does, instead of a TLS failure the client reports as an empty reply.

use std::{fmt, io, path::Path, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::Error;

/// The names a self-signed certificate always covers: what a client on the same
/// machine types. `--tls-name` adds more.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Offered over ALPN, most preferred first. HTTP/2 carries WebSockets too (RFC 8441).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The content type of a TLS handshake record (RFC 8446 §5.1), the first byte every TLS
/// client sends. A plain HTTP request starts with a method's letter.
const HANDSHAKE_RECORD: u8 = 0x16;

/// A ready TLS configuration: the certificate chain and key, checked against each other.
///
/// Created once by [`crate::Config::into_settings`] (or by an embedder through
/// [`TlsSettings::from_pem`] or [`TlsSettings::self_signed`]) and cloned cheaply into
/// [`crate::Settings`]: the rustls configuration is shared behind an `Arc`.
#[derive(Clone)]
pub struct TlsSettings {
    /// The rustls server configuration every connection's handshake uses.
    config: Arc<ServerConfig>,
    /// The end-entity certificate, for its fingerprint and for `--tls-write-cert`.
    certificate: CertificateDer<'static>,
    /// Whether the certificate was generated at startup rather than loaded.
    self_signed: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("sha256", &self.fingerprint())
            .field("self_signed", &self.self_signed)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// TLS settings from PEM files: `cert` holds the chain, end-entity certificate first,
    /// and `key` its private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    ///
    /// [`Error::TlsMaterial`] when a file cannot be read, holds no certificate or no key,
    /// or the key does not belong to the certificate.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, Error> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|error| {
                Error::TlsMaterial(format!("could not read {flag} {}: {error}", path.display()))
            })
        };
        let cert_pem = read("--tls-cert", cert)?;
        let key_pem = read("--tls-key", key)?;
        Self::parse(&cert_pem, &key_pem, false).map_err(|problem| {
            Error::TlsMaterial(format!(
                "--tls-cert {} with --tls-key {}: {problem}",
                cert.display(),
                key.display()
            ))
        })
    }

    /// TLS settings from PEM text: `cert_pem` holds the chain, end-entity certificate
    /// first, and `key_pem` its private key.
    ///
    /// # Errors
    ///
    /// [`Error::TlsMaterial`] when there is no certificate or no key, or they do not
    /// match.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # fn example() -> Result<(), ws_echo::Error> {
    /// let cert = std::fs::read("cert.pem")?;
    /// let key = std::fs::read("key.pem")?;
    /// let settings = ws_echo::Settings {
    ///     tls: Some(ws_echo::TlsSettings::from_pem(&cert, &key)?),
    ///     ..ws_echo::Settings::default()
    /// };
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        Self::parse(cert_pem, key_pem, false).map_err(Error::TlsMaterial)
    }

    /// A certificate generated now for `localhost`, `127.0.0.1`, `::1` and `extra_names`
    /// (host names or IP addresses), with a fresh key that never leaves the process.
    ///
    /// # Errors
    ///
    /// [`Error::TlsMaterial`] when a name is neither a valid DNS name nor an IP address.
    pub fn self_signed(extra_names: &[String]) -> Result<Self, Error> {
        // rcgen takes any ASCII as a DNS name; a client could never match a name with a
        // space in it, so refuse it here, the way a client would parse it.
        if let Some(bad) = extra_names
            .iter()
            .find(|name| ServerName::try_from(name.as_str()).is_err())
        {
            return Err(Error::TlsMaterial(format!(
                "--tls-name {bad:?} is neither a DNS name nor an IP address"
            )));
        }
        let names: Vec<String> = SELF_SIGNED_NAMES
            .iter()
            .map(|name| (*name).to_owned())
            .chain(extra_names.iter().cloned())
            .collect();
        let generated = rcgen::generate_simple_self_signed(names).map_err(|error| {
            Error::TlsMaterial(format!("could not generate a certificate: {error}"))
        })?;
        let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
            .map_err(|error| Error::TlsMaterial(format!("generated key: {error}")))?;
        Self::build(vec![generated.cert.der().clone()], key, true).map_err(Error::TlsMaterial)
    }

    /// The end-entity certificate, DER-encoded.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// The end-entity certificate as PEM, what `--tls-write-cert` writes for clients to
    /// trust (`curl --cacert FILE`, `SSL_CERT_FILE=FILE websocat`).
    pub fn certificate_pem(&self) -> String {
        let encoded = BASE64.encode(&self.certificate);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        // RFC 7468 §2: lines of 64 characters.
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("invariant: base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    /// The SHA-256 fingerprint of the certificate: upper-case hex pairs joined by colons,
    /// as browsers and `openssl x509 -fingerprint -sha256` show it.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.certificate);
        let hex: Vec<String> = digest
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02X}"))
            .collect();
        hex.join(":")
    }

    /// Whether the certificate was generated at startup by [`TlsSettings::self_signed`].
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// The acceptor for this configuration, with the deadline every handshake gets.
    pub(crate) fn acceptor(&self, timeout: Duration) -> Acceptor {
        Acceptor {
            inner: TlsAcceptor::from(Arc::clone(&self.config)),
            timeout,
        }
    }

    /// Parses PEM text into a configuration; the error is a sentence for the user.
    fn parse(cert_pem: &[u8], key_pem: &[u8], self_signed: bool) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("the certificate file is not valid PEM: {error}"))?;
        if chain.is_empty() {
            return Err("the certificate file holds no CERTIFICATE section".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "the key file holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)".to_owned()
            }
            error => format!("the key file is not valid PEM: {error}"),
        })?;
        Self::build(chain, key, self_signed)
    }

    /// Builds the rustls configuration; rustls checks that the key is usable and that it
    /// matches the end-entity certificate.
    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        self_signed: bool,
    ) -> Result<Self, String> {
        let certificate = chain[0].clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS protocol versions: {error}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| match error {
                rustls::Error::InconsistentKeys(_) => {
                    "the private key does not belong to the certificate".to_owned()
                }
                error => format!("the certificate or key is not usable: {error}"),
            })?;
        config.alpn_protocols = ALPN.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            certificate,
            self_signed,
        })
    }
}

/// The TLS half of accepting a connection: `Listener`-like, but called in the
/// connection's task, after the accept loop has moved on.
#[derive(Clone)]
pub(crate) struct Acceptor {
    /// tokio-rustls' acceptor; a clone shares the rustls configuration.
    inner: TlsAcceptor,
    /// Deadline for the whole TLS handshake: `Settings::handshake_timeout`.
    timeout: Duration,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What a connection on the TLS port turned out to be.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "the TLS stream is the common case and moves straight into the connection's \
              task, which holds one either way; a Box would add an allocation per connection"
)]
pub(crate) enum Accepted {
    /// A finished TLS handshake.
    Tls(TlsStream<TcpStream>),
    /// Not TLS: the first byte, still unread, is not a handshake record. The server
    /// answers it before `deadline`, the end of the handshake timeout.
    NotTls {
        stream: TcpStream,
        deadline: Instant,
    },
}

impl Acceptor {
    /// Runs the TLS handshake on `stream`, unless its first byte shows it is not TLS.
    ///
    /// # Errors
    ///
    /// The handshake's own error (a client that does not trust the certificate aborts
    /// here), or [`io::ErrorKind::TimedOut`] past the deadline.
    pub(crate) async fn accept(&self, stream: TcpStream) -> io::Result<Accepted> {
        let deadline = Instant::now() + self.timeout;
        let handshake = async {
            let mut first = [0u8; 1];
            // Peeked, not read: a TLS client's ClientHello stays whole for rustls. At the
            // end of the stream (0 bytes) rustls reports the failure as usual.
            if stream.peek(&mut first).await? == 1 && first[0] != HANDSHAKE_RECORD {
                return Ok(Accepted::NotTls { stream, deadline });
            }
            self.inner.accept(stream).await.map(Accepted::Tls)
        };
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_round_trips_through_pem() {
        let generated = TlsSettings::self_signed(&["echo.test".into()]).unwrap();
        assert!(generated.is_self_signed());
        let parsed = CertificateDer::from_pem_slice(generated.certificate_pem().as_bytes())
            .expect("our PEM parses");
        assert_eq!(parsed.as_ref(), generated.certificate_der());
    }

    #[test]
    fn fingerprint_is_32_colon_separated_hex_pairs() {
        let fingerprint = TlsSettings::self_signed(&[]).unwrap().fingerprint();
        let pairs: Vec<&str> = fingerprint.split(':').collect();
        assert_eq!(pairs.len(), 32, "{fingerprint}");
        assert!(pairs.iter().all(|pair| {
            pair.len() == 2
                && pair
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
        }));
    }

    #[test]
    fn alpn_offers_h2_then_http1() {
        let settings = TlsSettings::self_signed(&[]).unwrap();
        assert_eq!(
            settings.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let error = TlsSettings::from_pem(
            one.cert.pem().as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("does not belong"), "{error}");
    }

    #[test]
    fn certificate_file_without_a_key_is_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let pem = one.cert.pem();
        let error = TlsSettings::from_pem(pem.as_bytes(), pem.as_bytes()).unwrap_err();
        assert!(error.to_string().contains("no private key"), "{error}");
    }

    #[test]
    fn invalid_extra_name_is_an_error_not_a_panic() {
        let error = TlsSettings::self_signed(&["not a host name!".into()]);
        assert!(matches!(error, Err(Error::TlsMaterial(_))), "{error:?}");
    }
}
