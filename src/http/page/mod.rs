//! `GET /`: the echo page, compiled into the binary so that it works wherever the
//! binary goes. The page builds its WebSocket URL from `location` (ws: or wss:, same
//! host and port, path `/ws`) and loads nothing from elsewhere but `/controls`, for
//! its builder of test controls.

use axum::response::Html;

/// The page itself.
const INDEX_HTML: &str = include_str!("index.html");

/// `GET /`: the echo page.
pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

#[cfg(test)]
mod tests {
    use super::INDEX_HTML;

    /// The page must work offline and behind any proxy: no script, style, font or image
    /// from another origin, and no absolute URL of its own. tests/browser.rs checks the
    /// behaviour in Chromium; this catches a CDN link without starting a browser.
    #[test]
    fn page_loads_nothing_from_elsewhere() {
        for needle in [
            "http://",
            "https://",
            "ws://localhost",
            "<link",
            "@import",
            "url(",
        ] {
            assert!(
                !INDEX_HTML.contains(needle),
                "index.html contains {needle:?}"
            );
        }
    }

    #[test]
    fn page_builds_its_websocket_url_from_location() {
        assert!(INDEX_HTML.contains(r#"location.protocol === "https:" ? "wss://" : "ws://""#));
        assert!(INDEX_HTML.contains(r#"location.host + "/ws""#));
    }
}
