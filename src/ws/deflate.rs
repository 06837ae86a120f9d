//! permessage-deflate (RFC 7692): negotiation and the per-message codec. The handshake
//! calls [`negotiate`] and answers with [`Agreed::response`]; the connection's receive
//! side owns an [`Inflater`] built from the agreed [`Params`], and the send side
//! compresses each outgoing message with [`deflate_message`].
//!
//! Defaults, and why:
//! - `server_no_context_takeover` is always answered (the server may add it on its own,
//!   §7.1.1.1). Without it the server keeps a 32 KiB+ deflate window per connection
//!   between messages; with it every message is compressed from a fresh state, so one
//!   cached compressor per thread (per level and window) serves every connection, and an
//!   idle connection holds none.
//! - `client_max_window_bits` is answered only when the operator sets
//!   [`DeflateConfig::client_max_window_bits`] and the offer carries the parameter
//!   (§7.1.2.2). Otherwise the client uses its own window (15 bits for every browser),
//!   and our inflater reads any window size. Answering a smaller value makes
//!   client-to-server traffic larger (51% was measured with 9 bits); what it buys is a
//!   smaller inflate window kept per connection under context takeover.
//! - `client_no_context_takeover` is answered when offered, or always when the operator
//!   sets [`DeflateConfig::client_no_context_takeover`] (§7.1.1.2). Then the inflater
//!   drops its zlib state after each message, so an idle connection holds none; without
//!   it the state stays for the connection's life, as the client's next message may
//!   refer back to this one.
//! - `server_max_window_bits=N` is honoured for N from 9 to 15. N = 8 cannot be: zlib
//!   raises a raw-deflate window of 8 bits to 9, and a client that asked for 8 could not
//!   read what we send, so such an offer is declined (§7.1.2.1 allows declining).
//! - The inflater grows its output in bounded steps and stops one byte past the caller's
//!   limit, so a deflate bomb costs no more memory than the message-size limit.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use http::HeaderValue;
use http::header::GetAll;

use super::chunked::Chunked;

/// The extension token (RFC 7692 §7).
const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The smallest LZ77 window, in bits, zlib compresses and inflates raw deflate with.
const MIN_WINDOW_BITS: u8 = 9;

/// The largest window, which inflates whatever window the peer compressed with.
const MAX_WINDOW_BITS: u8 = 15;

/// The empty stored block a sync flush ends with: the sender removes it and the receiver
/// appends it (§7.2.1, §7.2.2).
const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The operator's permessage-deflate settings.
#[derive(Debug, Clone)]
pub(crate) struct DeflateConfig {
    /// Deflate level, 0–9, for what we send.
    pub(crate) level: u32,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub(crate) threshold: usize,
    /// Answer `client_no_context_takeover` to every offer.
    pub(crate) client_no_context_takeover: bool,
    /// Answer `client_max_window_bits=N` (N in 9..=15) to offers that carry the parameter.
    pub(crate) client_max_window_bits: Option<u8>,
}

/// An accepted offer: what to answer, and what the codec must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// The `Sec-WebSocket-Extensions` response value.
    pub(crate) response: String,
    /// The agreed parameters, for [`Inflater::new`] and [`deflate_message`].
    pub(crate) params: Params,
}

/// The agreed parameters of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// Our compressor's window, 9..=15.
    pub(crate) server_window_bits: u8,
    /// Our inflater's window: 15 unless we answered `client_max_window_bits=N`.
    pub(crate) client_window_bits: u8,
    /// The client starts every message from an empty window (it offered this, or we
    /// answered it), so the inflater keeps no state between messages.
    pub(crate) client_no_context_takeover: bool,
    /// Deflate level, 0–9, for what we send.
    pub(crate) level: u32,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub(crate) threshold: usize,
}

/// One permessage-deflate offer, parsed and validated.
#[derive(Debug, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `server_max_window_bits=N`: the client asks us to use at most N bits.
    server_max_window_bits: Option<u8>,
    /// `client_max_window_bits[=N]`: the client accepts a limit on its window from us
    /// (`Some(None)`), and already uses at most N bits (`Some(Some(N))`).
    client_max_window_bits: Option<Option<u8>>,
}

