//! Paused streams and what resumes them. A stream callback that paused registers a waiter for
//! its (VM, context); effects any other context of that VM produces for the stream (a tick, a
//! queue callback, another stream's callout answer, a foreign function, through
//! `proxy_set_effective_context`) are handed to the waiter instead of being dropped. Used by the
//! request path (`proxy::dispatch`) and by root-context work (`timers`), on the worker's thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use wasmfilter_host::Effect;

use crate::chain::VmHandle;

/// A paused callback waiting for another context to resume it: the stream effects delivered
/// to it, and the wake-up.
#[derive(Default)]
struct Waiter {
    effects: RefCell<Vec<Effect>>,
    wake: tokio::sync::Notify,
}

thread_local! {
    /// The callbacks of this worker that are running or paused, by (VM, stream context).
    static WAITERS: RefCell<HashMap<(usize, u32), Rc<Waiter>>> = RefCell::new(HashMap::new());
}

fn waiter_key(vm: &VmHandle, ctx: u32) -> (usize, u32) {
    (Rc::as_ptr(vm) as *const () as usize, ctx)
}

/// Registers a waiter for one callback of a stream; unregisters it when dropped.
pub(crate) struct WaiterGuard {
    key: (usize, u32),
    waiter: Rc<Waiter>,
}

impl WaiterGuard {
    pub(crate) fn new(vm: &VmHandle, ctx: u32) -> WaiterGuard {
        let key = waiter_key(vm, ctx);
        let waiter = Rc::new(Waiter::default());
        WAITERS.with(|w| w.borrow_mut().insert(key, waiter.clone()));
        WaiterGuard { key, waiter }
    }

    /// Resolves when an effect was delivered (at once if one already was).
    pub(crate) async fn woken(&self) {
        self.waiter.wake.notified().await
    }

    pub(crate) fn take(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.waiter.effects.borrow_mut())
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let _ = WAITERS.try_with(|w| {
            let mut w = w.borrow_mut();
            if w.get(&self.key)
                .is_some_and(|c| Rc::ptr_eq(c, &self.waiter))
            {
                w.remove(&self.key);
            }
        });
    }
}

/// Hands the stream effects among `effects` (continue, local reply, close) to the paused
/// callbacks of `vm` they name, and returns the others. A stream effect for a context that is
/// not in a callback (it already continued, or ended) is dropped, as Envoy ignores a continue
/// on a stream that is not stopped.
pub(crate) fn route_stream_effects(vm: &VmHandle, effects: Vec<Effect>) -> Vec<Effect> {
    let mut rest = Vec::new();
    for effect in effects {
        let ctx = match &effect {
            Effect::ContinueStream { context_id, .. }
            | Effect::LocalResponse { context_id, .. }
            | Effect::CloseStream { context_id, .. } => *context_id,
            _ => {
                rest.push(effect);
                continue;
            }
        };
        let waiter = WAITERS.with(|w| w.borrow().get(&waiter_key(vm, ctx)).cloned());
        match waiter {
            Some(waiter) => {
                waiter.effects.borrow_mut().push(effect);
                waiter.wake.notify_one();
            }
            None => tracing::debug!(
                ctx,
                "a stream effect for a stream that is not paused; ignored"
            ),
        }
    }
    rest
}
