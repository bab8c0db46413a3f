//! The body pipeline: chunks and trailers through the filters in order, each filter holding
//! what it buffers until it continues.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use wasmfilter_host::{Fields, HttpExchange, SharedExchange};

use super::dispatch::*;
use crate::body::{self, Body, full};
use crate::chain::Active;
use crate::error::ProxyError;
use crate::fields::{to_fields, to_header_map};
use crate::state::State;

/// Which way a body flows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The body buffer of this direction in the exchange.
    fn body(self, ex: &mut HttpExchange) -> &mut Vec<u8> {
        match self {
            Direction::Request => &mut ex.request_body,
            Direction::Response => &mut ex.response_body,
        }
    }

    /// The trailers of this direction in the exchange.
    fn trailers(self, ex: &mut HttpExchange) -> &mut Fields {
        match self {
            Direction::Request => &mut ex.request_trailers,
            Direction::Response => &mut ex.response_trailers,
        }
    }

    /// The body-size counter of this direction (for the `request.size`/`response.size`
    /// properties).
    fn body_bytes(self, ex: &mut HttpExchange) -> &mut u64 {
        match self {
            Direction::Request => &mut ex.info.request_body_bytes,
            Direction::Response => &mut ex.info.response_body_bytes,
        }
    }
}

/// The next piece of a body: (data, trailers, end of stream). End of stream comes only from
/// the end of the body or its trailers: `is_end_stream` may already be true while trailers
/// are still to come.
pub(crate) async fn next_frame<B>(
    body: &mut B,
) -> Result<(Vec<u8>, Option<HeaderMap>, bool), String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match body.frame().await {
        None => Ok((Vec::new(), None, true)),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(f)) => match f.into_data() {
            Ok(d) => Ok((d.to_vec(), None, false)),
            Err(f) => Ok((Vec::new(), f.into_trailers().ok(), true)),
        },
    }
}

/// What every step of a stream's body pipeline works with.
#[derive(Clone, Copy)]
pub(crate) struct Pipeline<'a> {
    pub(crate) state: &'a Arc<State>,
    pub(crate) active: &'a Arc<Active>,
    pub(crate) exchange: &'a SharedExchange,
}

/// What leaves the last filter for one chunk.
pub(crate) struct ChunkOut {
    pub(crate) data: Vec<u8>,
    pub(crate) trailers: Option<HeaderMap>,
}

impl ChunkOut {
    fn data(data: Vec<u8>) -> ChunkOut {
        ChunkOut {
            data,
            trailers: None,
        }
    }
}

/// Feeds one chunk through the filters in `order`. Each filter holds its own pending bytes
/// while it pauses; the body callback sees them all (sizes are cumulative) and nothing passes
/// the filter until it continues.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn body_chunk(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    mut data: Vec<u8>,
    eos: bool,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let Pipeline {
        state,
        active,
        exchange,
    } = *p;
    for &i in order {
        let r = &mut running[i];
        if r.skipped || r.ctx == 0 {
            continue;
        }
        if data.is_empty() && !eos {
            break;
        }
        r.pending.append(&mut data);
        if r.pending.len() > active.buffer_limit {
            return Err(match direction {
                Direction::Request => ProxyError::BodyTooLarge,
                Direction::Response => ProxyError::FilterFailed {
                    filter: r.filter.name.clone(),
                    message: "the response body exceeds the filter buffer limit".into(),
                },
            });
        }
        set_body(exchange, direction, std::mem::take(&mut r.pending));
        let flow = callback(state, active, r, !eos, |vm, ctx| match direction {
            Direction::Request => vm.on_request_body(ctx, eos),
            Direction::Response => vm.on_response_body(ctx, eos),
        })
        .await?;
        let held = take_body(exchange, direction);
        match flow {
            Flow::Buffer => {
                r.pending = held;
                return Ok((ChunkOut::data(Vec::new()), None));
            }
            Flow::Continue => data = held,
            other => {
                return Ok((ChunkOut::data(Vec::new()), Some(other)));
            }
        }
    }
    Ok((ChunkOut::data(data), None))
}

/// Trailers end the body: each filter's trailer callback runs, and whatever it still held
/// flows on with them (filters after a buffering one see that data only here).
pub(crate) async fn trailers_through(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    trailers: HeaderMap,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let Pipeline {
        state,
        active,
        exchange,
    } = *p;
    {
        let mut ex = exchange.lock();
        let map = direction.trailers(&mut ex);
        *map = Fields::new();
        to_fields(&trailers, map);
    }
    let mut data = Vec::new();
    for &i in order {
        let r = &mut running[i];
        if r.skipped || r.ctx == 0 {
            continue;
        }
        r.pending.append(&mut data);
        let flow = callback(state, active, r, false, |vm, ctx| match direction {
            Direction::Request => vm.on_request_trailers(ctx),
            Direction::Response => vm.on_response_trailers(ctx),
        })
        .await?;
        if let Flow::Local(_) | Flow::Reset = flow {
            return Ok((ChunkOut::data(Vec::new()), Some(flow)));
        }
        data = std::mem::take(&mut r.pending);
    }
    let trailers = to_header_map(direction.trailers(&mut exchange.lock()));
    Ok((
        ChunkOut {
            data,
            trailers: Some(trailers),
        },
        None,
    ))
}

/// A whole body (read at once) through the filters: its data with end of stream, then its
/// trailers if it has any.
pub(crate) async fn through_whole(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    collected: http_body_util::Collected<Bytes>,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let exchange = p.exchange;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes().to_vec();
    *direction.body_bytes(&mut exchange.lock()) = data.len() as u64;
    let (mut out, flow) =
        body_chunk(p, running, order, direction, data, trailers.is_none()).await?;
    if flow.is_some() {
        return Ok((out, flow));
    }
    if let Some(t) = trailers {
        // Data a buffering filter still holds flows on with the trailers.
        let (more, flow) = trailers_through(p, running, order, direction, t).await?;
        out.data.extend_from_slice(&more.data);
        out.trailers = more.trailers;
        return Ok((out, flow));
    }
    Ok((out, None))
}

/// A body of known length (and trailers, if any).
pub(crate) fn sized(out: ChunkOut) -> Body {
    match out.trailers {
        None => full(out.data),
        Some(t) => body::Unsized(full(out.data).with_trailers(std::future::ready(Some(Ok(t)))))
            .boxed_unsync(),
    }
}

pub(crate) fn set_body(exchange: &SharedExchange, direction: Direction, bytes: Vec<u8>) {
    *direction.body(&mut exchange.lock()) = bytes;
}

pub(crate) fn take_body(exchange: &SharedExchange, direction: Direction) -> Vec<u8> {
    std::mem::take(direction.body(&mut exchange.lock()))
}
