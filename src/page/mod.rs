//! `GET /`: the echo page, compiled into the binary so that it works wherever the
//! binary goes. The page builds its WebSocket URL from `location` (ws: or wss:, same
//! host and port, path `/ws`) and loads nothing from elsewhere.

use axum::response::Html;

/// The page itself.
const INDEX_HTML: &str = include_str!("index.html");

/// `GET /`: the echo page.
pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}
