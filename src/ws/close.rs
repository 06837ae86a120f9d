//! Close codes (RFC 6455 §7.4) and the one table that maps every protocol violation a
//! client can commit to the code and reason of the Close the server answers with.

/// A rule of RFC 6455 or RFC 7692 that a client broke, or a limit it went past. Named
/// after the rule, so that a log line says what the client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// RSV2 or RSV3 set: no extension that uses them was agreed (§5.2).
    ReservedBits,
    /// RSV1 where permessage-deflate does not allow it: not agreed, or on a control or
    /// continuation frame (RFC 7692 §6.1).
    MisplacedRsv1,
    /// Opcodes 3–7 and 0xB–0xF (§5.2).
    ReservedOpcode,
    /// A control frame without FIN (§5.5).
    FragmentedControl,
    /// A control frame of more than 125 bytes (§5.5).
    OversizedControl,
    /// A client frame without a masking key (§5.1).
    Unmasked,
    /// A continuation frame with no message to continue (§5.4).
    UnexpectedContinuation,
    /// A new data message before the previous one ended (§5.4).
    UnfinishedMessage,
    /// A Close payload of one byte (§5.5.1).
    CloseTooShort,
    /// A close code a peer may not send (§7.4).
    InvalidCloseCode,
    /// Text (or a Close reason) that is not UTF-8 (§8.1).
    InvalidUtf8,
    /// A compressed message whose payload does not inflate (RFC 7692 §6.2).
    InvalidDeflate,
    /// A frame or message over the configured size limit.
    TooBig,
}

impl Violation {
    /// The close code the server answers with (§7.4.1).
    pub(crate) fn close_code(self) -> u16 {
        match self {
            // 1007: "data within a message that was not consistent with the type of the
            // message". A payload that does not inflate is such data; 1011 would blame
            // the server.
            Self::InvalidUtf8 | Self::InvalidDeflate => 1007,
            Self::TooBig => 1009,
            _ => 1002,
        }
    }

    /// The reason sent in the Close frame: the rule broken, in words a client developer
    /// can search for. At most 123 bytes (§5.5.1).
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ReservedBits => "RSV2 or RSV3 set",
            Self::MisplacedRsv1 => "RSV1 set on a frame that may not carry it",
            Self::ReservedOpcode => "reserved opcode",
            Self::FragmentedControl => "fragmented control frame",
            Self::OversizedControl => "control frame payload over 125 bytes",
            Self::Unmasked => "client frame not masked",
            Self::UnexpectedContinuation => "continuation frame with no message to continue",
            Self::UnfinishedMessage => "new message before the previous one ended",
            Self::CloseTooShort => "close frame payload of one byte",
            Self::InvalidCloseCode => "invalid close code",
            Self::InvalidUtf8 => "text is not valid UTF-8",
            Self::InvalidDeflate => "invalid permessage-deflate data",
            Self::TooBig => "message exceeds the size limit",
        }
    }
}

/// Whether a peer may send `code` in a Close frame (§7.4.1, §7.4.2, and the IANA
/// registry): 1004–1006 and 1015 are reserved, 1016–2999 unassigned.
pub(crate) fn is_sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A Close frame's payload, parsed: `None` for an empty one (the code is then 1005,
/// "no status", for logs).
///
/// # Errors
///
/// [`Violation::CloseTooShort`], [`Violation::InvalidCloseCode`] or
/// [`Violation::InvalidUtf8`] for the reason.
pub(crate) fn parse_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::CloseTooShort),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !is_sendable(code) {
                return Err(Violation::InvalidCloseCode);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_in_a_close_frame() {
        for violation in [
            Violation::ReservedBits,
            Violation::MisplacedRsv1,
            Violation::UnexpectedContinuation,
            Violation::UnfinishedMessage,
            Violation::TooBig,
        ] {
            assert!(violation.reason().len() <= 123);
        }
    }

    #[test]
    fn close_codes_follow_the_registry() {
        for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(is_sendable(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_sendable(code), "{code}");
        }
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_payload(&[]), Ok(None));
        assert_eq!(parse_payload(&[3]), Err(Violation::CloseTooShort));
        assert_eq!(parse_payload(&[3, 232, b'o', b'k']), Ok(Some((1000, "ok"))));
        assert_eq!(parse_payload(&[3, 237]), Err(Violation::InvalidCloseCode));
        assert_eq!(parse_payload(&[3, 232, 0xFF]), Err(Violation::InvalidUtf8));
    }
}
