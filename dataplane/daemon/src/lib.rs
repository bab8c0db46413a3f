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
pub mod proxy;
pub mod state;
pub mod timers;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use wasmfilter_host::{Host, HostConfig};

use crate::chain::Active;
use crate::config::Config;
use crate::state::State;

/// A running dataplane.
pub struct Dataplane {
    pub state: Arc<State>,
    /// The first listener's address (`listen`, else `listeners[0]`).
    pub proxy_addr: SocketAddr,
    /// Every listener's address, in configuration order.
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
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
        for (i, l) in config.all_listeners().iter().enumerate() {
            let tls = match &l.tls {
                Some(t) => Some(tls::acceptor(config_file, t)?),
                None => None,
            };
            let field = match (&config.listen, i) {
                (Some(_), 0) => "listen".to_string(),
                (Some(_), i) => format!("listeners[{}].address", i - 1),
                (None, i) => format!("listeners[{i}].address"),
            };
            let socket = std::net::TcpListener::bind(&l.address).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {field}: cannot bind {}: {e}",
                    config_file.display(),
                    l.address
                )
            })?;
            socket.set_nonblocking(true)?;
            listeners.push((socket, Role::Proxy { tls }));
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
            active: ArcSwap::from_pointee(active),
            metrics,
            clients: Default::default(),
            in_flight: Default::default(),
            ready: AtomicBool::new(false),
            config_file: config_file.to_path_buf(),
            drain_timeout: config.drain_timeout,
            swap: Default::default(),
            link: Default::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
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
            let stop = stop.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || run_worker(mine, state, stop))?,
            );
        }
        {
            let state = state.clone();
            let stop = stop.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("admin".into())
                    .spawn(move || run_worker(vec![(admin, Role::Admin)], state, stop))?,
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
                stop.clone(),
            )?);
        }
        state.ready.store(true, Ordering::SeqCst);
        tracing::info!(proxy_addr = ?proxy_addrs, %admin_addr, filters = state.active.load().filters.len(), "dataplane ready");
        Ok(Dataplane {
            state,
            proxy_addr: proxy_addrs[0],
            proxy_addrs,
            admin_addr,
            stop,
            workers,
        })
    }

    /// Re-reads the configuration file and swaps in the new filter chain. A configuration
    /// that does not load leaves the running one untouched and returns the error.
    pub fn reload(&self) -> anyhow::Result<()> {
        let file = &self.state.config_file;
        let config = Config::load(file)?;
        let _swap = self.state.swap.lock();
        let managed = self.state.active.load().managed();
        let active = Active::build(
            &self.state.host,
            &config,
            file,
            &self.state.metrics,
            managed,
        )?;
        self.state.active.store(Arc::new(active));
        tracing::info!(
            generation = self.state.active.load().generation,
            "configuration reloaded"
        );
        Ok(())
    }

    /// Stops accepting, waits for in-flight requests (up to the drain timeout), then stops.
    pub fn shutdown(self) {
        self.state.ready.store(false, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.state.drain_timeout;
        while self.state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
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
        if vms.generation() >= active.generation {
            return Vec::new();
        }
        vms.sync(&active);
        let mut created = Vec::new();
        for filter in &active.filters {
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
    },
    Admin,
}

fn run_worker(
    listeners: Vec<(std::net::TcpListener, Role)>,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("worker runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let proxy = listeners
            .iter()
            .any(|(_, r)| matches!(r, Role::Proxy { .. }));
        for (listener, role) in listeners {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            tokio::task::spawn_local(accept_loop(listener, role, state.clone(), stop.clone()));
        }
        while !stop.load(Ordering::SeqCst) {
            if proxy {
                warm(&state);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let in-flight connections finish while the caller waits for the drain.
        let drain_until = Instant::now() + state.drain_timeout;
        while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

/// Accepts connections on one listener until shutdown begins.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    role: Role,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        let Ok(Ok((stream, peer))) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr().unwrap_or(peer);
        let state = state.clone();
        let role = role.clone();
        tokio::task::spawn_local(async move {
            match role {
                Role::Admin => {
                    let service = service_fn(move |req| admin::handle(state.clone(), req));
                    serve(TokioIo::new(stream), service).await;
                }
                Role::Proxy { tls: None } => {
                    let service = service_fn(move |req| {
                        proxy::handle(state.clone(), req, peer, local_addr, false)
                    });
                    serve(TokioIo::new(stream), service).await;
                }
                Role::Proxy {
                    tls: Some(acceptor),
                } => {
                    // A failed handshake only ends this connection.
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        proxy::handle(state.clone(), req, peer, local_addr, true)
                    });
                    serve(TokioIo::new(tls), service).await;
                }
            }
        });
    }
}

/// Serves HTTP/1.1 or HTTP/2 (by preface or ALPN) on one connection.
async fn serve<I, S>(io: I, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<proxy::Body>,
            Error = std::convert::Infallible,
        > + 'static,
    S::Future: 'static,
{
    let mut builder = auto::Builder::new(LocalExec);
    builder.http2().max_concurrent_streams(1024);
    let _ = builder.serve_connection(io, service).await;
}
