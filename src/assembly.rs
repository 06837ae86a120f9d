//! Message reassembly (RFC 6455 §5.4): turns the frames of a fragmented message into one
//! message, enforces the message size limit, and validates text as UTF-8 as fragments
//! arrive, so that invalid text fails at the first bad fragment (§8.1), not at the end.
//!
//! The engine has a reassembly layer of its own, but it returns its errors (invalid
//! UTF-8, a continuation with nothing to continue, an oversized message) without sending
//! a Close, and it validates text only once the whole message is in. This module knows
//! no engine: it sees opcodes, FIN bits and payloads, and answers with a message or with
//! the close code the connection must fail with.

use bytes::{Bytes, BytesMut};

/// The kind of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UTF-8 text (opcode 0x1).
    Text,
    /// Binary data (opcode 0x2).
    Binary,
}

/// A frame's place in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The first (or only) frame of a message of this kind.
    First(Kind),
    /// A continuation frame (opcode 0x0).
    Continuation,
}

/// Why a message was refused: the close code and reason to fail the connection with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    /// 1002 (protocol error), 1007 (invalid text) or 1009 (too big).
    pub(crate) code: u16,
    /// Sent as the Close reason.
    pub(crate) reason: &'static str,
}

const UNEXPECTED_CONTINUATION: Failure = Failure {
    code: 1002,
    reason: "continuation frame with no message to continue",
};
const INTERLEAVED_MESSAGE: Failure = Failure {
    code: 1002,
    reason: "new message before the previous one finished",
};
const INVALID_UTF8: Failure = Failure {
    code: 1007,
    reason: "text message is not valid UTF-8",
};
const TOO_BIG: Failure = Failure {
    code: 1009,
    reason: "message exceeds the size limit",
};

/// Reassembles one connection's messages. Holds no memory between messages: the buffer
/// of a fragmented message is handed off whole when the message completes.
#[derive(Debug)]
pub(crate) struct Assembler {
    /// Largest message accepted, in bytes.
    max_message_size: usize,
    /// The kind of the message being reassembled, if one is.
    partial: Option<Kind>,
    /// The fragments so far.
    buffer: BytesMut,
    /// How many leading bytes of `buffer` are known to be complete, valid UTF-8.
    valid_utf8: usize,
}

impl Assembler {
    /// An assembler that refuses messages over `max_message_size` bytes.
    pub(crate) fn new(max_message_size: usize) -> Self {
        Self {
            max_message_size,
            partial: None,
            buffer: BytesMut::new(),
            valid_utf8: 0,
        }
    }

    /// Whether a fragmented message is open.
    pub(crate) fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes one data frame. Returns the whole message when `fin` completes one, `None`
    /// while a fragmented message is still open, or the failure to close with.
    pub(crate) fn push(
        &mut self,
        part: Part,
        fin: bool,
        payload: Bytes,
    ) -> Result<Option<(Kind, Bytes)>, Failure> {
        match (part, self.partial) {
            (Part::Continuation, None) => Err(UNEXPECTED_CONTINUATION),
            (Part::First(_), Some(_)) => Err(INTERLEAVED_MESSAGE),
            (Part::First(kind), None) if fin => {
                // The common case: a whole message in one frame, passed on without a copy.
                if payload.len() > self.max_message_size {
                    return Err(TOO_BIG);
                }
                if kind == Kind::Text && !is_utf8(&payload) {
                    return Err(INVALID_UTF8);
                }
                Ok(Some((kind, payload)))
            }
            (Part::First(kind), None) => {
                self.partial = Some(kind);
                self.append(&payload)?;
                Ok(None)
            }
            (Part::Continuation, Some(kind)) => {
                self.append(&payload)?;
                if !fin {
                    return Ok(None);
                }
                if kind == Kind::Text && self.valid_utf8 != self.buffer.len() {
                    // The message ended inside a UTF-8 sequence.
                    return Err(INVALID_UTF8);
                }
                self.partial = None;
                self.valid_utf8 = 0;
                Ok(Some((kind, std::mem::take(&mut self.buffer).freeze())))
            }
        }
    }

    /// Appends a fragment, checking the size limit and, for text, that everything up to
    /// a possibly unfinished last character is valid UTF-8.
    fn append(&mut self, payload: &[u8]) -> Result<(), Failure> {
        if self.buffer.len() + payload.len() > self.max_message_size {
            return Err(TOO_BIG);
        }
        self.buffer.extend_from_slice(payload);
        if self.partial == Some(Kind::Text) {
            match std::str::from_utf8(&self.buffer[self.valid_utf8..]) {
                Ok(valid) => self.valid_utf8 += valid.len(),
                // An error with no length is a sequence cut off by the fragment's end:
                // the next fragment may finish it.
                Err(error) if error.error_len().is_none() => self.valid_utf8 += error.valid_up_to(),
                Err(_) => return Err(INVALID_UTF8),
            }
        }
        Ok(())
    }
}

