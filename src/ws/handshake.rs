//! The opening handshake (RFC 6455 §4.2, RFC 8441 §4): checks an upgrade request,
//! selects a subprotocol and permessage-deflate parameters, and builds the response.
//!
//! Every refusal has its own precise HTTP answer, never a generic 400 or 500, because
//! the people reading it are debugging their own client. Nothing here knows the
//! WebSocket protocol: the result is a response and what both sides agreed to, which
//! `echo` hands to the connection.

use axum::{
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use sha1::{Digest, Sha1};

use super::deflate;
use crate::config::{Settings, SubprotocolPolicy, is_token_byte};

/// RFC 6455 §1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version this server (and RFC 6455) speaks.
const VERSION: &str = "13";

/// A handshake the server accepts: what to answer and what was agreed.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// `Some(accept key)` for an HTTP/1.1 Upgrade; `None` for HTTP/2 extended CONNECT,
    /// which is answered with 200 and no key (RFC 8441 §5).
    accept_key: Option<String>,
    /// The selected subprotocol, if any.
    pub(crate) subprotocol: Option<String>,
    /// The permessage-deflate agreement, if one was reached.
    pub(crate) extensions: Option<deflate::Agreed>,
}

impl Accepted {
    /// The response that completes the handshake.
    pub(crate) fn response(&self) -> Response {
        let mut builder = match &self.accept_key {
            Some(key) => Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "upgrade")
                .header(header::SEC_WEBSOCKET_ACCEPT, key),
            None => Response::builder().status(StatusCode::OK),
        };
        if let Some(protocol) = &self.subprotocol {
            builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        if let Some(agreed) = &self.extensions {
            builder = builder.header(header::SEC_WEBSOCKET_EXTENSIONS, &agreed.response);
        }
        builder
            .body(Body::empty())
            .expect("invariant: every header value above was validated or built from tokens")
    }

    /// Forgets the accept key once the response is built, so that a connection keeps
    /// only what it agreed to for as long as it lives (a heap string less per socket).
    pub(crate) fn forget_accept_key(&mut self) {
        self.accept_key = None;
    }
}

/// Why a request to `/ws` was refused, and the HTTP answer that says so.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// Not GET (HTTP/1.1) or CONNECT (HTTP/2): 405.
    MethodNotAllowed,
    /// A plain request, say from curl or a browser tab: 426 with a short explanation.
    NotAnUpgrade,
    /// An upgrade sent as HTTP/1.0 (or 0.9): 400. RFC 6455 §4.1 requires HTTP/1.1 or
    /// later, and hyper would otherwise answer `HTTP/1.0 101` and close.
    OldHttpVersion,
    /// An HTTP/1.1 upgrade without `Host` (RFC 6455 §4.1, RFC 9112 §3.2): 400.
    MissingHost,
    /// An HTTP/1.1 upgrade that carries a body (`Content-Length` above 0, or
    /// `Transfer-Encoding`): 400. The bytes after the request are the WebSocket's; a
    /// body there would be read as frames.
    UnexpectedBody,
    /// `Sec-WebSocket-Version` missing or not 13: 426 naming the supported version.
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes of base64: 400.
    BadKey,
    /// `Sec-WebSocket-Protocol` is not a list of tokens: 400.
    BadSubprotocol,
    /// The `Origin` matches no `--allowed-origin` pattern: 403.
    ForbiddenOrigin,
}

