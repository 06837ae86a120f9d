//! Origin policy: which web pages may open a WebSocket here.
//!
//! By default every origin is allowed. An echo server holds no secret and no session, so
//! cross-site WebSocket hijacking (CSWSH) has nothing to steal, and developers routinely
//! test pages served from another port against a local echo server. `--allowed-origin`
//! restricts it: a browser's handshake whose `Origin` matches none of the patterns gets
//! 403. Clients that send no `Origin` (everything but browsers) are not affected: the
//! header only protects browser users, and any other client can send whatever it likes.

/// One `--allowed-origin` pattern: an origin such as `https://app.example.com`, where
/// `*` stands for any run of characters other than `/` (so `https://*.example.com`
/// matches every subdomain, and `http://localhost:*` every port). `*` alone matches
/// every origin, including `null`. Matching ignores ASCII case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern(String);

impl OriginPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    ///
    /// A message when the pattern is empty, has a path, or has characters an origin
    /// cannot have.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err("an empty --allowed-origin pattern".into());
        }
        if pattern != "*" && pattern != "null" {
            let rest = pattern
                .split_once("://")
                .map(|(_, rest)| rest)
                .ok_or_else(|| {
                    format!("--allowed-origin {pattern:?} needs a scheme, like https://")
                })?;
            if rest.is_empty() || rest.contains('/') {
                return Err(format!(
                    "--allowed-origin {pattern:?} is not an origin (scheme://host[:port])"
                ));
            }
        }
        if !pattern.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "--allowed-origin {pattern:?} has characters an origin cannot have"
            ));
        }
        Ok(Self(pattern.to_ascii_lowercase()))
    }

    /// Whether `origin` (the request's `Origin` header) matches.
    pub(crate) fn matches(&self, origin: &str) -> bool {
        self.0 == "*" || glob(self.0.as_bytes(), origin.to_ascii_lowercase().as_bytes())
    }
}

/// Matches `text` against `pattern`, where `*` matches any run of bytes without `/`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            // Try every split point up to the next '/'.
            let limit = text.iter().position(|&b| b == b'/').unwrap_or(text.len());
            (0..=limit).any(|skip| glob(rest, &text[skip..]))
        }
        Some((first, rest)) => text
            .split_first()
            .is_some_and(|(t, text)| t == first && glob(rest, text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> OriginPattern {
        OriginPattern::parse(p).unwrap()
    }

    #[test]
    fn exact_origins_match_without_regard_to_case() {
        assert!(pattern("https://app.example.com").matches("https://APP.example.com"));
        assert!(!pattern("https://app.example.com").matches("https://app.example.com:8443"));
        assert!(!pattern("https://app.example.com").matches("http://app.example.com"));
    }

    #[test]
    fn wildcard_subdomains_match_any_depth_but_not_the_bare_domain_or_lookalikes() {
        let p = pattern("https://*.example.com");
        assert!(p.matches("https://a.example.com"));
        assert!(p.matches("https://a.b.example.com"));
        assert!(!p.matches("https://example.com"));
        assert!(!p.matches("https://evil-example.com"));
        assert!(!p.matches("https://example.com.evil.net"));
    }

    #[test]
    fn wildcard_ports_and_star_alone() {
        assert!(pattern("http://localhost:*").matches("http://localhost:5173"));
        assert!(!pattern("http://localhost:*").matches("http://localhost.evil.net"));
        assert!(pattern("*").matches("null"));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in [
            "",
            "example.com",
            "https://example.com/path",
            "https://",
            "https://a b",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
