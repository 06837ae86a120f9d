//! Which HTTP a connection speaks, told from its first bytes: HTTP/2 begins with the
//! connection preface (RFC 9113 §3.4), with prior knowledge on plain TCP and after ALPN
//! `h2` on TLS alike; anything else is served as HTTP/1.1. [`Rewind`] hands the bytes
//! read to tell back to whichever protocol serves the connection.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::ws::driver::Transport;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Http {
    One,
    Two,
}

/// Reads until the bytes differ from the HTTP/2 preface or complete it, then returns the
/// protocol and the stream with those bytes put back. A peer that closes first is
/// served as HTTP/1.1, which answers it (or not) as it would any short request.
pub(crate) async fn sniff<I: AsyncRead + Unpin>(mut io: I) -> io::Result<(Http, Rewind<I>)> {
    let mut seen = [0; PREFACE.len()];
    let mut filled = 0;
    while filled < PREFACE.len() {
        let read = io.read(&mut seen[filled..]).await?;
        if read == 0 {
            break;
        }
        filled += read;
        if seen[..filled] != PREFACE[..filled] {
            break;
        }
    }
    let http = if seen == *PREFACE {
        Http::Two
    } else {
        Http::One
    };
    Ok((
        http,
        Rewind {
            seen,
            at: 0,
            // At most 24.
            end: filled as u8,
            inner: io,
        },
    ))
}

/// A stream that yields the bytes [`sniff`] read before reading on. The bytes live
/// inline: at most 24 of them, once per connection.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    seen: [u8; PREFACE.len()],
    at: u8,
    end: u8,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.end {
            let (at, end) = (usize::from(self.at), usize::from(self.end));
            let taken = buf.remaining().min(end - at);
            buf.put_slice(&self.seen[at..at + taken]);
            // `taken` is at most 24.
            self.at += taken as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An upgraded HTTP/1.1 connection keeps its rewind layer (hyper has read the preface
/// bytes back long before: a handshake is longer than 24 bytes); its socket answers.
impl<I: Transport> Transport for Rewind<I> {
    fn peer_closed(&self) -> bool {
        self.at == self.end && self.inner.peer_closed()
    }

    fn reset_on_drop(&self) {
        self.inner.reset_on_drop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(sent: &[u8], close: bool) -> (Http, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(sent).await.expect("write");
        if close {
            client.shutdown().await.expect("shutdown");
        }
        let (http, mut rewound) = sniff(server).await.expect("sniff");
        drop(client);
        let mut back = Vec::new();
        rewound.read_to_end(&mut back).await.expect("read");
        (http, back)
    }

    #[tokio::test]
    async fn the_preface_means_http2_and_every_byte_comes_back() {
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        assert_eq!(sniffed(&sent, false).await, (Http::Two, sent));
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_comes_back_whole() {
        for sent in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/1.1\r\n\r\n",
            b"P",
            b"",
        ] {
            assert_eq!(
                sniffed(sent, true).await,
                (Http::One, sent.to_vec()),
                "{sent:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_preface_in_single_bytes_is_still_seen() {
        let (mut client, server) = tokio::io::duplex(64);
        let sniffing = tokio::spawn(sniff(server));
        for byte in PREFACE {
            client.write_all(&[*byte]).await.expect("write");
            tokio::task::yield_now().await;
        }
        let (http, _) = sniffing.await.expect("task").expect("sniff");
        assert_eq!(http, Http::Two);
    }
}
