//! Filter dispatch: a filter's stream context on this request, one callback and the callouts
//! it leads to, failure policies, and the end of every context.
//!
//! Contracts, as in Envoy:
//! - A callback that pauses with nothing outstanding waits until `proxy_continue_stream`,
//!   `proxy_send_local_response` or `proxy_close_stream` reaches its context, from any other
//!   context of the same VM (a tick, a queue callback, another stream's callout answer, a
//!   foreign function) through `proxy_set_effective_context`, for at most the route's stream
//!   timeout ([`stream_timeout`]); then the client gets a 504 naming the filter. Effects meant
//!   for another stream are handed to that stream's waiter ([`route_stream_effects`]).
//! - Every stream context created gets `proxy_on_done`, `proxy_on_log` and `proxy_on_delete`
//!   exactly once, in that order: [`Chain`] ends them when the request is answered, and when
//!   it is dropped unanswered (client gone, HTTP/2 reset, drain), counting it as abandoned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmfilter_api::FailurePolicy;
use wasmfilter_host::{
    Action, CallbackError, Effect, HttpCallResponse, LocalResponse, SharedExchange, Vm,
};

use crate::chain::{Active, LoadedFilter, VmHandle, WORKER_VMS};
use crate::error::ProxyError;
use crate::resume::{WaiterGuard, route_stream_effects};
use crate::state::State;

/// A filter on this request: its VM context, whether it is still active, and the body data it
/// holds while paused.
pub(crate) struct Running {
    pub(crate) filter: Arc<LoadedFilter>,
    /// The VM this request's stream context lives in, pinned for the request's life.
    pub(crate) vm: Option<VmHandle>,
    pub(crate) ctx: u32,
    pub(crate) skipped: bool,
    /// A native filter that ran its request-header phase (it has no stream context, and no
    /// body or trailer phases).
    pub(crate) native: bool,
    pub(crate) pending: Vec<u8>,
    /// How long a paused callback of this stream may wait to be resumed.
    pub(crate) stream_timeout: Duration,
}

/// The stream timeout of the route the request matched when it arrived: the route's
/// `timeout`, else its cluster's (Envoy's route timeout, 15 s by default).
pub(crate) fn stream_timeout(active: &Active, exchange: &SharedExchange) -> Duration {
    let ex = exchange.lock();
    let route = ex
        .info
        .route_name
        .as_deref()
        .and_then(|name| active.routes.iter().find(|r| r.config.name == name));
    route
        .and_then(|r| {
            r.config.timeout.or_else(|| {
                active
                    .clusters
                    .get(&r.config.cluster)
                    .map(|c| c.config.timeout)
            })
        })
        .unwrap_or(crate::config::DEFAULT_STREAM_TIMEOUT)
}

/// The filters of one request, whose stream contexts end exactly once: when the request is
/// answered ([`Chain::finish`]), or when the chain is dropped unanswered (the client went
/// away, reset its HTTP/2 stream, the upstream failed mid-response, or the worker stopped).
/// Ending contexts is synchronous and runs on the worker's thread, so the drop can borrow the
/// VMs (no borrow is ever held across an await).
pub(crate) struct Chain {
    pub(crate) running: Vec<Running>,
    state: Arc<State>,
    /// Where the request is, named in the abandoned-requests metric if it ends unanswered.
    pub(crate) phase: &'static str,
    answered: bool,
}

impl Chain {
    pub(crate) fn new(state: &Arc<State>, running: Vec<Running>) -> Chain {
        Chain {
            running,
            state: state.clone(),
            phase: "request",
            answered: false,
        }
    }

    /// The request is over: every context ends now.
    pub(crate) fn finish(&mut self) {
        self.answered = true;
        finish_all(&mut self.running);
    }
}

impl std::ops::Deref for Chain {
    type Target = Vec<Running>;
    fn deref(&self) -> &Vec<Running> {
        &self.running
    }
}

impl std::ops::DerefMut for Chain {
    fn deref_mut(&mut self) -> &mut Vec<Running> {
        &mut self.running
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        if !self.answered {
            self.state.metrics.request_abandoned(self.phase);
        }
        finish_all(&mut self.running);
    }
}

/// How a callback ended.
pub(crate) enum Flow {
    Continue,
    /// A body callback paused with nothing outstanding: keep buffering for this filter.
    Buffer,
    Local(LocalResponse),
    Reset,
}

/// Creates the filter's stream context; `false` if the filter is skipped (FailOpen).
pub(crate) fn start_stream(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    r: &mut Running,
) -> Result<bool, ProxyError> {
    let handle = WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        vms.sync(active);
        vms.get(&state.host, &r.filter, &active.embedder)
    });
    let result = handle.and_then(|(h, created)| {
        if created {
            let effects = h.borrow_mut().0.take_effects();
            crate::timers::handle_root_effects(state, active, &r.filter, &h, effects);
        }
        let created = {
            let mut guard = h.borrow_mut();
            let (vm, root) = &mut *guard;
            vm.create_stream(*root, exchange.clone())
        };
        let ctx = match created {
            Ok(ctx) => ctx,
            Err(e) => {
                // A trap in `proxy_on_context_create` fails the VM like any other.
                if trapped(&e) {
                    r.filter.metrics.trap();
                }
                WORKER_VMS.with(|vms| vms.borrow_mut().fail(&r.filter, &h, &e));
                return Err(e.to_string());
            }
        };
        r.vm = Some(h);
        Ok(ctx)
    });
    match result {
        Ok(ctx) => {
            r.ctx = ctx;
            Ok(true)
        }
        Err(message) => on_failure(r, message).map(|_| false),
    }
}

