//! What every worker and the admin listener share.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use wasmfilter_host::Host;

use crate::chain::Active;
use crate::config::{ProxyLimits, Timeouts};
use crate::metrics::Metrics;
use crate::pool::Clients;

pub struct State {
    pub host: Arc<Host>,
    /// The active configuration; swapped whole on reload (workers are told through a watch).
    pub active: ActiveCell,
    pub metrics: Metrics,
    pub clients: Clients,
    /// Requests whose response (body included) has not ended yet; see [`InFlight`].
    pub in_flight: AtomicUsize,
    pub ready: AtomicBool,
    pub config_file: PathBuf,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub drain_timeout: std::time::Duration,
    /// Cancelled once when shutdown begins: listeners stop accepting and every connection is
    /// told to finish (HTTP/2 GOAWAY, HTTP/1 `Connection: close`).
    pub shutdown: CancellationToken,
    /// The connection timeouts and limits, as the configuration had them at start.
    pub timeouts: Timeouts,
    pub limits: ProxyLimits,
    /// Held while a new configuration is assembled from the current one and stored (file
    /// reloads and operator snapshots), so neither overwrites the other's change.
    pub swap: parking_lot::Mutex<()>,
    /// Managed mode: the operator link's state.
    pub link: LinkState,
}

/// One request in flight: counted from the moment the proxy takes it until its response body
/// has ended or been dropped (the client went away), whichever way that happens.
pub struct InFlight {
    state: Arc<State>,
    conn: Option<Arc<ConnActivity>>,
}

impl InFlight {
    pub fn new(state: &Arc<State>, conn: Option<Arc<ConnActivity>>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = &conn {
            c.begin();
        }
        InFlight {
            state: state.clone(),
            conn,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.end();
        }
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client connection's requests in flight, so an idle connection can be told apart from
/// a busy one (`timeouts.idle` closes only the former).
pub struct ConnActivity {
    active: AtomicUsize,
    idle_since: parking_lot::Mutex<std::time::Instant>,
    changed: tokio::sync::Notify,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity {
            active: AtomicUsize::new(0),
            idle_since: parking_lot::Mutex::new(std::time::Instant::now()),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl ConnActivity {
    /// Resolves once the connection has had no request in flight for `idle` (counted from
    /// its last response, or from the accept when it has not had one yet).
    pub async fn idle_for(&self, first: std::time::Duration, idle: std::time::Duration) {
        let mut served = false;
        loop {
            let notified = self.changed.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                let since = *self.idle_since.lock();
                let limit = if served { idle } else { first };
                let deadline = tokio::time::Instant::from_std(since + limit);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {
                        if self.active.load(Ordering::SeqCst) == 0
                            && *self.idle_since.lock() == since
                        {
                            return;
                        }
                    }
                    _ = notified => {}
                }
            } else {
                notified.await;
            }
            served = true;
        }
    }

    fn begin(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn end(&self) {
        *self.idle_since.lock() = std::time::Instant::now();
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// The active configuration: read lock-free on every request, and each store wakes the
/// workers (a `watch` channel) so they instantiate the new chain's VMs before requests need
/// them.
pub struct ActiveCell {
    current: ArcSwap<Active>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl ActiveCell {
    pub fn new(active: Active) -> ActiveCell {
        let generation = active.generation;
        ActiveCell {
            current: ArcSwap::from_pointee(active),
            changed: tokio::sync::watch::Sender::new(generation),
        }
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Active>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Active> {
        self.current.load_full()
    }

    pub fn store(&self, active: Arc<Active>) {
        let generation = active.generation;
        self.current.store(active);
        self.changed.send_replace(generation);
    }

    /// A receiver that sees every later store.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The operator link's state (`crate::managed` writes it), for /ready and /config_dump.
#[derive(Debug, Default)]
pub struct LinkState {
    /// The dataplane runs in managed mode.
    pub managed: AtomicBool,
    /// A chain from the operator is in place (restored from disk or applied): until then a
    /// managed dataplane is not ready, so it never serves traffic without its filters.
    pub synced: AtomicBool,
    pub connected: AtomicBool,
    pub applied_version: std::sync::atomic::AtomicU64,
}
