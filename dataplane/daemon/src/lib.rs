//! The wasmfilter dataplane: an HTTP/1.1 and HTTP/2 (h2c) reverse proxy with a chain of
//! proxy-wasm filters in front of its router.
//!
//! Threads: N workers, each with its own single-threaded event loop accepting on the shared
//! listener, so a stream and its filters' VMs stay on one thread; one admin thread; in managed
//! mode one thread holding the operator stream ([`managed`]); the caller's thread handles
//! signals (SIGHUP reloads, SIGTERM drains).

pub mod admin;
pub mod body;
pub mod chain;
pub mod config;
pub mod error;
pub mod fields;
pub mod managed;
pub mod metrics;
pub mod native;
pub mod normalize;
pub mod pool;
pub mod preface;
pub mod proxy;
pub mod reload;
pub mod resume;
pub mod state;
pub mod tcp;
pub mod timers;
pub mod tls;
pub mod tunnel;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use wasmfilter_host::{Host, HostConfig};

use crate::chain::Active;
use crate::config::Config;
use crate::state::{ActiveCell, ConnActivity, State};

/// A running dataplane.
pub struct Dataplane {
    pub state: Arc<State>,
    /// The first listener's address (`listen`, else `listeners[0]`).
    pub proxy_addr: SocketAddr,
    /// Every listener's address, in configuration order.
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// What [`Dataplane::reload`] compares against and swaps ([`reload`]).
    running: parking_lot::Mutex<reload::Running>,
}

/// Runs `!Send` futures (HTTP/2 streams of one connection) on the worker's own thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

