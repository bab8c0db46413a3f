//! `wasmfilter-operator run`: the operator process, wired together.
//!
//! ```text
//!  start ─► admin listener (/live, /ready=503, /metrics)
//!        ─► [leader election: wait for the Lease]          (--no-leader-election skips it)
//!        ─► leading: gRPC listener (FilterDiscovery) + WasmFilter controller
//!             /ready=200 once every WasmFilter of the first list was reconciled once, and
//!             while the API server answers the watch
//!             (the first snapshot goes out once every listed filter was reconciled once)
//!        ─► stop (SIGTERM, Operator::stop): controller finishes its reconciles (at most
//!             STOP_TIMEOUT, then they are abandoned), gRPC streams end, the Lease is
//!             released, then the admin listener closes
//!        ─► Lease lost: everything stops and `wait` returns the error; the binary exits
//!             non-zero and the Deployment restarts it as a follower
//! ```
//!
//! A follower neither reconciles nor accepts dataplane streams: there is one writer of
//! status and one source of snapshots. Its `/ready` answers 503, so the Service sends
//! dataplane streams to the leader only; dataplanes keep their last good chain while they
//! reconnect after a failover.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wasmfilter_oci::{ModuleCache, Resolver, ResolverConfig};

use crate::admin::{Admin, Health, Metrics};
use crate::control::ControlPlane;
use crate::controller;
use crate::grpc::{self, ServerTls};
use crate::leader::{Elector, LeaseConfig};

/// Flags of `wasmfilter-operator run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Where dataplanes connect (FilterDiscovery over gRPC).
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub grpc_listen: SocketAddr,
    /// /live, /ready and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// The module cache (content-addressed, shared by every WasmFilter). Default:
    /// $HOME/.cache/wasmfilter/operator, or /var/cache/wasmfilter without HOME.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Server certificate (PEM) of the gRPC listener; with --tls-key and --tls-client-ca.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that dataplane client certificates must chain to (mTLS).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve gRPC without TLS: required when no --tls-* flags are given.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "wasmfilter-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease and in Events. Default: POD_NAME, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// A registry (HOST:PORT) spoken to over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// How often a pullPolicy Always tag is re-resolved (ms, s or m); also the longest retry delay.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub refresh_interval: Duration,
    /// The largest snapshot a dataplane is sent, in bytes or with a Ki, Mi or Gi suffix (at
    /// most the 64Mi gRPC message limit). A filter that would take a dataplane's chain past it
    /// is left out of that chain and its status says SnapshotBudgetExceeded; the others roll
    /// out.
    #[arg(
        long,
        env = "WASMFILTER_SNAPSHOT_BUDGET",
        default_value_t = grpc::limits::SNAPSHOT_BUDGET as u64,
        value_parser = parse_snapshot_budget
    )]
    pub snapshot_budget: u64,
    /// The least time between two writes of a WasmFilter's status.stats (ms, s or m). Stats are
    /// written only when their state changes (see `status::StatsState`), never for counter
    /// growth alone.
    #[arg(
        long,
        env = "WASMFILTER_STATUS_STATS_INTERVAL",
        default_value = "60s",
        value_parser = parse_duration
    )]
    pub status_stats_interval: Duration,
    /// Lead without a Lease: for a single replica, or tests.
    #[arg(long)]
    pub no_leader_election: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    wasmfilter_api::parse_duration(s)
}

fn parse_snapshot_budget(s: &str) -> Result<u64, String> {
    let budget = wasmfilter_api::parse_quantity(s)?;
    let max = grpc::limits::MAX_OUTBOUND_MESSAGE as u64;
    if budget > max {
        return Err(format!(
            "{budget} bytes is more than the gRPC message limit of {max} bytes (64Mi): a \
             snapshot that large could never be sent; give at most 64Mi"
        ));
    }
    Ok(budget)
}

impl RunArgs {
    /// The defaults of every flag, for tests: loopback ports chosen by the OS, plaintext,
    /// no leader election, the given cache directory.
    pub fn for_tests(cache_dir: PathBuf) -> RunArgs {
        RunArgs {
            grpc_listen: "127.0.0.1:0".parse().expect("valid address"),
            admin_listen: "127.0.0.1:0".parse().expect("valid address"),
            cache_dir: Some(cache_dir),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure_plaintext: true,
            lease_namespace: "default".into(),
            lease_name: "wasmfilter-operator".into(),
            identity: Some("test".into()),
            insecure_registries: Vec::new(),
            refresh_interval: Duration::from_secs(300),
            snapshot_budget: grpc::limits::SNAPSHOT_BUDGET as u64,
            status_stats_interval: controller::Config::default().stats_interval,
            no_leader_election: true,
        }
    }

