//! Incremental UTF-8 validation: text arrives in pieces cut anywhere, even inside a
//! character, and RFC 6455 §8.1 wants a connection failed as soon as the bytes
//! received so far cannot begin valid UTF-8 ("fail fast", Autobahn 6.4.x).

/// Whether `bytes` are UTF-8, checking for ASCII first: most text is, and the ASCII
/// check costs a tenth of the full one on short messages (callgrind, echo_load W1p).
pub(crate) fn is_utf8(bytes: &[u8]) -> bool {
    bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()
}

/// Validates one text message piece by piece.
#[derive(Debug, Default)]
pub(crate) struct Utf8Validator {
    /// The start of a character that the last piece cut.
    partial: [u8; 4],
    /// How many bytes of `partial` are used (0–3).
    len: u8,
}

/// The bytes received cannot begin valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidUtf8;

impl Utf8Validator {
    /// Checks the next piece of the message.
    ///
    /// # Errors
    ///
    /// [`InvalidUtf8`] as soon as a byte makes the text invalid, even if the character
    /// it belongs to is not complete yet.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.len > 0 {
            let used = usize::from(self.len);
            let width = char_width(self.partial[0]);
            let take = (width - used).min(bytes.len());
            self.partial[used..used + take].copy_from_slice(&bytes[..take]);
            self.len += take as u8;
            bytes = &bytes[take..];
            match std::str::from_utf8(&self.partial[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                // Still cut: the piece ended before the character did.
                Err(error) if error.error_len().is_none() => return Ok(()),
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(error) if error.error_len().is_none() => {
                let tail = &bytes[error.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Whether the text so far ends at a character boundary: a message that ends while
    /// this is false is invalid.
    pub(crate) fn is_complete(&self) -> bool {
        self.len == 0
    }
}

/// The length of a character from its first byte. Only called on a byte that
/// `from_utf8` accepted as the start of a cut character (0xC2–0xF4).
fn char_width(first: u8) -> usize {
    match first {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(bytes: &[u8], cuts: &[usize]) -> Result<bool, InvalidUtf8> {
        let mut validator = Utf8Validator::default();
        let mut start = 0;
        for &cut in cuts.iter().chain([bytes.len()].iter()) {
            validator.feed(&bytes[start..cut])?;
            start = cut;
        }
        Ok(validator.is_complete())
    }

    #[test]
    fn valid_text_passes_at_every_pair_of_split_points() {
        let text = "κόσμε €𝄞 ok".as_bytes();
        for a in 0..=text.len() {
            for b in a..=text.len() {
                assert_eq!(feed_split(text, &[a, b]), Ok(true), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn a_bad_byte_fails_in_the_piece_that_carries_it() {
        // U+10FFFF + 1: 0xF4 0x90 can begin no character, so the second byte fails.
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"ok\xF4"), Ok(()));
        assert_eq!(validator.feed(b"\x90"), Err(InvalidUtf8));
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"\xCE\xBA\xFF"), Err(InvalidUtf8));
    }

    #[test]
    fn text_that_ends_inside_a_character_is_incomplete() {
        assert_eq!(feed_split("€".as_bytes(), &[1]).map(|_| ()), Ok(()));
        assert_eq!(feed_split(&"€".as_bytes()[..2], &[1]), Ok(false));
    }
}
