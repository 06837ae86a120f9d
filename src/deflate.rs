//! permessage-deflate negotiation (RFC 7692 §5, §7.1): reads the client's offers and
//! picks the first one this server can honour.
//!
//! The engine does its own negotiation, but it reads only the first offer and declines
//! the whole list when that one does not suit it (Autobahn 13.7.x). We decide here,
//! before the engine sees the request, and hand it the single agreed response.
//!
//! Defaults, and why:
//! - `server_no_context_takeover` is always answered (the server may add it on its own,
//!   §7.1.1.1). Without it the server keeps a 32 KiB+ deflate window per connection
//!   between messages; with it the engine takes compressor state from a shared pool only
//!   while a message is being compressed, so an idle connection holds none.
//! - `client_max_window_bits` is never answered with a value: the client then uses its
//!   own window (15 bits for every browser), and our inflater accepts any window size.
//!   Answering a smaller value makes client-to-server traffic larger (51% was measured
//!   with 9 bits) for no gain on our side.
//! - `server_max_window_bits=N` is honoured for N from 9 to 15. N = 8 cannot be: zlib
//!   raises a raw-deflate window of 8 bits to 9, and a client that asked for 8 could not
//!   read what we send, so such an offer is declined (§7.1.2.1 allows declining).

use axum::http::HeaderValue;
use axum::http::header::GetAll;

/// The extension token (RFC 7692 §7).
const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The LZ77 window sizes, in bits, the compressor can honour.
const SERVER_WINDOW_BITS: std::ops::RangeInclusive<u8> = 9..=15;

/// One permessage-deflate offer, parsed and validated.
#[derive(Debug, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `server_max_window_bits=N`: the client asks us to use at most N bits.
    server_max_window_bits: Option<u8>,
}

impl Offer {
    /// The response that accepts this offer (RFC 7692 §7.1).
    fn response(&self) -> String {
        let mut response = String::from(PERMESSAGE_DEFLATE);
        // Always: see the module docs.
        response.push_str("; server_no_context_takeover");
        if self.client_no_context_takeover {
            response.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            response.push_str(&format!("; server_max_window_bits={bits}"));
        }
        response
    }
}

/// Picks the first acceptable permessage-deflate offer among all
/// `Sec-WebSocket-Extensions` values and returns the response value that accepts it.
///
/// Offers of other extensions, malformed offers, and offers this server cannot honour are
/// declined one by one without failing the handshake (RFC 7692 §5); `None` means none was
/// acceptable, and the connection goes on uncompressed.
pub(crate) fn negotiate(values: GetAll<'_, HeaderValue>) -> Option<String> {
    values
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_outside_quotes(','))
        .filter_map(parse_offer)
        .find(|offer| {
            offer
                .server_max_window_bits
                .is_none_or(|bits| SERVER_WINDOW_BITS.contains(&bits))
        })
        .map(|offer| offer.response())
}

/// Parses one element of the extension list; `None` if it is not a valid
/// permessage-deflate offer (§7: unknown parameters, repeated parameters and invalid
/// values all make an offer invalid).
fn parse_offer(element: &str) -> Option<Offer> {
    let mut parts = split_outside_quotes(';')(element);
    let name = parts.next()?.trim();
    if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return None;
    }
    let mut offer = Offer::default();
    let mut client_max_window_bits_seen = false;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key.trim(), Some(unquote(value.trim())?)),
            None => (param.trim(), None),
        };
        match (key, value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", value) if !client_max_window_bits_seen => {
                client_max_window_bits_seen = true;
                if let Some(value) = value {
                    window_bits(value)?;
                }
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A window size from 8 to 15, written without leading zeros (§7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value with the quotes of a quoted-string removed (RFC 7230 §3.2.6).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|inner| !inner.contains('"')),
        None => Some(value),
    }
}

/// Splits on `separator` where it is not inside a quoted string.
fn split_outside_quotes(separator: char) -> impl Fn(&str) -> std::vec::IntoIter<&str> {
    move |input| {
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut quoted = false;
        for (index, c) in input.char_indices() {
            match c {
                '"' => quoted = !quoted,
                c if c == separator && !quoted => {
                    pieces.push(&input[start..index]);
                    start = index + 1;
                }
                _ => {}
            }
        }
        pieces.push(&input[start..]);
        pieces.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, header::SEC_WEBSOCKET_EXTENSIONS};

    fn negotiate_values(values: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(value).unwrap(),
            );
        }
        negotiate(headers.get_all(SEC_WEBSOCKET_EXTENSIONS))
    }

    #[test]
    fn browser_offer_is_accepted_without_limiting_the_client_window() {
        assert_eq!(
            negotiate_values(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
    }

    #[test]
    fn no_offer_means_no_compression() {
        assert_eq!(negotiate_values(&[]), None);
        assert_eq!(negotiate_values(&["x-webkit-deflate-frame"]), None);
    }

    #[test]
    fn every_parameter_is_answered() {
        assert_eq!(
            negotiate_values(&[
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10; client_max_window_bits=12"
            ])
            .as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10"
            )
        );
    }

    /// Autobahn 13.7.x: the first alternative decides nothing when it is declined.
    #[test]
    fn first_acceptable_alternative_wins() {
        assert_eq!(
            negotiate_values(&["permessage-deflate; server_max_window_bits=8, \
                 permessage-deflate; client_no_context_takeover, permessage-deflate"])
            .as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
    }

    #[test]
    fn alternatives_may_span_several_header_lines() {
        assert_eq!(
            negotiate_values(&["permessage-deflate; bogus", "permessage-deflate"]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
    }

    #[test]
    fn malformed_offers_are_declined() {
        for offer in [
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover=1",
        ] {
            assert_eq!(negotiate_values(&[offer]), None, "{offer}");
        }
    }

    #[test]
    fn quoted_values_are_accepted() {
        assert_eq!(
            negotiate_values(&["permessage-deflate; server_max_window_bits=\"12\""]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=12")
        );
    }
}
