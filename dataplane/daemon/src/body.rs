//! Bodies as the proxy hands them to hyper: boxed, and fed from a channel when the filter
//! chain's output is produced piece by piece.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Frame;
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// The receiving end; a send of `Err` aborts the body (the peer sees a reset).
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

/// The sending end, used by the body pump.
pub struct BodySender {
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
}

/// Frames in flight between the pump and the peer: a small window, so a slow peer slows the
/// pump (and the upstream) instead of growing memory.
const WINDOW: usize = 4;

pub fn channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::channel(WINDOW);
    (BodySender { tx }, ChannelBody { rx })
}

impl BodySender {
    /// Sends data; `false` when the receiver is gone (the peer went away).
    pub async fn data(&self, bytes: Vec<u8>) -> bool {
        if bytes.is_empty() {
            return true;
        }
        self.tx
            .send(Ok(Frame::data(Bytes::from(bytes))))
            .await
            .is_ok()
    }

    pub async fn trailers(&self, trailers: HeaderMap) -> bool {
        self.tx.send(Ok(Frame::trailers(trailers))).await.is_ok()
    }

    /// Resolves when the receiver is gone (the peer went away).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    pub async fn abort(&self, why: String) {
        let _ = self.tx.send(Err(why.into())).await;
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// A body whose length is not announced, so HTTP/1.1 sends it chunked: the only encoding
/// that can carry trailers.
pub struct Unsized<B>(pub B);

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Unsized<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// A body that keeps `G` alive until it has ended or is dropped: what holds a request's
/// in-flight count (and a circuit breaker's slot) for as long as its response streams.
pub struct Guarded<G> {
    inner: Body,
    guard: Option<G>,
}

impl<G: Send + Unpin + 'static> Guarded<G> {
    pub fn wrap(inner: Body, guard: G) -> Body {
        Guarded {
            inner,
            guard: Some(guard),
        }
        .boxed_unsync()
    }
}

impl<G: Unpin> hyper::body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream body that fails when nothing arrives for `idle` between two frames
/// (`timeouts.upstreamIdle`): a stalled upstream ends the client's response instead of
/// holding it forever.
pub struct IdleTimeout {
    inner: Body,
    idle: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Set while a frame has been asked for and not yet come: the timer runs only then, so a
    /// slow client (which polls late) does not count against the upstream.
    waiting: bool,
}

impl IdleTimeout {
    pub fn wrap(inner: Body, idle: std::time::Duration) -> Body {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
        .boxed_unsync()
    }
}

impl hyper::body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.waiting {
            self.waiting = true;
            let next = tokio::time::Instant::now() + self.idle;
            self.timer.as_mut().reset(next);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the upstream sent nothing for {:?} (timeouts.upstreamIdle)",
                    self.idle
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