impl Rejection {
    /// A short name for logs and metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed => "method not allowed",
            Self::NotAnUpgrade => "not a websocket upgrade",
            Self::OldHttpVersion => "websocket upgrade over HTTP/1.0",
            Self::MissingHost => "websocket upgrade without a Host header",
            Self::UnexpectedBody => "websocket upgrade with a request body",
            Self::UnsupportedVersion => "unsupported websocket version",
            Self::BadKey => "missing or malformed Sec-WebSocket-Key",
            Self::BadSubprotocol => "malformed Sec-WebSocket-Protocol",
            Self::ForbiddenOrigin => "origin not allowed",
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let reason = self.reason();
        match self {
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, "GET")],
                format!("{reason}: /ws takes GET with a WebSocket upgrade\n"),
            )
                .into_response(),
            Self::NotAnUpgrade => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket"), (header::CONNECTION, "upgrade")],
                "This is a WebSocket endpoint: connect with a WebSocket client to ws://<this host>/ws.\n\
                 The echo page is at /.\n",
            )
                .into_response(),
            // 400, not 505: HTTP/1.0 is served (the page, /healthz), only the upgrade
            // is not, and 505 says the major version is refused. Not 426 either: its
            // `Upgrade` header cannot be acted on over HTTP/1.0, which has no upgrades.
            Self::OldHttpVersion => (
                StatusCode::BAD_REQUEST,
                format!(
                    "{reason}: a WebSocket handshake needs HTTP/1.1 or later (RFC 6455 §4.1); \
                     send the request as HTTP/1.1\n"
                ),
            )
                .into_response(),
            Self::UnsupportedVersion => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::SEC_WEBSOCKET_VERSION, VERSION)],
                format!("{reason}: this server speaks Sec-WebSocket-Version {VERSION}\n"),
            )
                .into_response(),
            Self::ForbiddenOrigin => (
                StatusCode::FORBIDDEN,
                format!("{reason}: this server accepts WebSockets only from configured origins\n"),
            )
                .into_response(),
            Self::BadKey | Self::BadSubprotocol | Self::MissingHost | Self::UnexpectedBody => {
                (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
            }
        }
    }
}

/// Checks an upgrade request and decides what to agree to.
///
/// # Errors
///
/// A [`Rejection`] naming the first thing wrong with the request.
pub(crate) fn accept<B>(request: &Request<B>, settings: &Settings) -> Result<Accepted, Rejection> {
    let headers = request.headers();
    let accept_key = if is_extended_connect(request) {
        None
    } else if request.method() == Method::GET {
        if !header_has_token(headers, header::CONNECTION, "upgrade")
            || !header_has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(Rejection::NotAnUpgrade);
        }
        if matches!(request.version(), Version::HTTP_09 | Version::HTTP_10) {
            return Err(Rejection::OldHttpVersion);
        }
        if !headers.contains_key(header::HOST) {
            return Err(Rejection::MissingHost);
        }
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .any(|length| length.as_bytes() != b"0");
        if has_body {
            return Err(Rejection::UnexpectedBody);
        }
        Some(String::new())
    } else {
        return Err(Rejection::MethodNotAllowed);
    };

    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(version), None) if version.as_bytes() == VERSION.as_bytes() => {}
        _ => return Err(Rejection::UnsupportedVersion),
    }

    let accept_key = match accept_key {
        Some(_) => Some(accept_key_for(headers)?),
        None => None,
    };

    if !settings.allowed_origins.is_empty() {
        // Browsers always send Origin; other clients may send anything, so an absent
        // header is no evidence of a cross-site page (see `origin`).
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().map_err(|_| Rejection::ForbiddenOrigin)?;
            if !settings
                .allowed_origins
                .iter()
                .any(|pattern| pattern.matches(origin))
            {
                return Err(Rejection::ForbiddenOrigin);
            }
        }
    }

    let subprotocol = select_subprotocol(headers, &settings.subprotocols)?;
    let extensions = settings
        .compression
        .enabled
        .then(|| {
            deflate::negotiate(
                headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS),
                &settings.compression.deflate_config(),
            )
        })
        .flatten();

    Ok(Accepted {
        accept_key,
        subprotocol,
        extensions,
    })
}

/// Whether this is an RFC 8441 extended CONNECT with `:protocol = websocket`.
fn is_extended_connect<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<h2::ext::Protocol>()
            .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
}

/// `Sec-WebSocket-Accept` for the request's key (RFC 6455 §4.2.2 step 5.4).
fn accept_key_for(headers: &HeaderMap) -> Result<String, Rejection> {
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(Rejection::BadKey);
    };
    // §4.1: the key is a base64-encoded 16-byte nonce.
    match BASE64.decode(key.as_bytes()) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(Rejection::BadKey),
    }
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(ACCEPT_GUID);
    Ok(BASE64.encode(sha1.finalize()))
}

/// Picks the subprotocol to answer with, following `policy`.
fn select_subprotocol(
    headers: &HeaderMap,
    policy: &SubprotocolPolicy,
) -> Result<Option<String>, Rejection> {
    let mut offered = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value.to_str().map_err(|_| Rejection::BadSubprotocol)?;
        for name in value
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            if !name.bytes().all(is_token_byte) {
                return Err(Rejection::BadSubprotocol);
            }
            offered.push(name);
        }
    }
    Ok(match policy {
        SubprotocolPolicy::Never => None,
        SubprotocolPolicy::AcceptFirst => offered.first().map(|name| (*name).to_owned()),
        SubprotocolPolicy::Only(allowed) => offered
            .iter()
            .find(|name| allowed.iter().any(|allowed| allowed == *name))
            .map(|name| (*name).to_owned()),
    })
}

