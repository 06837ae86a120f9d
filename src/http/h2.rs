//! HTTP/2 (RFC 9113), served with the `h2` crate. Requests go to the router as
//! HTTP/1.1 ones do. A WebSocket (RFC 8441 extended CONNECT) that the router accepts
//! gets its stream as a [`Tunnel`], which the WebSocket driver reads and writes like a
//! socket.
//!
//! We serve HTTP/2 ourselves rather than through hyper for the WebSocket's sake: hyper
//! hands an upgraded HTTP/2 stream over through a channel and a task of its own, and a
//! dropped one always ends with END_STREAM. The `drop` control must reset the stream
//! (RST_STREAM), as it resets the TCP connection on HTTP/1.1; here the driver owns the
//! stream, so dropping it without ending it does.

use std::{
    future::{Future, poll_fn},
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::{Body, HttpBody},
    extract::Request,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream, server::SendResponse};
use http_body::Frame;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};
use tracing::debug;

use crate::ws::driver::Transport;

/// Per-stream receive window: what a client may send on one stream before the server
/// reads it. What h2 holds unread is outside the buffer budget, so the windows are part
/// of the per-connection constant of the memory bound (README); hyper's 1 MiB let 200
/// HTTP/2 WebSockets that never read their echoes hold 220 MiB. 128 KiB still carries
/// about 2.5 MB/s per connection at a 50 ms round trip.
const STREAM_WINDOW: u32 = 128 * 1024;
/// The connection's receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 128 * 1024;
/// Streams a client may have open at once on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// The largest header block a client may send, decoded.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// What one stream may have queued in h2 for sending beyond what the socket took (the
/// client's window permitting): like a socket's send buffer, outside the budget.
const MAX_SEND_BUFFER: usize = 64 * 1024;
/// How long a WebSocket's stream outlives the driver's hold on it before the stream is
/// let go (a reset, unless it was ended). h2 discards the DATA still queued on a stream
/// reset with CANCEL, and the connection's task takes it off the queue only when it
/// next runs: this gives it that turn, so that the echoes written before a `drop` reach
/// the client ahead of the reset. Data that waits for the client's flow-control window
/// longer than this is reset with the stream.
const RESET_GRACE: Duration = Duration::from_millis(20);

/// Why the caller wants the connection to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Close now (no request came in time).
    Now,
    /// GOAWAY: finish the streams open, take no new ones.
    Gracefully,
}

/// The HTTP/2 keepalive: a PING every `interval`, and the connection closed when its
/// PONG is `timeout` late (a peer that vanished without a FIN).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keepalive {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// Serves HTTP/2 on `io`, whose first bytes are the client's preface, until the client
/// leaves, the keepalive gives up, or `stop` says so. Each request is answered by
/// `handler` in a task of its own.
pub(crate) async fn serve<I, H, A>(
    io: I,
    handler: H,
    stop: impl Future<Output = Stop>,
    keepalive: Option<Keepalive>,
) -> Result<(), h2::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request) -> A,
    A: Future<Output = Response> + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_connect_protocol()
        .handshake::<_, Bytes>(io)
        .await?;
    let ping_pong = connection
        .ping_pong()
        .expect("invariant: the ping handle is taken once, here");
    let mut keepalive = pin!(keep_alive(ping_pong, keepalive));
    let mut stop = pin!(stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    tokio::spawn(answer(request, respond, &handler));
                }
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
            stop = &mut stop, if !stopping => match stop {
                Stop::Now => return Ok(()),
                Stop::Gracefully => {
                    stopping = true;
                    connection.graceful_shutdown();
                }
            },
            () = &mut keepalive => {
                debug!("HTTP/2 keepalive PING unanswered; closing");
                return Ok(());
            }
        }
    }
}

