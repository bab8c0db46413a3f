//! Reloading the configuration file (SIGHUP, or the file changing) while serving, and checking
//! one without serving (`--check`).
//!
//! A reload applies, in one step, everything the request path reads from the active
//! configuration: routes, clusters, filters (each compiled and started before the swap),
//! `bufferLimitBytes` and `insecureRegistries`. TLS certificate and key files are re-read (from
//! new paths if they changed) and serve from the next handshake. Every other field is bound
//! when the dataplane starts, and a change to it is **refused**, never silently ignored: the
//! error names each such field and says a restart applies it, the running configuration stays
//! whole (chain, certificates, listeners), and `wasmfilter_reloads_total{result=
//! "restart_required"}` counts it. Those fields are [`RESTART_ONLY`].

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::chain::Active;
use crate::config::{Config, Listener};
use crate::state::State;
use crate::tls::CertStore;

/// The fields a reload refuses to change, with why only a restart applies them.
pub const RESTART_ONLY: &[(&str, &str)] = &[
    ("listen", "the sockets are bound at start"),
    ("listeners", "the sockets are bound at start"),
    (
        "tls",
        "whether a listener speaks TLS is fixed at start (its certificate files reload)",
    ),
    ("admin", "the admin socket is bound at start"),
    ("workers", "the worker threads are started at start"),
    ("drainTimeout", "read once at start"),
    ("timeouts", "every connection's timeouts are set at start"),
    ("limits", "the listeners' limits are set at start"),
    ("operator", "the operator link is set up at start"),
];

/// What a reload compares against and swaps: the configuration last applied, and each
/// listener's certificate store (in [`Config::all_listeners`] order, `None` for plain ones).
pub struct Running {
    pub config: Config,
    pub certs: Vec<Option<Arc<CertStore>>>,
}

/// The field name of listener `i` of [`Config::all_listeners`], and of its `tls`.
pub fn listener_fields(config: &Config, i: usize) -> (String, String) {
    match (&config.listen, i) {
        (Some(_), 0) => ("listen".into(), "tls".into()),
        (Some(_), i) => (
            format!("listeners[{}].address", i - 1),
            format!("listeners[{}].tls", i - 1),
        ),
        (None, i) => (
            format!("listeners[{i}].address"),
            format!("listeners[{i}].tls"),
        ),
    }
}

fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// The restart-only fields that differ between the running configuration and `next`, each
/// said as precisely as it can be (`listeners[1].address: 127.0.0.1:8443 -> 127.0.0.1:9443`).
pub fn restart_only_changes(running: &Config, next: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let (old, new) = (running.all_listeners(), next.all_listeners());
    let addresses = |l: &[Listener]| l.iter().map(|l| l.address.clone()).collect::<Vec<_>>();
    if old.len() != new.len() || running.listen.is_some() != next.listen.is_some() {
        changes.push(format!(
            "listen/listeners: {:?} -> {:?}",
            addresses(&old),
            addresses(&new)
        ));
    } else {
        for (i, (o, n)) in old.iter().zip(&new).enumerate() {
            let (address, tls) = listener_fields(next, i);
            if o.address != n.address {
                changes.push(format!("{address}: {} -> {}", o.address, n.address));
            }
            // The other listener fields are read once, when the listener is bound.
            let shape = |l: &Listener| {
                format!(
                    "name {:?}, protocol {:?}, cluster {:?}, connectTimeout {:?}, idleTimeout {:?}, http2Only {}",
                    l.name, l.protocol, l.cluster, l.connect_timeout, l.idle_timeout, l.http2_only
                )
            };
            if shape(o) != shape(n) {
                let prefix = address.trim_end_matches(".address");
                changes.push(format!("{prefix}: {} -> {}", shape(o), shape(n)));
            }
            if o.tls.is_some() != n.tls.is_some() {
                changes.push(format!(
                    "{tls}: {} -> {}",
                    if o.tls.is_some() { "set" } else { "unset" },
                    if n.tls.is_some() { "set" } else { "unset" }
                ));
            }
        }
    }
    if running.admin != next.admin {
        changes.push(format!("admin: {} -> {}", running.admin, next.admin));
    }
    if running.workers != next.workers {
        changes.push(format!("workers: {} -> {}", running.workers, next.workers));
    }
    if running.drain_timeout != next.drain_timeout {
        changes.push(format!(
            "drainTimeout: {:?} -> {:?}",
            running.drain_timeout, next.drain_timeout
        ));
    }
    if differs(&running.timeouts, &next.timeouts) {
        changes.push("timeouts".into());
    }
    if differs(&running.limits, &next.limits) {
        changes.push("limits".into());
    }
    if differs(&running.operator, &next.operator) {
        changes.push("operator".into());
    }
    changes
}