/// Whether a comma-separated header holds `token`, compared without regard to case.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request() -> axum::http::request::Builder {
        Request::get("/ws")
            .header(header::HOST, "example.com")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
    }

    fn accept_with(request: axum::http::request::Builder) -> Result<Accepted, Rejection> {
        accept(&request.body(()).unwrap(), &Settings::default())
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        // RFC 6455 §1.3 gives this key and its accept value.
        let accepted = accept_with(upgrade_request()).unwrap();
        assert_eq!(
            accepted.accept_key.as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(
            accepted.response().status(),
            StatusCode::SWITCHING_PROTOCOLS
        );
    }

    #[test]
    fn wrong_version_is_426_naming_13() {
        let rejection = accept_with(upgrade_request().header(header::SEC_WEBSOCKET_VERSION, "8"));
        assert_eq!(rejection.unwrap_err(), Rejection::UnsupportedVersion);
        let response = Rejection::UnsupportedVersion.into_response();
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    #[test]
    fn key_of_wrong_length_is_400() {
        let request = Request::get("/ws")
            .header(header::HOST, "example.com")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "c2hvcnQ=");
        assert_eq!(accept_with(request).unwrap_err(), Rejection::BadKey);
    }

    #[test]
    fn plain_get_is_426_with_an_explanation() {
        let request = Request::get("/ws");
        assert_eq!(accept_with(request).unwrap_err(), Rejection::NotAnUpgrade);
    }

    #[test]
    fn upgrade_over_http_1_0_is_400() {
        let request = upgrade_request().version(Version::HTTP_10);
        assert_eq!(accept_with(request).unwrap_err(), Rejection::OldHttpVersion);
        let response = Rejection::OldHttpVersion.into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn post_is_405() {
        let request = Request::post("/ws");
        assert_eq!(
            accept_with(request).unwrap_err(),
            Rejection::MethodNotAllowed
        );
    }

    #[test]
    fn first_offered_subprotocol_is_selected_by_default() {
        let request = upgrade_request().header(header::SEC_WEBSOCKET_PROTOCOL, "chat, superchat");
        assert_eq!(
            accept_with(request).unwrap().subprotocol.as_deref(),
            Some("chat")
        );
    }

    #[test]
    fn restricted_subprotocols_pick_the_first_allowed() {
        let request = upgrade_request()
            .header(header::SEC_WEBSOCKET_PROTOCOL, "chat")
            .header(header::SEC_WEBSOCKET_PROTOCOL, "mqtt, superchat")
            .body(())
            .unwrap();
        let settings = Settings {
            subprotocols: SubprotocolPolicy::Only(vec!["superchat".into(), "mqtt".into()]),
            ..Settings::default()
        };
        assert_eq!(
            accept(&request, &settings).unwrap().subprotocol.as_deref(),
            Some("mqtt")
        );
        let never = Settings {
            subprotocols: SubprotocolPolicy::Never,
            ..Settings::default()
        };
        assert_eq!(accept(&request, &never).unwrap().subprotocol, None);
    }

    #[test]
    fn subprotocol_with_a_space_inside_is_400() {
        let request = upgrade_request().header(header::SEC_WEBSOCKET_PROTOCOL, "a b");
        assert_eq!(accept_with(request).unwrap_err(), Rejection::BadSubprotocol);
    }

    /// Issue 12: an upgrade without Host, or with a body, was answered with 101.
    #[test]
    fn upgrade_without_host_or_with_a_body_is_400() {
        let no_host = Request::get("/ws")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept_with(no_host).unwrap_err(), Rejection::MissingHost);
        let sized = upgrade_request().header(header::CONTENT_LENGTH, "5");
        assert_eq!(accept_with(sized).unwrap_err(), Rejection::UnexpectedBody);
        let chunked = upgrade_request().header(header::TRANSFER_ENCODING, "chunked");
        assert_eq!(accept_with(chunked).unwrap_err(), Rejection::UnexpectedBody);
        let empty = upgrade_request().header(header::CONTENT_LENGTH, "0");
        assert!(accept_with(empty).is_ok());
        let response = Rejection::MissingHost.into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