/// Whether `bytes` is valid UTF-8. ASCII, most of what is sent as text, is checked
/// word by word first: `from_utf8` alone spends ~170 instructions on a 20-byte message
/// (callgrind, echo_load W1p), `is_ascii` ~25. Text with non-ASCII characters pays for
/// the ASCII prefix twice, which `is_ascii` scans at about 8 bytes per instruction.
pub(crate) fn is_utf8(bytes: &[u8]) -> bool {
    bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(data: &[u8]) -> Bytes {
        Bytes::copy_from_slice(data)
    }

    #[test]
    fn single_frame_message_passes_through() {
        let mut assembler = Assembler::new(16);
        let message = assembler
            .push(Part::First(Kind::Binary), true, bytes(&[0xFF, 0]))
            .unwrap();
        assert_eq!(message, Some((Kind::Binary, bytes(&[0xFF, 0]))));
    }

    #[test]
    fn fragments_are_joined_in_order() {
        let mut assembler = Assembler::new(16);
        assert_eq!(
            assembler.push(Part::First(Kind::Text), false, bytes(b"Hel")),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::Continuation, false, bytes(b"")),
            Ok(None)
        );
        let message = assembler
            .push(Part::Continuation, true, bytes(b"lo"))
            .unwrap();
        assert_eq!(message, Some((Kind::Text, bytes(b"Hello"))));
        // The assembler is ready for the next message.
        assert_eq!(
            assembler.push(Part::First(Kind::Text), true, bytes(b"x")),
            Ok(Some((Kind::Text, bytes(b"x"))))
        );
    }

    #[test]
    fn character_split_across_fragments_is_valid() {
        let euro = "€".as_bytes();
        let mut assembler = Assembler::new(16);
        assert_eq!(
            assembler.push(Part::First(Kind::Text), false, bytes(&euro[..1])),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::Continuation, false, bytes(&euro[1..2])),
            Ok(None)
        );
        let message = assembler
            .push(Part::Continuation, true, bytes(&euro[2..]))
            .unwrap();
        assert_eq!(message, Some((Kind::Text, bytes(euro))));
    }

    #[test]
    fn invalid_utf8_fails_at_the_first_bad_fragment() {
        let mut assembler = Assembler::new(64);
        assert_eq!(
            assembler.push(Part::First(Kind::Text), false, bytes(b"ok")),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::Continuation, false, bytes(&[0xCE, 0xBA, 0xFF])),
            Err(INVALID_UTF8)
        );
    }

    #[test]
    fn text_ending_inside_a_character_is_invalid() {
        let mut assembler = Assembler::new(64);
        assert_eq!(
            assembler.push(Part::First(Kind::Text), false, bytes(b"a")),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::Continuation, true, bytes(&[0xE2, 0x82])),
            Err(INVALID_UTF8)
        );
        assert_eq!(
            Assembler::new(8).push(Part::First(Kind::Text), true, bytes(&[0xE2])),
            Err(INVALID_UTF8)
        );
    }

    #[test]
    fn binary_is_never_checked_as_text() {
        let mut assembler = Assembler::new(64);
        assert_eq!(
            assembler.push(Part::First(Kind::Binary), false, bytes(&[0xFF])),
            Ok(None)
        );
        assert!(
            assembler
                .push(Part::Continuation, true, bytes(&[0xFE]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn continuation_without_a_message_is_a_protocol_error() {
        assert_eq!(
            Assembler::new(8).push(Part::Continuation, true, bytes(b"x")),
            Err(UNEXPECTED_CONTINUATION)
        );
    }

    #[test]
    fn new_message_inside_a_fragmented_one_is_a_protocol_error() {
        let mut assembler = Assembler::new(8);
        assert_eq!(
            assembler.push(Part::First(Kind::Text), false, bytes(b"a")),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::First(Kind::Text), true, bytes(b"b")),
            Err(INTERLEAVED_MESSAGE)
        );
    }

    #[test]
    fn size_limit_counts_every_fragment_and_allows_exactly_the_limit() {
        let mut assembler = Assembler::new(4);
        assert_eq!(
            assembler.push(Part::First(Kind::Binary), false, bytes(b"ab")),
            Ok(None)
        );
        assert!(
            assembler
                .push(Part::Continuation, true, bytes(b"cd"))
                .unwrap()
                .is_some()
        );
        assert_eq!(
            assembler.push(Part::First(Kind::Binary), false, bytes(b"abc")),
            Ok(None)
        );
        assert_eq!(
            assembler.push(Part::Continuation, true, bytes(b"de")),
            Err(TOO_BIG)
        );
        assert_eq!(
            Assembler::new(4).push(Part::First(Kind::Binary), true, bytes(b"abcde")),
            Err(TOO_BIG)
        );
    }
}