/// Pings every interval; returns when a PONG is late or the ping cannot be sent (the
/// connection is going). Never returns without a keepalive.
async fn keep_alive(mut ping_pong: PingPong, keepalive: Option<Keepalive>) {
    let Some(Keepalive { interval, timeout }) = keepalive else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// A WebSocket's stream, for the upgrade handler: the stream arrives once the router's
/// 200 is sent. Put in the CONNECT request's extensions, where hyper puts its upgrade
/// (which must be `Clone`: the receiver is shared, and taken once).
#[derive(Debug, Clone)]
pub(crate) struct OnTunnel(Arc<Mutex<Option<oneshot::Receiver<Tunnel>>>>);

impl OnTunnel {
    /// The stream, once the answer is sent; `None` when the answer was not a success,
    /// the stream was gone before it, or the stream was already taken.
    pub(crate) async fn stream(self) -> Option<Tunnel> {
        let receiver = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        receiver.await.ok()
    }
}

/// Answers one request: through the router, and for an extended CONNECT that it
/// accepts, by handing the stream to the WebSocket.
fn answer<H, A>(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: &H,
) -> impl Future<Output = ()> + Send + 'static
where
    H: Fn(Request) -> A,
    A: Future<Output = Response> + Send + 'static,
{
    let (mut parts, recv) = request.into_parts();
    let head_only = parts.method == Method::HEAD;
    let mut tunnel = None;
    let body = if parts.method == Method::CONNECT
        && parts.extensions.get::<h2::ext::Protocol>().is_some()
    {
        let (sender, receiver) = oneshot::channel();
        parts
            .extensions
            .insert(OnTunnel(Arc::new(Mutex::new(Some(receiver)))));
        tunnel = Some((sender, recv));
        Body::empty()
    } else {
        Body::new(Incoming {
            recv,
            data_done: false,
        })
    };
    let answered = handler(Request::from_parts(parts, body));
    async move {
        let response = answered.await;
        let (mut head, body) = response.into_parts();
        strip_connection_headers(&mut head.headers);
        if let Some((sender, recv)) = tunnel {
            if head.status.is_success() {
                match respond.send_response(Response::from_parts(head, ()), false) {
                    Ok(send) => {
                        let (held, released) = oneshot::channel();
                        let _ = sender.send(Tunnel {
                            send,
                            recv,
                            unread: Bytes::new(),
                            ended: false,
                            _held: held,
                        });
                        // `respond` keeps the stream from being reset until the tunnel
                        // is dropped (or never taken), and a little longer.
                        let _ = released.await;
                        tokio::time::sleep(RESET_GRACE).await;
                        drop(respond);
                    }
                    Err(error) => debug!(%error, "HTTP/2 WebSocket gone before its answer"),
                }
                return;
            }
        }
        // As hyper does; never on a status that has no content (RFC 9110 §8.6).
        let has_content = !(head.status.is_informational()
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED);
        if let (true, Some(length)) = (has_content, body.size_hint().exact()) {
            if !head.headers.contains_key(header::CONTENT_LENGTH) {
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
        }
        let end = head_only || body.is_end_stream();
        match respond.send_response(Response::from_parts(head, ()), end) {
            Ok(send) if !end => {
                if let Err(error) = send_body(body, send).await {
                    debug!(%error, "HTTP/2 response body not sent");
                }
            }
            Ok(_) => {}
            Err(error) => debug!(%error, "HTTP/2 response not sent"),
        }
    }
}

/// Headers that HTTP/2 forbids in a response (RFC 9113 §8.2.2); h2 refuses a response
/// that carries them.
fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// Sends a response body as the client's flow-control window allows.
async fn send_body(mut body: Body, mut send: SendStream<Bytes>) -> io::Result<()> {
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                send.send_reset(Reason::INTERNAL_ERROR);
                return Err(io::Error::other(error));
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let room = poll_fn(|cx| poll_room(&mut send, cx)).await?;
                    let chunk = data.split_to(room.min(data.len()));
                    send.send_data(chunk, false).map_err(into_io)?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return send.send_trailers(trailers).map_err(into_io);
                }
            }
        }
    }
    send.send_data(Bytes::new(), true).map_err(into_io)
}

/// Waits until the stream may send at least one byte; how many it may.
fn poll_room(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        let room = send.capacity();
        if room > 0 {
            return Poll::Ready(Ok(room));
        }
        // Wakes when capacity was assigned, which may already have been used up: the
        // loop looks again.
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "HTTP/2 stream closed",
                )));
            }
        }
    }
}

fn into_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .expect("invariant: is_io says an I/O error is inside")
    } else {
        io::Error::other(error)
    }
}

/// A request body as the router takes it; what is read is given back to the client's
/// window at once.
struct Incoming {
    recv: RecvStream,
    data_done: bool,
}

impl HttpBody for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// An HTTP/2 WebSocket's stream as a byte stream. Reads give DATA frames' payloads
/// (each given back to the client's window once taken); writes become DATA frames as
/// the window allows; shutdown sends END_STREAM. Dropped without a shutdown (the `drop`
/// control, a connection given up), the stream is reset with RST_STREAM CANCEL,
/// [`RESET_GRACE`] later: h2 resets a stream that nobody holds any more.
#[derive(Debug)]
pub(crate) struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the DATA frame being read.
    unread: Bytes,
    /// END_STREAM was sent.
    ended: bool,
    /// Dropped with the tunnel: tells the request's task to let go of the stream.
    _held: oneshot::Sender<()>,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                // A client that resets its stream without error has simply gone.
                Some(Err(error))
                    if matches!(error.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let taken = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread[..taken]);
        self.unread.advance(taken);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let room = ready!(poll_room(&mut self.send, cx))?;
        let taken = room.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..taken]), false)
            .map_err(into_io)?;
        Poll::Ready(Ok(taken))
    }

    /// h2's connection task writes what was handed to it.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(into_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A drop already resets the stream; the peer's reset or END_STREAM is seen by reading.
impl Transport for Tunnel {}
