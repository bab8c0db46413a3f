//! HTTP/2-only plain listeners (`listeners[].http2Only`): the client's first bytes must be the
//! HTTP/2 connection preface (RFC 9113 §3.4). Anything else ends the connection as §3.5 asks,
//! with a GOAWAY (PROTOCOL_ERROR) and a graceful close, where closing the socket with the
//! client's bytes unread would send a TCP reset the client cannot tell from a crash.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The client connection preface of HTTP/2.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A GOAWAY frame: length 8, type 7, no flags, stream 0, last stream 0, PROTOCOL_ERROR (1).
const GOAWAY_PROTOCOL_ERROR: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// How long the client's remaining bytes are read (and dropped) after the GOAWAY, so the
/// close is a FIN rather than a reset.
const LINGER: Duration = Duration::from_millis(500);

/// Reads the preface within `timeout`. Returns the stream with the preface put back in front
/// (for hyper's HTTP/2 server to read), or `None` once a client that sent something else, or
/// nothing in time, has been answered and closed.
pub async fn expect<S>(mut stream: S, timeout: Duration) -> Option<Prefixed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = Vec::with_capacity(PREFACE.len());
    let read = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 24];
        while got.len() < PREFACE.len() {
            let want = PREFACE.len() - got.len();
            let n = stream.read(&mut buf[..want]).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
            if !PREFACE.starts_with(&got) {
                return Some(false);
            }
        }
        Some(true)
    })
    .await;
    match read {
        Ok(Some(true)) => Some(Prefixed {
            prefix: got,
            at: 0,
            inner: stream,
        }),
        Ok(Some(false)) => {
            let _ = stream.write_all(&GOAWAY_PROTOCOL_ERROR).await;
            let _ = stream.shutdown().await;
            let _ = tokio::time::timeout(LINGER, async {
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            None
        }
        // The client went away, or sent nothing in time.
        _ => None,
    }
}

/// A stream whose first bytes (already read) are served again before the rest.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
