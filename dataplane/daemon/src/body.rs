//! Bodies as the proxy hands them to hyper: boxed, and fed from a channel when the filter
//! chain's output is produced piece by piece.

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