/// Re-reads the configuration file and applies it (module doc). On any error the running
/// configuration stays whole and the error says why; `Ok` carries a one-line account of what
/// changed. Either way the outcome is logged (INFO applied, ERROR refused).
pub fn reload(state: &Arc<State>, running: &parking_lot::Mutex<Running>) -> anyhow::Result<String> {
    let result = apply(state, running);
    match &result {
        Ok(summary) => tracing::info!("{summary}"),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "reload refused: the running configuration stays"
        ),
    }
    result
}

fn apply(state: &Arc<State>, running: &parking_lot::Mutex<Running>) -> anyhow::Result<String> {
    let file = &state.config_file;
    let mut running = running.lock();
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            state.metrics.reload("invalid");
            return Err(e.into());
        }
    };
    let changes = restart_only_changes(&running.config, &config);
    if !changes.is_empty() {
        state.metrics.reload("restart_required");
        anyhow::bail!(
            "{}: {}: changed, which only a restart applies; nothing was reloaded (the filters, \
             routes, clusters and certificates running stay as they were): restart the \
             dataplane to apply the change, or undo it",
            file.display(),
            changes.join(", ")
        );
    }
    // Certificates first, without serving them: a bad pair refuses the whole reload.
    let mut prepared = Vec::new();
    for (store, listener) in running.certs.iter().zip(config.all_listeners()) {
        if let (Some(store), Some(tls)) = (store, &listener.tls) {
            match store.prepare(file, tls) {
                Ok(p) => prepared.push((store.clone(), p)),
                Err(e) => {
                    state.metrics.reload("invalid");
                    return Err(e.into());
                }
            }
        }
    }
    let swap = state.swap.lock();
    let managed = state.active.load().managed();
    let active = match Active::build(&state.host, &config, file, &state.metrics, managed) {
        Ok(a) => a,
        Err(e) => {
            state.metrics.reload("invalid");
            return Err(e.into());
        }
    };
    let (generation, filters) = (active.generation, active.filters.len());
    state.active.store(Arc::new(active));
    drop(swap);
    let certificates = prepared.len();
    for (store, p) in prepared {
        store.install(p);
    }
    running.config = config;
    state.metrics.reload("applied");
    let summary = format!(
        "configuration reloaded: generation {generation}, {filters} filters, {} routes, {} clusters, {certificates} TLS certificates re-read",
        running.config.routes.len(),
        running.config.clusters.len(),
    );
    Ok(summary)
}

/// `--check`: loads the configuration, reads every TLS certificate and key, and compiles and
/// starts every filter in throw-away VMs, without binding a socket, creating the operator's
/// state directory or contacting the operator. Returns a one-line summary.
pub fn check(config_file: &Path) -> anyhow::Result<String> {
    let config = Config::load(config_file)?;
    let file = config_file.display().to_string();
    for (i, l) in config.all_listeners().iter().enumerate() {
        if let Some(t) = &l.tls {
            let (_, field) = listener_fields(&config, i);
            crate::tls::acceptor(config_file, t, &field, None)?;
        }
    }
    if let Some(t) = config.operator.as_ref().and_then(|link| link.tls.as_ref()) {
        for (field, path) in [
            ("caFile", &t.ca_file),
            ("certFile", &t.cert_file),
            ("keyFile", &t.key_file),
        ] {
            let path = Config::module_path(config_file, path);
            std::fs::File::open(&path)
                .with_context(|| format!("{file}: operator.tls.{field}: {}", path.display()))?;
        }
    }
    let host = wasmfilter_host::Host::new(wasmfilter_host::HostConfig {
        module_cache_dir: Some(crate::module_cache_dir()),
        pooling: false,
        ..Default::default()
    })?;
    let metrics = crate::metrics::Metrics::default();
    let active = Active::build(&host, &config, config_file, &metrics, Vec::new())?;
    Ok(format!(
        "{file}: configuration OK: {} listeners, {} routes, {} clusters, {} filters started{}",
        config.all_listeners().len(),
        config.routes.len(),
        config.clusters.len(),
        active.filters.len(),
        if config.operator.is_some() {
            " (managed: the operator was not contacted)"
        } else {
            ""
        }
    ))
}