/// Applies the filter's failure policy: FailOpen skips it, FailClosed refuses the request.
pub(crate) fn on_failure(r: &mut Running, message: String) -> Result<(), ProxyError> {
    r.skipped = true;
    match r.filter.failure_policy {
        FailurePolicy::FailOpen => {
            r.filter.metrics.fail_open();
            Ok(())
        }
        FailurePolicy::FailClosed => {
            r.filter.metrics.fail_closed();
            Err(ProxyError::FilterFailed {
                filter: r.filter.name.clone(),
                message,
            })
        }
    }
}

pub(crate) fn with_vm<T>(
    r: &Running,
    f: impl FnOnce(&mut Vm, u32) -> Result<T, CallbackError>,
) -> Result<T, CallbackError> {
    match &r.vm {
        Some(handle) => f(&mut handle.borrow_mut().0, r.ctx),
        None => Err(CallbackError::UnknownContext(r.ctx)),
    }
}

/// Runs one stream callback and everything it leads to (callouts and their answers) until the
/// filter continues, replies locally, or resets the stream. `buffering`: a pause with nothing
/// outstanding means "give me more body" ([`Flow::Buffer`]) rather than a stall.
pub(crate) async fn callback(
    state: &Arc<State>,
    active: &Arc<Active>,
    r: &mut Running,
    buffering: bool,
    call: impl FnOnce(&mut Vm, u32) -> Result<Action, CallbackError>,
) -> Result<Flow, ProxyError> {
    if r.skipped {
        return Ok(Flow::Continue);
    }
    let started = Instant::now();
    let result = with_vm(r, |vm, ctx| {
        Ok((call(vm, ctx)?, vm.take_effects(), vm.memory_bytes()))
    });
    r.filter.metrics.callback(started.elapsed().as_secs_f64());
    let (action, mut effects, memory) = match result {
        Ok(v) => v,
        Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
    };
    r.filter.metrics.vm_memory(memory);
    let Some(vm) = r.vm.clone() else {
        return Ok(Flow::Continue);
    };
    // Registered at the first wait: until then everything runs synchronously, and the
    // callback's own effects are in `effects` already.
    let mut waiter: Option<WaiterGuard> = None;
    let mut outstanding = Outstanding {
        vm: vm.clone(),
        tokens: Vec::new(),
    };
    let mut resumed = action == Action::Continue;
    let mut pending = tokio::task::JoinSet::new();
    let ctx = r.ctx;
    loop {
        // Effects naming another stream of this VM go to that stream's waiter.
        let (mine, others): (Vec<_>, Vec<_>) =
            std::mem::take(&mut effects)
                .into_iter()
                .partition(|e| match e {
                    Effect::LocalResponse { context_id, .. }
                    | Effect::CloseStream { context_id, .. }
                    | Effect::ContinueStream { context_id, .. } => *context_id == ctx,
                    _ => true,
                });
        if !others.is_empty() {
            route_stream_effects(&vm, others);
        }
        for effect in mine {
            match effect {
                Effect::LocalResponse { response, .. } => return Ok(Flow::Local(response)),
                Effect::CloseStream { .. } => return Ok(Flow::Reset),
                Effect::ContinueStream { .. } => resumed = true,
                Effect::TickPeriod {
                    root_context_id,
                    period,
                } => {
                    if let Some(vm) = &r.vm {
                        crate::timers::set_tick(
                            state,
                            active,
                            &r.filter,
                            vm,
                            root_context_id,
                            period,
                        );
                    }
                }
                Effect::HttpCall(call) => {
                    outstanding.tokens.push(call.token);
                    let state = state.clone();
                    let active = active.clone();
                    pending.spawn_local(async move {
                        let response = crate::upstream::callout(&state, &active, &call).await;
                        Answer::Http(call.token, response)
                    });
                }
                Effect::GrpcCall(call) => {
                    outstanding.tokens.push(call.token);
                    let state = state.clone();
                    let active = active.clone();
                    pending.spawn_local(async move {
                        let outcome = crate::upstream::grpc_call(&state, &active, &call).await;
                        Answer::Grpc(call.token, outcome)
                    });
                }
                Effect::GrpcStreamOpen(call) => {
                    // Streaming gRPC callouts are not carried out yet: the filter is told the
                    // stream is unavailable, as for an unreachable upstream.
                    let token = call.token;
                    match with_vm(r, |vm, _| {
                        vm.on_grpc_close(
                            token,
                            14,
                            "gRPC streams are not supported by this dataplane yet",
                        )?;
                        Ok(vm.take_effects())
                    }) {
                        Ok(more) => effects.extend(more),
                        Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
                    }
                }
                _ => {}
            }
        }
        if !effects.is_empty() {
            continue;
        }
        if resumed {
            return Ok(Flow::Continue);
        }
        if pending.is_empty() && buffering {
            return Ok(Flow::Buffer);
        }
        // Paused: wait for a callout answer, or for another context to resume this stream.
        let waiter = waiter.get_or_insert_with(|| WaiterGuard::new(&vm, ctx));
        let woken = tokio::time::timeout(r.stream_timeout, async {
            tokio::select! {
                Some(joined) = pending.join_next(), if !pending.is_empty() => Some(joined),
                _ = waiter.woken() => None,
            }
        })
        .await;
        let answer = match woken {
            Err(_) => {
                return Err(ProxyError::StreamTimeout {
                    filter: r.filter.name.clone(),
                    timeout: r.stream_timeout,
                });
            }
            Ok(None) => {
                effects = waiter.take();
                continue;
            }
            Ok(Some(Ok(answer))) => {
                let token = match &answer {
                    Answer::Http(token, _) | Answer::Grpc(token, _) => *token,
                };
                outstanding.tokens.retain(|t| *t != token);
                answer
            }
            Ok(Some(Err(_))) => continue,
        };
        match with_vm(r, |vm, _| {
            deliver(vm, answer)?;
            Ok(vm.take_effects())
        }) {
            Ok(more) => effects = more,
            Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
        }
    }
}