impl Offer {
    /// Accepts this offer under the operator's settings (RFC 7692 §7.1).
    fn accept(&self, config: &DeflateConfig) -> Agreed {
        let client_no_context_takeover =
            self.client_no_context_takeover || config.client_no_context_takeover;
        // Only an offer that carries the parameter may be answered with it (§7.1.2.2),
        // and never with more than the client said it uses.
        let client_max_window_bits = config
            .client_max_window_bits
            .zip(self.client_max_window_bits)
            .map(|(ours, theirs)| {
                let ours = ours.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
                theirs.map_or(ours, |theirs| ours.min(theirs))
            });
        let mut response = String::from(PERMESSAGE_DEFLATE);
        // Always: see the module docs.
        response.push_str("; server_no_context_takeover");
        if client_no_context_takeover {
            response.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            response.push_str(&format!("; server_max_window_bits={bits}"));
        }
        if let Some(bits) = client_max_window_bits {
            response.push_str(&format!("; client_max_window_bits={bits}"));
        }
        let params = Params {
            server_window_bits: self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
            // A 9-bit inflater reads what an 8-bit compressor writes; zlib has no smaller.
            client_window_bits: client_max_window_bits
                .map_or(MAX_WINDOW_BITS, |bits| bits.max(MIN_WINDOW_BITS)),
            client_no_context_takeover,
            level: config.level,
            threshold: config.threshold,
        };
        Agreed { response, params }
    }
}

/// Picks the first acceptable permessage-deflate offer among all
/// `Sec-WebSocket-Extensions` values and accepts it under `config`.
///
/// Offers of other extensions, malformed offers, and offers this server cannot honour are
/// declined one by one without failing the handshake (RFC 7692 §5); `None` means none was
/// acceptable, and the connection goes on uncompressed.
pub(crate) fn negotiate(values: GetAll<'_, HeaderValue>, config: &DeflateConfig) -> Option<Agreed> {
    values
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_outside_quotes(','))
        .filter_map(parse_offer)
        .find(|offer| {
            offer
                .server_max_window_bits
                .is_none_or(|bits| (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits))
        })
        .map(|offer| offer.accept(config))
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
            ("client_max_window_bits", value) if offer.client_max_window_bits.is_none() => {
                let bits = match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                };
                offer.client_max_window_bits = Some(bits);
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

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// The message inflates past the caller's limit (close with 1009).
    TooLarge,
    /// The payload is not a valid deflate stream (close with 1007).
    Corrupt,
}

/// The receive side's decompressor: one per connection, holding zlib state only while it
/// must (see [`Inflater::finish`]).
#[derive(Debug)]
pub(crate) struct Inflater {
    /// The window the client compresses with, at most.
    window_bits: u8,
    /// Drop the state after every message.
    no_context_takeover: bool,
    /// `None` until the first compressed bytes arrive, between messages without context
    /// takeover, and after an error.
    state: Option<Decompress>,
    /// The current message's deflate stream ended with a BFINAL block (§7.2.3.4); what
    /// follows it in the message is padding for the trailer.
    ended: bool,
}

impl Inflater {
    /// An inflater for the agreed `params`; it allocates nothing yet.
    pub(crate) fn new(params: &Params) -> Self {
        Self {
            window_bits: params
                .client_window_bits
                .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            no_context_takeover: params.client_no_context_takeover,
            state: None,
            ended: false,
        }
    }

    /// Inflates one piece of a message's compressed (already unmasked) payload, appending
    /// to `out`; pieces may be split anywhere. A message longer than `limit` bytes fails
    /// with [`InflateError::TooLarge`] once `out` holds `limit + 1` of them; we never grow
    /// `out` past that, so a deflate bomb costs at most the limit. After an error `out`
    /// holds a partial message and the connection must be failed.
    ///
    /// `out` grows by at most `room` bytes (charged as it grows): when that is spent
    /// with input left, inflating stops and returns how much of `input` it used, and
    /// the caller passes the rest again with more room.
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Chunked,
        limit: usize,
        room: &mut usize,
    ) -> Result<usize, InflateError> {
        // Empty frames cost nothing, and what follows a final block is ignored.
        if input.is_empty() || self.ended {
            return Ok(input.len());
        }
        let bits = self.window_bits;
        let state = self
            .state
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, bits));
        let result = inflate_into(state, input, out, limit, room);
        match result {
            Ok((used, ended)) => {
                self.ended = ended;
                Ok(used)
            }
            Err(error) => {
                self.state = None;
                Err(error)
            }
        }
    }

    /// Ends the current message: inflates the §7.2.2 trailer, then releases the zlib state
    /// when the client does not take over context. With context takeover the state must
    /// stay, since the client's next message may refer back to this one.
    pub(crate) fn finish(&mut self, out: &mut Chunked, limit: usize) -> Result<(), InflateError> {
        let result = match &mut self.state {
            // The trailer is an empty stored block: nothing to do for a stream that has
            // not started, or that already ended.
            // What zlib still holds once its input is used is less than one match (258
            // bytes): the trailer needs no room of its own.
            Some(state) if !self.ended => {
                let mut unlimited = usize::MAX;
                inflate_into(state, &TRAILER, out, limit, &mut unlimited).map(drop)
            }
            _ => Ok(()),
        };
        // A stream that ended cannot go on; the next message starts a new one.
        if result.is_err() || self.ended || self.no_context_takeover {
            self.state = None;
        }
        self.ended = false;
        result
    }

    /// Whether zlib state is currently allocated.
    #[cfg(test)]
    pub(crate) fn holds_state(&self) -> bool {
        self.state.is_some()
    }
}