    /// The gRPC TLS material, after checking the TLS flags go together.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTls>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                if self.insecure_plaintext {
                    anyhow::bail!(
                        "--insecure-plaintext contradicts --tls-cert/--tls-key/--tls-client-ca: \
                         give one or the other"
                    );
                }
                Ok(Some(ServerTls::from_files(cert, key, ca)?))
            }
            (None, None, None) => {
                if !self.insecure_plaintext {
                    anyhow::bail!(
                        "no TLS for the gRPC listener: give --tls-cert, --tls-key and \
                         --tls-client-ca (mTLS with the dataplanes), or --insecure-plaintext to \
                         serve dataplanes without TLS"
                    );
                }
                Ok(None)
            }
            _ => anyhow::bail!(
                "--tls-cert, --tls-key and --tls-client-ca go together: give all three, or none \
                 with --insecure-plaintext"
            ),
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            match std::env::var_os("HOME").filter(|h| !h.is_empty() && h != "/") {
                Some(home) => PathBuf::from(home).join(".cache/wasmfilter/operator"),
                None => PathBuf::from("/var/cache/wasmfilter"),
            }
        })
    }

    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| format!("wasmfilter-operator-{}", std::process::id()))
    }
}

/// A running operator.
pub struct Operator {
    admin_addr: SocketAddr,
    grpc_addr: watch::Receiver<Option<SocketAddr>>,
    control: Arc<ControlPlane>,
    health: Arc<Health>,
    metrics: Metrics,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<anyhow::Result<()>>,
    admin: JoinHandle<()>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("admin_addr", &self.admin_addr)
            .field("grpc_addr", &*self.grpc_addr.borrow())
            .finish_non_exhaustive()
    }
}

/// Completes once `true` is sent (or the sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

impl Operator {
    /// Starts with the Kubernetes client from KUBECONFIG or the in-cluster service account.
    pub async fn start(args: RunArgs) -> anyhow::Result<Operator> {
        install_crypto_provider();
        let client = Client::try_default()
            .await
            .context("connecting to Kubernetes (KUBECONFIG, ~/.kube/config or in-cluster)")?;
        Operator::start_with_client(args, client).await
    }

    /// Starts with a given client. Returns once the admin listener is bound; the gRPC listener
    /// and the controller start when this replica leads (at once with --no-leader-election).
    pub async fn start_with_client(args: RunArgs, client: Client) -> anyhow::Result<Operator> {
        install_crypto_provider();
        let tls = args.tls()?;
        let cache_dir = args.cache_dir();
        let cache = Arc::new(
            ModuleCache::open(&cache_dir)
                .with_context(|| format!("--cache-dir {}", cache_dir.display()))?,
        );
        let resolver = Arc::new(Resolver::new(
            cache.clone(),
            ResolverConfig {
                insecure_registries: args.insecure_registries.clone(),
                ..Default::default()
            },
        ));
        let control = ControlPlane::with_snapshot_budget(cache, args.snapshot_budget);
        let health = Arc::new(Health::default());
        let metrics = Metrics::default();
        let identity = args.identity();

        let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("--admin-listen {}", args.admin_listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin = tokio::spawn(crate::admin::serve(
            Admin::new(health.clone(), metrics.registry(Some(control.clone()))),
            admin_listener,
            stopped(admin_stop_rx),
        ));

        let (grpc_tx, grpc_addr) = watch::channel(None);
        let elector = (!args.no_leader_election).then(|| {
            Elector::new(
                client.clone(),
                LeaseConfig::new(&args.lease_namespace, &args.lease_name, &identity),
            )
        });
        let config = controller::Config {
            refresh_interval: args.refresh_interval,
            stats_interval: args.status_stats_interval,
            instance: Some(identity),
            metrics: metrics.clone(),
            health: health.clone(),
            ..Default::default()
        };
        let ctx = controller::Context::new(client, control.clone(), resolver, config);
        let grpc_listen = args.grpc_listen;
        let control2 = control.clone();
        let health2 = health.clone();
        let task = tokio::spawn(async move {
            let result = lead(
                elector.as_ref(),
                ctx,
                control2,
                health2,
                grpc_listen,
                tls,
                grpc_tx,
                stop_rx,
            )
            .await;
            if let Some(elector) = &elector {
                elector.release().await;
            }
            let _ = admin_stop.send(true);
            result
        });
        Ok(Operator {
            admin_addr,
            grpc_addr,
            control,
            health,
            metrics,
            stop: Arc::new(stop),
            task,
            admin,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The gRPC listener's address, once this replica leads.
    pub async fn grpc_addr(&self) -> SocketAddr {
        let mut rx = self.grpc_addr.clone();
        let addr = *rx
            .wait_for(|a| a.is_some())
            .await
            .expect("the operator task owns the sender until it ends");
        addr.expect("waited for Some")
    }

    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Asks the operator to stop (see [`wait`](Self::wait)).
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// A handle that stops the operator, usable while [`wait`](Self::wait) runs.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// Waits until the operator ends: after a stop (Ok), or when it lost the Lease or a
    /// listener failed (Err).
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = match self.task.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("operator task failed: {e}")),
        };
        let _ = self.admin.await;
        result
    }

    /// Stops gracefully and waits for the end.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.signal_stop();
        self.wait().await
    }
}

