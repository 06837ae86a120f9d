//! Everything before a WebSocket exists: the accept loop and its caps (`server`), TLS,
//! the router and its state, the page, the origin policy, connection caps (WebSockets
//! in `limits`, TCP connections in `tcp`), the opt-in
//! greeting, and the upgrade that hands a connection to `ws`.

pub(crate) mod app;
pub(crate) mod h2;
pub(crate) mod hello;
pub(crate) mod limits;
pub(crate) mod origin;
pub(crate) mod page;
pub(crate) mod preface;
pub(crate) mod server;
pub(crate) mod state;
pub(crate) mod tcp;
pub(crate) mod tls;
pub(crate) mod upgrade;