impl Dataplane {
    /// Loads the configuration, compiles and starts every filter once (refusing a bad one
    /// with its error), binds the listeners and starts the workers.
    pub fn start(config_file: &Path) -> anyhow::Result<Dataplane> {
        let config = Config::load(config_file)?;
        let host = Host::new(HostConfig {
            module_cache_dir: Some(module_cache_dir()),
            // WASMFILTER_ON_DEMAND_INSTANCES=1: instances without the pooling allocator, whose
            // terabyte-sized address-space reservation valgrind refuses (bench/scripts/
            // profile-s3.sh). Instances are made off the request path either way.
            pooling: std::env::var_os("WASMFILTER_ON_DEMAND_INSTANCES").is_none(),
            ..Default::default()
        })?;
        let metrics = metrics::Metrics::default();
        let mut active = Active::build(&host, &config, config_file, &metrics, Vec::new())?;
        // Managed mode: the last applied snapshot serves until the operator answers.
        let state_dir = match &config.operator {
            Some(link) => {
                let path = Config::module_path(config_file, &link.state_dir);
                let dir = managed::StateDir::open(&path).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: operator.stateDir: {}: {e}",
                        config_file.display(),
                        path.display()
                    )
                })?;
                let restored = managed::restore(&dir, &host, &metrics, active.embedder.clone());
                active = active.with_managed(restored);
                Some(dir)
            }
            None => None,
        };
        let mut listeners = Vec::new();
        let mut certs = Vec::new();
        for (i, l) in config.all_listeners().iter().enumerate() {
            let (field, tls_field) = reload::listener_fields(&config, i);
            let tls = match &l.tls {
                Some(t) => {
                    let (acceptor, store) =
                        tls::acceptor(config_file, t, &tls_field, Some(metrics.tls_reloads()))?;
                    certs.push(Some(store));
                    Some(acceptor)
                }
                None => {
                    certs.push(None);
                    None
                }
            };
            let socket = std::net::TcpListener::bind(&l.address).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {field}: cannot bind {}: {e}",
                    config_file.display(),
                    l.address
                )
            })?;
            socket.set_nonblocking(true)?;
            // One budget of connections per listener, shared by every worker.
            let slots = Arc::new(Semaphore::new(config.limits.max_connections));
            let name: Arc<str> = l.address.as_str().into();
            let tcp = (l.protocol == config::ListenerProtocol::TCP).then(|| tcp::TcpListenerSpec {
                name: l.name.clone(),
                cluster: l.cluster.clone().unwrap_or_default(),
                connect_timeout: l.connect_timeout,
                idle_timeout: l.idle_timeout,
            });
            listeners.push((
                socket,
                Role::Proxy {
                    tls,
                    slots,
                    name,
                    tcp,
                    http2_only: l.http2_only,
                },
            ));
        }
        let admin = std::net::TcpListener::bind(&config.admin).map_err(|e| {
            anyhow::anyhow!(
                "{}: admin: cannot bind {}: {e}",
                config_file.display(),
                config.admin
            )
        })?;
        admin.set_nonblocking(true)?;
        let proxy_addrs = listeners
            .iter()
            .map(|(l, _)| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let admin_addr = admin.local_addr()?;
        let state = Arc::new(State {
            host,
            active: ActiveCell::new(active),
            metrics,
            clients: Default::default(),
            in_flight: Default::default(),
            ready: AtomicBool::new(false),
            config_file: config_file.to_path_buf(),
            drain_timeout: config.drain_timeout,
            shutdown: Default::default(),
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            swap: Default::default(),
            link: Default::default(),
        });
        let workers_n = if config.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            config.workers
        };
        let mut workers = Vec::new();
        for i in 0..workers_n {
            let mine = listeners
                .iter()
                .map(|(l, role)| Ok((l.try_clone()?, role.clone())))
                .collect::<std::io::Result<Vec<_>>>()?;
            let state = state.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        // Service plugins are singletons: the first worker runs them.
                        chain::HOSTS_SERVICE_PLUGINS.set(i == 0);
                        run_worker(mine, state)
                    })?,
            );
        }
        {
            let state = state.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("admin".into())
                    .spawn(move || run_worker(vec![(admin, Role::Admin)], state))?,
            );
        }
        if let (Some(link), Some(dir)) = (&config.operator, state_dir) {
            state.link.managed.store(true, Ordering::SeqCst);
            state.link.synced.store(dir.has_saved(), Ordering::SeqCst);
            workers.push(managed::spawn(
                link.clone(),
                config_file.to_path_buf(),
                dir,
                state.clone(),
            )?);
        }
        tls::watch(
            config_file.to_path_buf(),
            &certs.iter().flatten().cloned().collect::<Vec<_>>(),
        )?;
        state.ready.store(true, Ordering::SeqCst);
        tracing::info!(proxy_addr = ?proxy_addrs, %admin_addr, filters = state.active.load().filters.len(), "dataplane ready");
        Ok(Dataplane {
            state,
            proxy_addr: proxy_addrs[0],
            proxy_addrs,
            admin_addr,
            workers,
            running: parking_lot::Mutex::new(reload::Running { config, certs }),
        })
    }

    /// Re-reads the configuration file and applies it: the filter chain, routes and clusters
    /// swapped in one step, TLS certificates re-read. A configuration that does not load, or
    /// that changes a field only a restart applies (listeners, admin, workers, ...), is refused
    /// whole with an error naming the field; the running one stays. See [`reload`].
    pub fn reload(&self) -> anyhow::Result<String> {
        reload::reload(&self.state, &self.running)
    }

    /// Drains and stops: the listeners stop accepting, every connection is told to finish
    /// (HTTP/2 GOAWAY, HTTP/1 `Connection: close`), and this returns as soon as every
    /// in-flight request has finished its response body, or after `drainTimeout`.
    pub fn shutdown(self) {
        self.state.ready.store(false, Ordering::SeqCst);
        self.state.shutdown.cancel();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// Compiled modules are cached outside the working tree, keyed by digest.
pub fn module_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WASMFILTER_MODULE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home)
        .join(".cache")
        .join("wasmfilter")
        .join("modules")
}

/// Instantiates this worker's VMs for a newly active configuration before requests need them
/// (nothing is compiled or instantiated on the request path), and starts their timers.
fn warm(state: &Arc<State>) {
    let active = state.active.load_full();
    let created = chain::WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        // A new configuration, or a failed VM whose backoff has passed.
        if vms.generation() >= active.generation && !vms.retry_due() {
            return Vec::new();
        }
        vms.sync(&active);
        let mut created = Vec::new();
        let services = chain::HOSTS_SERVICE_PLUGINS.get();
        for filter in active
            .filters
            .iter()
            .filter(|f| f.module().is_some())
            .filter(|f| services || f.plugin_type != config::PluginType::Service)
        {
            match vms.get(&state.host, filter, &active.embedder) {
                Ok((vm, true)) => created.push((filter.clone(), vm)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(filter = %filter.name, %e, "could not warm the filter's VM")
                }
            }
        }
        created
    });
    for (filter, vm) in created {
        let effects = vm.borrow_mut().0.take_effects();
        timers::handle_root_effects(state, &active, &filter, &vm, effects);
    }
}

/// What a worker thread serves.
#[derive(Clone)]
enum Role {
    Proxy {
        tls: Option<tokio_rustls::TlsAcceptor>,
        /// `limits.maxConnections` of this listener, shared by every worker.
        slots: Arc<Semaphore>,
        /// The listener's address, as metrics label it.
        name: Arc<str>,
        /// A TCP listener ([`tcp`]): connections are proxied byte for byte, not as HTTP.
        tcp: Option<tcp::TcpListenerSpec>,
        /// A plain listener that speaks HTTP/2 only (`listeners[].http2Only`).
        http2_only: bool,
    },
    Admin,
}