/// Stops an [`Operator`] gracefully.
#[derive(Clone, Debug)]
pub struct Stopper(Arc<watch::Sender<bool>>);

impl Stopper {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// How long a stop waits for reconciles in flight before abandoning them. Below the chart's
/// termination grace period (30 s), with room for releasing the Lease.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for the Lease (if any), then runs the gRPC server and the controller until a stop
/// or the loss of the Lease.
#[allow(clippy::too_many_arguments)]
async fn lead(
    elector: Option<&Elector>,
    ctx: Arc<controller::Context>,
    control: Arc<ControlPlane>,
    health: Arc<Health>,
    grpc_listen: SocketAddr,
    tls: Option<ServerTls>,
    grpc_tx: watch::Sender<Option<SocketAddr>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if let Some(elector) = elector {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = stopped(stop.clone()) => return Ok(()),
        }
    }
    health.set_leader();
    let listener = tokio::net::TcpListener::bind(grpc_listen)
        .await
        .with_context(|| format!("--grpc-listen {grpc_listen}"))?;
    let _ = grpc_tx.send(Some(listener.local_addr()?));
    // Stops the gRPC server and the controller: on a stop, or when the Lease is lost.
    let (inner_stop, inner_rx) = watch::channel(false);
    let mut grpc = tokio::spawn(grpc::serve(
        control,
        listener,
        tls,
        stopped(inner_rx.clone()),
    ));
    let controller = tokio::spawn(ctx.run(stopped(inner_rx)));
    let hold = async {
        match elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = stopped(stop) => Ok(()),
        lost = hold => Err(anyhow::Error::new(lost).context("lost leadership; exiting so a new replica starts as a follower")),
        served = &mut grpc => Err(match served {
            Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped"),
            Ok(Err(e)) => e.context("the gRPC server failed"),
            Err(e) => anyhow::anyhow!("the gRPC server task failed: {e}"),
        }),
    };
    let _ = inner_stop.send(true);
    // Reconciles in flight finish, within a bound: one stuck on an API server that does not
    // answer (retrying a status write) must not hold the stop until the kubelet's SIGKILL.
    // Streams just end; the dataplanes keep their chains and reconnect to the next leader.
    let controller_abort = controller.abort_handle();
    let grpc_abort = grpc.abort_handle();
    let drain = async {
        let _ = controller.await;
        if !grpc.is_finished() {
            let _ = grpc.await;
        }
    };
    if tokio::time::timeout(STOP_TIMEOUT, drain).await.is_err() {
        tracing::warn!(
            "the controller or gRPC server did not stop within {STOP_TIMEOUT:?}; abandoning \
             the reconciles still running (they are redone by the next leader)"
        );
        controller_abort.abort();
        grpc_abort.abort();
    }
    outcome
}

/// Installs ring as the process-wide rustls provider (kube-client, tonic and oci-client are
/// all built without one of their own choosing).
pub fn install_crypto_provider() {
    // Fails only if a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn the_snapshot_budget_and_the_stats_interval_default_to_the_limits_and_parse_sizes() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.snapshot_budget, 32 << 20);
        assert_eq!(
            args.status_stats_interval,
            controller::Config::default().stats_interval,
            "the flag's default is the controller's"
        );
        let args = parse(&["--snapshot-budget", "16Mi", "--status-stats-interval", "2m"]).unwrap();
        assert_eq!(args.snapshot_budget, 16 << 20);
        assert_eq!(args.status_stats_interval, Duration::from_secs(120));
        assert_eq!(
            parse(&["--snapshot-budget", "1048576"])
                .unwrap()
                .snapshot_budget,
            1 << 20
        );
        let err = parse(&["--snapshot-budget", "65Mi"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--snapshot-budget") && err.contains("gRPC message limit"),
            "{err}"
        );
        let err = parse(&["--snapshot-budget", "32MB"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("Ki, Mi or Gi"), "{err}");
    }
}
