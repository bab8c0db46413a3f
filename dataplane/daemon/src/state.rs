//! What every worker and the admin listener share.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use arc_swap::ArcSwap;
use wasmfilter_host::Host;

use crate::chain::Active;
use crate::metrics::Metrics;
use crate::upstream::Clients;

pub struct State {
    pub host: Arc<Host>,
    /// The active configuration; swapped whole on reload.
    pub active: ArcSwap<Active>,
    pub metrics: Metrics,
    pub clients: Clients,
    pub in_flight: AtomicUsize,
    pub ready: AtomicBool,
    pub config_file: PathBuf,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub drain_timeout: std::time::Duration,
    /// Held while a new configuration is assembled from the current one and stored (file
    /// reloads and operator snapshots), so neither overwrites the other's change.
    pub swap: parking_lot::Mutex<()>,
    /// Managed mode: the operator link's state.
    pub link: crate::managed::LinkState,
}