/// Runs `state` over `input`, appending to `out` until zlib has nothing more to give or
/// `out` may grow by no more than `room`: how much of `input` was used, and whether the
/// deflate stream ended.
fn inflate_into(
    state: &mut Decompress,
    mut input: &[u8],
    out: &mut Chunked,
    limit: usize,
    room: &mut usize,
) -> Result<(usize, bool), InflateError> {
    // One byte past the limit is how we learn the message is too large.
    let ceiling = limit.saturating_add(1);
    if out.len() > limit {
        return Err(InflateError::TooLarge);
    }
    let given = input.len();
    loop {
        if out.spare() == 0 {
            // Never past the ceiling nor the room; a few times the input for ordinary
            // data, doubling for data that keeps expanding so that the copies stay
            // linear (within a chunk: a full one is never copied).
            let step = (ceiling - out.len())
                .min(input.len().saturating_mul(4).max(4096).max(out.len()))
                .min(*room);
            if step == 0 {
                return Ok((given - input.len(), false));
            }
            *room = room.saturating_sub(out.reserve(step));
        }
        let (in_before, out_before) = (state.total_in(), state.total_out());
        let last = out.last_mut();
        let status = state
            .decompress_vec(input, last, FlushDecompress::None)
            .map_err(|_| InflateError::Corrupt)?;
        let stopped_with_space = last.len() < last.capacity();
        input = &input[consumed(in_before, state.total_in())..];
        if out.len() > limit {
            return Err(InflateError::TooLarge);
        }
        if status == Status::StreamEnd {
            return Ok((given, true));
        }
        // zlib stops only when it runs out of input or of output space: with space left
        // over it has given all it can.
        if stopped_with_space {
            if input.is_empty() {
                return Ok((given, false));
            }
            if (state.total_in(), state.total_out()) == (in_before, out_before) {
                // Input and space, yet no progress: not something valid data does.
                return Err(InflateError::Corrupt);
            }
        }
    }
}

/// The bytes zlib consumed between two `total_in` readings.
fn consumed(before: u64, after: u64) -> usize {
    usize::try_from(after - before)
        .expect("zlib consumes at most the input slice it was given, whose length is a usize")
}

thread_local! {
    /// Idle, reset compressors this thread has used, one per (level, window bits): each
    /// message is compressed from a fresh state, so they are shared by all connections.
    static COMPRESSORS: RefCell<Vec<(u32, u8, Compress)>> = const { RefCell::new(Vec::new()) };
}

/// Compresses one whole message for sending (§7.2.1) from a fresh state, appending the
/// payload to send (sync-flushed, trailer removed) to `out`.
pub(crate) fn deflate_message(payload: &[u8], params: &Params, out: &mut Vec<u8>) {
    deflate_pieces(std::iter::once(payload), payload.len(), params, out);
}