/// Backoff after a failed accept (such as EMFILE, out of descriptors): doubled from the
/// first to the last value while accepts keep failing, so the loop waits for descriptors
/// to come back instead of spinning on the error.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_LAST: Duration = Duration::from_secs(1);
/// At most one log line per listener per interval about failing accepts.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

fn run_worker(listeners: Vec<(std::net::TcpListener, Role)>, state: Arc<State>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("worker runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let proxy = listeners
            .iter()
            .any(|(_, r)| matches!(r, Role::Proxy { .. }));
        // Every connection this worker serves; the drain waits for them.
        let connections = TaskTracker::new();
        for (listener, role) in listeners {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            tokio::task::spawn_local(accept_loop(
                listener,
                role,
                state.clone(),
                connections.clone(),
            ));
        }
        if proxy {
            let mut changed = state.active.subscribe();
            // Queue notices for this worker's VMs, posted from any worker.
            let (queue_tx, mut queue_rx) = tokio::sync::mpsc::unbounded_channel();
            chain::set_worker_queue(queue_tx);
            let mut retry = tokio::time::interval(chain::RETRY_CHECK_INTERVAL);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            warm(&state);
            loop {
                tokio::select! {
                    _ = state.shutdown.cancelled() => break,
                    r = changed.changed() => match r {
                        Ok(()) => warm(&state),
                        Err(_) => break,
                    },
                    Some(ready) = queue_rx.recv() => timers::on_queue_ready(&state, ready),
                    _ = retry.tick() => {
                        if chain::WORKER_VMS.with(|vms| vms.borrow().retry_due()) {
                            warm(&state);
                        }
                    }
                }
            }
        } else {
            state.shutdown.cancelled().await;
        }
        // Draining: the accept loops have stopped and each connection finishes its in-flight
        // requests; whatever is left at the drain timeout is cut when the runtime drops.
        connections.close();
        if tokio::time::timeout(state.drain_timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "drain timeout: closing connections still in flight"
            );
        }
    });
}

/// A descriptor held by the admin listener for the moment the process runs out: freed to
/// accept one admin connection (so `/live` answers while the proxy is saturated), and
/// taken back when that connection closes.
struct Reserve(std::cell::RefCell<Option<std::fs::File>>);