/// The callouts a callback is still waiting for. When the callback ends without their answers
/// (it continued, replied, failed, or its request was dropped), they are cancelled in the VM,
/// as Envoy cancels a stream's callouts when the stream ends.
struct Outstanding {
    vm: VmHandle,
    tokens: Vec<u32>,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.tokens.is_empty() {
            return;
        }
        if let Ok(mut guard) = self.vm.try_borrow_mut() {
            for token in self.tokens.drain(..) {
                guard.0.cancel_callout(token);
            }
        }
    }
}

/// The answer to a callout, on its way back to the filter's root context.
pub(crate) enum Answer {
    Http(u32, Option<HttpCallResponse>),
    Grpc(u32, crate::upstream::GrpcOutcome),
}

pub(crate) fn deliver(vm: &mut Vm, answer: Answer) -> Result<(), CallbackError> {
    match answer {
        Answer::Http(token, response) => vm.on_http_call_response(token, response),
        Answer::Grpc(token, outcome) => {
            if let Some(md) = outcome.initial_metadata {
                vm.on_grpc_initial_metadata(token, md)?;
            }
            for message in outcome.messages {
                vm.on_grpc_message(token, message)?;
            }
            if let Some(md) = outcome.trailing_metadata {
                vm.on_grpc_trailing_metadata(token, md)?;
            }
            vm.on_grpc_close(token, outcome.status, &outcome.message)
        }
    }
}

/// Whether the error is the VM's own failure now (a trap or a timeout), not the echo of an
/// earlier one.
pub(crate) fn trapped(e: &CallbackError) -> bool {
    matches!(
        e,
        CallbackError::Trap { .. } | CallbackError::Timeout { .. }
    )
}

pub(crate) fn callback_failed(r: &mut Running, e: CallbackError) -> Result<(), ProxyError> {
    r.filter.metrics.trap();
    if let Some(handle) = &r.vm {
        WORKER_VMS.with(|vms| vms.borrow_mut().fail(&r.filter, handle, &e));
    }
    on_failure(r, e.to_string())
}

/// Ends every filter's stream context that is still open, whatever happened to the request;
/// each context ends once (its id is cleared).
pub(crate) fn finish_all(running: &mut [Running]) {
    for r in running.iter_mut().filter(|r| r.ctx != 0) {
        let ctx = std::mem::take(&mut r.ctx);
        let Some(handle) = &r.vm else { continue };
        let result = {
            let mut guard = handle.borrow_mut();
            let result = guard.0.finish_stream(ctx);
            let effects = guard.0.take_effects();
            drop(guard);
            // What the ending stream asked of other streams still reaches them.
            route_stream_effects(handle, effects);
            result
        };
        let _ = WORKER_VMS.try_with(|vms| {
            let mut vms = vms.borrow_mut();
            match &result {
                Ok(()) => vms.succeeded(&r.filter),
                Err(e) => {
                    tracing::warn!(filter = %r.filter.name, %e, "finishing the stream failed");
                    if trapped(e) {
                        r.filter.metrics.trap();
                    }
                    vms.fail(&r.filter, handle, e);
                }
            }
        });
    }
}

/// A native filter's response-header phase (timed like a Wasm callback).
pub(crate) fn native_response_headers(r: &Running, exchange: &SharedExchange) {
    if let Some(native) = r.filter.native_filter() {
        let started = Instant::now();
        native.on_response_headers(&mut exchange.lock().response_headers);
        r.filter.metrics.callback(started.elapsed().as_secs_f64());
    }
}