/// [`deflate_message`] for a message given in pieces, `len` bytes in all: a large
/// received message is compressed from its chunks, never copied into one buffer.
pub(crate) fn deflate_pieces<'a>(
    pieces: impl Iterator<Item = &'a [u8]>,
    len: usize,
    params: &Params,
    out: &mut Vec<u8>,
) {
    // Clamped so that a bad setting cannot make zlib panic; the config already checks.
    let level = params.level.min(9);
    let bits = params
        .server_window_bits
        .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    // Taken out of the cache while in use, so that a panic drops it instead of leaving a
    // half-used stream behind.
    let cached = COMPRESSORS
        .try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let index = cache
                .iter()
                .position(|(l, b, _)| (*l, *b) == (level, bits))?;
            Some(cache.swap_remove(index).2)
        })
        .ok()
        .flatten();
    let mut compressor = cached
        .unwrap_or_else(|| Compress::new_with_window_bits(Compression::new(level), false, bits));

    let start = out.len();
    // A guess for compressible data; incompressible data grows it below.
    out.reserve(len / 4 + 64);
    let mut left = len;
    let mut pieces = pieces.peekable();
    while let Some(mut input) = pieces.next() {
        // The message ends with a sync flush; the pieces before its last are only fed.
        let flush = if pieces.peek().is_some() {
            FlushCompress::None
        } else {
            FlushCompress::Sync
        };
        loop {
            // zlib asks for more than six bytes of space around a sync flush, or it may
            // write the flush marker twice (zlib.h, deflate()).
            if out.capacity() - out.len() < 64 {
                // What is left takes at most its own size plus stored-block headers (5
                // bytes per up to 64 KiB) and the flush; zlib may also hold some input it
                // has taken, so this is a guess, and the loop goes on until all is out.
                out.reserve(left + left / 8192 + 64);
            }
            let before = compressor.total_in();
            compressor
                .compress_vec(input, out, flush)
                .expect("deflate with valid parameters on a reset stream does not fail");
            let used = consumed(before, compressor.total_in());
            input = &input[used..];
            left = left.saturating_sub(used);
            // zlib returns with output space left only once its input is used and the
            // flush (if any) is complete.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    compressor.reset();
    // Ignored if the thread is exiting: the compressor is then simply dropped.
    let _ = COMPRESSORS.try_with(|cache| cache.borrow_mut().push((level, bits, compressor)));
    // A sync flush always ends with the trailer; the check only keeps a surprise valid.
    if out[start..].ends_with(&TRAILER) {
        out.truncate(out.len() - TRAILER.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, header::SEC_WEBSOCKET_EXTENSIONS};

    const DEFAULT_CONFIG: DeflateConfig = DeflateConfig {
        level: 1,
        threshold: 64,
        client_no_context_takeover: false,
        client_max_window_bits: None,
    };

    fn negotiate_with(values: &[&str], config: &DeflateConfig) -> Option<Agreed> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(value).unwrap(),
            );
        }
        negotiate(headers.get_all(SEC_WEBSOCKET_EXTENSIONS), config)
    }

    fn negotiate_values(values: &[&str]) -> Option<String> {
        negotiate_with(values, &DEFAULT_CONFIG).map(|agreed| agreed.response)
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

    fn config(no_context_takeover: bool, window_bits: Option<u8>) -> DeflateConfig {
        let mut config = DEFAULT_CONFIG;
        config.client_no_context_takeover = no_context_takeover;
        config.client_max_window_bits = window_bits;
        config
    }

    fn agree(offer: &str, config: &DeflateConfig) -> Agreed {
        negotiate_with(&[offer], config).expect("the offer is accepted")
    }

    #[test]
    fn default_params_inflate_any_window_and_keep_client_context() {
        let offer = "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9";
        let mut expected = params(10, false);
        (expected.client_window_bits, expected.threshold) = (15, 64);
        assert_eq!(agree(offer, &DEFAULT_CONFIG).params, expected);
    }

    #[test]
    fn operator_client_no_context_takeover_is_added_to_any_offer() {
        let agreed = agree("permessage-deflate", &config(true, None));
        let expected = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(agreed.response, expected);
        assert!(agreed.params.client_no_context_takeover);
    }

    #[test]
    fn operator_client_window_is_answered_only_when_offered() {
        let config = config(false, Some(10));
        let offered = agree("permessage-deflate; client_max_window_bits", &config);
        assert!(offered.response.ends_with("; client_max_window_bits=10"));
        assert_eq!(offered.params.client_window_bits, 10);
        let not_offered = agree("permessage-deflate", &config);
        assert!(!not_offered.response.contains("client_max_window_bits"));
        assert_eq!(not_offered.params.client_window_bits, 15);
    }

    /// An offered 8 is answered as is; zlib inflates it with a 9-bit window.
    #[test]
    fn operator_client_window_never_exceeds_the_offered_one() {
        for (offered, answered, inflater_bits) in [(12, 10, 10), (9, 9, 9), (8, 8, 9)] {
            let offer = format!("permessage-deflate; client_max_window_bits={offered}");
            let agreed = agree(&offer, &config(false, Some(10)));
            let expected = format!("; client_max_window_bits={answered}");
            assert!(agreed.response.ends_with(&expected), "{}", agreed.response);
            assert_eq!(agreed.params.client_window_bits, inflater_bits, "{offered}");
        }
    }

    #[test]
    fn response_parameters_come_in_a_fixed_order() {
        let offer = "permessage-deflate; client_max_window_bits; server_max_window_bits=10";
        assert_eq!(
            agree(offer, &config(true, Some(11))).response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=11"
        );
    }

    #[test]
    fn server_window_of_eight_stays_declined_with_operator_options() {
        let offer = "permessage-deflate; server_max_window_bits=8; client_max_window_bits";
        assert_eq!(negotiate_with(&[offer], &config(true, Some(9))), None);
    }

    const MIB: usize = 1 << 20;

    /// Both directions use `bits`; level 1, the server's default.
    fn params(bits: u8, client_no_context_takeover: bool) -> Params {
        let (server_window_bits, client_window_bits, level, threshold) = (bits, bits, 1, 0);
        Params {
            server_window_bits,
            client_window_bits,
            client_no_context_takeover,
            level,
            threshold,
        }
    }

    fn compress(payload: &[u8], params: &Params) -> Vec<u8> {
        let mut out = Vec::new();
        deflate_message(payload, params, &mut out);
        out
    }

    type Inflated = Result<Vec<u8>, InflateError>;

    /// Room for inflating without a cap.
    const UNLIMITED: usize = usize::MAX;

    /// Inflates one whole message that arrives in `pieces`.
    fn inflate_all(inflater: &mut Inflater, pieces: &[&[u8]], limit: usize) -> Inflated {
        let mut out = Chunked::default();
        for piece in pieces {
            inflater.inflate(piece, &mut out, limit, &mut { UNLIMITED })?;
        }
        inflater.finish(&mut out, limit)?;
        Ok(out.take_contiguous())
    }

    /// Inflates one whole message with a new inflater.
    fn inflate_new(params: &Params, pieces: &[&[u8]], limit: usize) -> Inflated {
        inflate_all(&mut Inflater::new(params), pieces, limit)
    }

    fn text(len: usize) -> Vec<u8> {
        let words = b"the quick brown fox jumps over the lazy dog, 0123456789; ";
        words.iter().copied().cycle().take(len).collect()
    }

    /// Incompressible bytes (xorshift64).
    fn random(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        };
        (0..len).map(|_| next()).collect()
    }

    #[test]
    fn small_message_round_trips_split_at_every_point() {
        let (payload, p) = (text(300), params(15, false));
        let compressed = compress(&payload, &p);
        for split in 0..=compressed.len() {
            let (head, tail) = compressed.split_at(split);
            assert_eq!(
                inflate_new(&p, &[head, tail], MIB),
                Ok(payload.clone()),
                "{split}"
            );
        }
    }

    #[test]
    fn large_message_round_trips_split_at_several_points() {
        let (payload, p) = (
            [text(50 * 1024), random(50 * 1024)].concat(),
            params(15, false),
        );
        let compressed = compress(&payload, &p);
        let len = compressed.len();
        let every_997: Vec<usize> = (1..len).step_by(997).collect();
        for splits in [&[][..], &[1], &[len / 3, len / 2, len - 1], &every_997] {
            let bounds: Vec<usize> = [0].iter().chain(splits).chain(&[len]).copied().collect();
            let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &compressed[w[0]..w[1]]).collect();
            assert_eq!(
                inflate_new(&p, &pieces, MIB),
                Ok(payload.clone()),
                "{splits:?}"
            );
        }
    }

    #[test]
    fn empty_message_compresses_to_a_single_zero_byte() {
        let p = params(15, true);
        let compressed = compress(b"", &p);
        assert_eq!(compressed, [0x00]);
        assert_eq!(inflate_new(&p, &[&compressed], 0), Ok(vec![]));
    }

    #[test]
    fn context_takeover_lets_the_second_message_refer_to_the_first() {
        // A client that keeps its compressor's window between messages.
        let mut client = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut client_message = |payload: &[u8]| {
            let mut out = Vec::with_capacity(payload.len() + 64);
            let flushed = client.compress_vec(payload, &mut out, FlushCompress::Sync);
            assert!(flushed.is_ok() && out.ends_with(&TRAILER));
            out.truncate(out.len() - TRAILER.len());
            out
        };
        let message = random(2000);
        let (first, second) = (client_message(&message), client_message(&message));
        assert!(second.len() < 100, "the second message is a back-reference");
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(
            inflate_all(&mut inflater, &[&first], MIB),
            Ok(message.clone())
        );
        assert!(inflater.holds_state());
        assert_eq!(inflate_all(&mut inflater, &[&second], MIB), Ok(message));
    }

    #[test]
    fn client_no_context_takeover_releases_state_after_each_message() {
        let p = params(15, true);
        let compressed = compress(&text(1000), &p);
        let mut inflater = Inflater::new(&p);
        assert!(!inflater.holds_state());
        let mut out = Chunked::default();
        inflater
            .inflate(&compressed, &mut out, MIB, &mut { UNLIMITED })
            .unwrap();
        assert!(inflater.holds_state());
        inflater.finish(&mut out, MIB).unwrap();
        assert!(!inflater.holds_state());
        assert_eq!(out.take_contiguous(), text(1000));
    }

    #[test]
    fn message_of_exactly_the_limit_inflates_and_one_more_byte_is_too_large() {
        let p = params(15, false);
        let compressed = compress(&text(1000), &p);
        assert_eq!(inflate_new(&p, &[&compressed], 1000), Ok(text(1000)));
        assert_eq!(
            inflate_new(&p, &[&compressed], 999),
            Err(InflateError::TooLarge)
        );
    }

    #[test]
    fn deflate_bomb_stops_at_the_limit_without_allocating_past_it() {
        let mut p = params(15, false);
        p.level = 9;
        let bomb = compress(&vec![0; 10 * MIB], &p);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        let mut inflater = Inflater::new(&p);
        let mut out = Chunked::default();
        let result = inflater.inflate(&bomb, &mut out, MIB, &mut { UNLIMITED });
        assert_eq!(result, Err(InflateError::TooLarge));
        assert!(out.capacity() <= MIB + 64 * 1024, "{}", out.capacity());
        assert!(!inflater.holds_state());
    }

    #[test]
    fn corrupt_input_is_reported() {
        // BFINAL=1 with the reserved block type 11.
        let result = inflate_new(&params(15, false), &[&[0xff; 16]], MIB);
        assert_eq!(result, Err(InflateError::Corrupt));
    }

    #[test]
    fn final_block_messages_from_rfc_7692_inflate_one_after_another() {
        // §7.2.3.4: "Hello" in a BFINAL block, then a padding byte for the trailer.
        let payload = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        let mut inflater = Inflater::new(&params(15, false));
        for _ in 0..2 {
            let inflated = inflate_all(&mut inflater, &[&payload], 100);
            assert_eq!(inflated.as_deref(), Ok(&b"Hello"[..]));
        }
    }

    #[test]
    fn incompressible_sixteen_mib_round_trips_and_grows() {
        let (payload, p) = (random(16 * MIB), params(15, true));
        let compressed = compress(&payload, &p);
        assert!(compressed.len() > payload.len(), "block headers");
        assert_eq!(inflate_new(&p, &[&compressed], 16 * MIB), Ok(payload));
    }

    #[test]
    fn nine_bit_windows_round_trip_with_a_reused_compressor() {
        // Repeats 100 and 1000 bytes back. zlib checks distances against the window only
        // across calls, so the message goes in 16-byte pieces: then a 9-bit inflater
        // rejects a 15-bit stream, and accepts a 9-bit one, also from a reset compressor.
        let payload = [random(100).repeat(3), random(1000).repeat(2)].concat();
        let p = params(9, false);
        let inflate_pieces = |compressed: &[u8]| {
            let pieces: Vec<&[u8]> = compressed.chunks(16).collect();
            inflate_new(&p, &pieces, MIB)
        };
        let wide = compress(&payload, &params(15, false));
        assert_eq!(inflate_pieces(&wide), Err(InflateError::Corrupt));
        for _ in 0..2 {
            assert_eq!(inflate_pieces(&compress(&payload, &p)), Ok(payload.clone()));
        }
    }
}
