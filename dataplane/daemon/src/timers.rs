//! Work a filter's root context asks for outside any request: `proxy_on_tick` timers,
//! `proxy_on_queue_ready` notices, and the HTTP callouts those (or `proxy_on_configure`) make.
//! Each runs on the worker that owns the VM, holds only a weak reference to it (a replaced VM
//! stops its timers), and never borrows the VM across an await. Stream effects they produce
//! (resuming, replying to or closing a paused stream through `proxy_set_effective_context`)
//! go to that stream's waiter ([`crate::resume`]). A trap in any of them fails the VM as a
//! trap in a request callback does: the failure policy applies to requests until the worker
//! rebuilds the VM after its backoff, and the new VM's ticks and queues start on their own.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use wasmfilter_host::{CallbackError, Effect, QueueReady};

use crate::chain::{Active, LoadedFilter, VmHandle, WORKER_VMS};
use crate::state::State;

thread_local! {
    /// The current timer generation of each (VM, root context): a newer period replaces the
    /// running timer, which sees the change and stops.
    static TICKS: RefCell<HashMap<(usize, u32), u64>> = RefCell::new(HashMap::new());
}

/// Carries out root-context effects (tick periods, callouts) of `vm`.
pub fn handle_root_effects(
    state: &Arc<State>,
    active: &Arc<Active>,
    filter: &Arc<LoadedFilter>,
    vm: &VmHandle,
    effects: Vec<Effect>,
) {
    for effect in crate::resume::route_stream_effects(vm, effects) {
        match effect {
            Effect::TickPeriod {
                root_context_id,
                period,
            } => set_tick(state, active, filter, vm, root_context_id, period),
            Effect::HttpCall(call) => {
                let (state, active, filter) = (state.clone(), active.clone(), filter.clone());
                let weak = Rc::downgrade(vm);
                tokio::task::spawn_local(async move {
                    let response = crate::upstream::callout(&state, &active, &call).await;
                    let Some(vm) = weak.upgrade() else { return };
                    let more = {
                        let mut guard = vm.borrow_mut();
                        match guard.0.on_http_call_response(call.token, response) {
                            Ok(()) => guard.0.take_effects(),
                            Err(e) => {
                                drop(guard);
                                root_failed(&filter, &vm, "callout answer", &e);
                                return;
                            }
                        }
                    };
                    handle_root_effects(&state, &active, &filter, &vm, more);
                });
            }
            // Stream effects have no stream here; gRPC from a root context is not supported yet.
            _ => {}
        }
    }
}

/// Starts, changes or (with `None`) stops the tick timer of one root context.
pub fn set_tick(
    state: &Arc<State>,
    active: &Arc<Active>,
    filter: &Arc<LoadedFilter>,
    vm: &VmHandle,
    root: u32,
    period: Option<Duration>,
) {
    let key = (Rc::as_ptr(vm) as usize, root);
    let generation = TICKS.with(|t| {
        let mut t = t.borrow_mut();
        let g = t.entry(key).or_default();
        *g += 1;
        *g
    });
    let Some(period) = period else { return };
    let (state, active, filter) = (state.clone(), active.clone(), filter.clone());
    let weak = Rc::downgrade(vm);
    tokio::task::spawn_local(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            let current = TICKS.with(|t| t.borrow().get(&key).copied());
            if current != Some(generation) {
                return;
            }
            let Some(vm) = weak.upgrade() else {
                TICKS.with(|t| t.borrow_mut().remove(&key));
                return;
            };
            let started = std::time::Instant::now();
            let effects = {
                let mut guard = vm.borrow_mut();
                match guard.0.on_tick(root) {
                    Ok(()) => guard.0.take_effects(),
                    Err(e) => {
                        drop(guard);
                        root_failed(&filter, &vm, "proxy_on_tick", &e);
                        return;
                    }
                }
            };
            filter.metrics.callback(started.elapsed().as_secs_f64());
            handle_root_effects(&state, &active, &filter, &vm, effects);
        }
    });
}

/// A root-context callback failed: the VM is failed and rebuilt after its backoff (the
/// worker's retry loop rebuilds it without waiting for a request).
fn root_failed(filter: &LoadedFilter, vm: &VmHandle, what: &str, e: &CallbackError) {
    tracing::warn!(filter = %filter.name, %e, "{what} failed; the VM will be rebuilt");
    if matches!(
        e,
        CallbackError::Trap { .. } | CallbackError::Timeout { .. }
    ) {
        filter.metrics.trap();
    }
    WORKER_VMS.with(|vms| vms.borrow_mut().fail(filter, vm, e));
}

/// Delivers a queue notice posted to this worker (see `chain::ClusterNames`) to the root
/// context that registered the queue, if its VM is still this worker's current one.
pub fn on_queue_ready(state: &Arc<State>, ready: QueueReady) {
    let Some(((name, version), vm)) =
        WORKER_VMS.with(|vms| vms.borrow().by_instance(ready.vm_instance))
    else {
        tracing::debug!(?ready, "queue notice for a VM this worker no longer runs");
        return;
    };
    let active = state.active.load_full();
    let Some(filter) = active
        .filters
        .iter()
        .find(|f| f.name == name && f.version == version)
        .cloned()
    else {
        return;
    };
    let started = std::time::Instant::now();
    let effects = {
        let mut guard = vm.borrow_mut();
        match guard
            .0
            .on_queue_ready(ready.root_context_id, ready.queue_id)
        {
            Ok(()) => guard.0.take_effects(),
            Err(e) => {
                drop(guard);
                root_failed(&filter, &vm, "proxy_on_queue_ready", &e);
                return;
            }
        }
    };
    filter.metrics.callback(started.elapsed().as_secs_f64());
    handle_root_effects(state, &active, &filter, &vm, effects);
}