impl Reserve {
    fn refill(&self) {
        let mut slot = self.0.borrow_mut();
        if slot.is_none() {
            *slot = std::fs::File::open("/dev/null").ok();
        }
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24): this process; ENFILE (23): the whole system.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Accepts connections on one listener until shutdown begins.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    role: Role,
    state: Arc<State>,
    connections: TaskTracker,
) {
    let label: Arc<str> = match &role {
        Role::Proxy { name, .. } => name.clone(),
        Role::Admin => "admin".into(),
    };
    let reserve = std::rc::Rc::new(Reserve(Default::default()));
    if matches!(role, Role::Admin) {
        reserve.refill();
    }
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut failures_unlogged = 0u64;
    let mut last_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                a
            }
            Err(e) => {
                state.metrics.accept_error(&label);
                failures_unlogged += 1;
                if last_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::warn!(listener = %label, error = %e, failures = failures_unlogged, backoff = ?backoff, "accept failed; backing off");
                    failures_unlogged = 0;
                    last_log = Some(Instant::now());
                }
                if out_of_descriptors(&e) && reserve.0.borrow_mut().take().is_some() {
                    // The admin listener's reserved descriptor is free now: accept at once.
                    continue;
                }
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_LAST);
                continue;
            }
        };
        let permit = match &role {
            Role::Proxy { slots, .. } => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    // Over limits.maxConnections: closed at once, counted.
                    state.metrics.connection_overflow(&label);
                    drop(stream);
                    continue;
                }
            },
            Role::Admin => None,
        };
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr().unwrap_or(peer);
        let state = state.clone();
        let role = role.clone();
        let label = label.clone();
        let reserve = reserve.clone();
        connections.spawn_local(async move {
            let _permit = permit;
            state.metrics.connection(&label, 1);
            match role {
                Role::Admin => {
                    let s = state.clone();
                    let service = service_fn(move |req| admin::handle(s.clone(), req));
                    serve(TokioIo::new(stream), service, &state, None, None).await;
                }
                Role::Proxy {
                    tcp: Some(spec),
                    tls,
                    ..
                } => match tls {
                    None => tcp::serve(state.clone(), spec, stream, peer, local_addr).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(
                            state.timeouts.tls_handshake,
                            acceptor.accept(stream),
                        );
                        if let Ok(Ok(tls)) = handshake.await {
                            tcp::serve(state.clone(), spec, tls, peer, local_addr).await;
                        }
                    }
                },
                Role::Proxy {
                    tls: None,
                    http2_only,
                    ..
                } => {
                    let activity = Arc::new(ConnActivity::default());
                    let conn = activity.clone();
                    let s = state.clone();
                    let service = service_fn(move |req| {
                        proxy::handle(s.clone(), req, peer, local_addr, false, Some(conn.clone()))
                    });
                    if http2_only {
                        // Only HTTP/2: a client that does not start with its preface gets a
                        // GOAWAY, not an HTTP/1.1 answer.
                        let header_read = state.timeouts.header_read;
                        if let Some(stream) = preface::expect(stream, header_read).await {
                            let io = TokioIo::new(stream);
                            serve(io, service, &state, Some(activity), Some(true)).await;
                        }
                    } else {
                        serve(TokioIo::new(stream), service, &state, Some(activity), None).await;
                    }
                }
                Role::Proxy {
                    tls: Some(acceptor),
                    ..
                } => {
                    // A failed or slow handshake only ends this connection.
                    let handshake =
                        tokio::time::timeout(state.timeouts.tls_handshake, acceptor.accept(stream));
                    if let Ok(Ok(tls)) = handshake.await {
                        // The protocol ALPN chose is the only one spoken (h2spec 3.5/2: an
                        // invalid HTTP/2 preface closes the connection, not an HTTP/1 400).
                        let alpn = tls.get_ref().1.alpn_protocol().map(|p| p == b"h2");
                        let activity = Arc::new(ConnActivity::default());
                        let conn = activity.clone();
                        let s = state.clone();
                        let service = service_fn(move |req| {
                            proxy::handle(
                                s.clone(),
                                req,
                                peer,
                                local_addr,
                                true,
                                Some(conn.clone()),
                            )
                        });
                        serve(TokioIo::new(tls), service, &state, Some(activity), alpn).await;
                    }
                }
            }
            state.metrics.connection(&label, -1);
            // The admin connection's descriptor is closed: take the reserve back at once.
            reserve.refill();
        });
    }
}

/// Serves HTTP/1.1 or HTTP/2 (by preface or ALPN) on one connection, with the configured
/// timeouts and buffer limits, until the peer is done, the connection has been idle for
/// `timeouts.idle` (`timeouts.headerRead` before its first request), or shutdown begins;
/// in the last two cases the connection finishes what is in flight and closes (HTTP/2
/// GOAWAY, HTTP/1 `Connection: close`). `h2`: the protocol TLS negotiated by ALPN (HTTP/2 or
/// HTTP/1.1 only), `None` to tell them apart by the HTTP/2 preface.
async fn serve<I, S>(
    io: I,
    service: S,
    state: &State,
    activity: Option<Arc<ConnActivity>>,
    h2: Option<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<proxy::Body>,
            Error = std::convert::Infallible,
        > + 'static,
    S::Future: 'static,
{
    let (t, l) = (&state.timeouts, &state.limits);
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(t.header_read)
        // The head must fit the read buffer: past it, 431.
        .max_buf_size(l.max_request_headers_bytes.max(8192));
    let stream_buffer = l.per_stream_buffer_bytes();
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .initial_connection_window_size(l.per_connection_buffer_bytes as u32)
        .initial_stream_window_size(stream_buffer as u32)
        .max_send_buf_size(stream_buffer)
        .max_header_list_size(l.max_request_headers_bytes as u32)
        .keep_alive_interval(t.keep_alive_interval)
        .keep_alive_timeout(t.keep_alive_timeout);
    let builder = match h2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    let idle = async {
        match &activity {
            Some(a) => a.idle_for(t.header_read, t.idle).await,
            None => std::future::pending().await,
        }
    };
    // Runs the connection until it ends, or until shutdown or idleness asks it to finish.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = state.shutdown.cancelled() => {}
                _ = idle => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }};
    }
    if h2 == Some(true) {
        // HTTP/2 only (ALPN h2, or an http2Only listener): hyper-util's upgradeable
        // connection would read the first bytes to pick a version and answer an invalid
        // preface as HTTP/1.1; HTTP/2 CONNECT needs no connection upgrade.
        drive!(builder.serve_connection(io, service))
    } else {
        // With upgrades: an HTTP/1.1 CONNECT accepted by a route (`tunnel`) takes the
        // connection over.
        drive!(builder.serve_connection_with_upgrades(io, service))
    }
}
