//! S8, control-plane fan-out: one operator (this process: the real ControlPlane and
//! FilterDiscovery server) and N simulated dataplanes (a child process of real gRPC clients,
//! one HTTP/2 connection and stream each, answering every snapshot with an Ack at once).
//!
//! For N = 100, 1000, 5000 it measures: the time from a change (ControlPlane::publish) to each
//! dataplane's Ack being sent (p50/p99/max, both processes read the same wall clock) and to
//! the operator having recorded the last one; the operator's RSS per connected dataplane; and
//! the snapshot bytes sent per change. Writes docs/benchmarks-fanout.md.
//!
//!     cargo xtask bench            # runs this after the proxy scenarios
//!     target/release/fanout [--quick]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio_stream::wrappers::ReceiverStream;
use wasmfilter_api::control::filter_discovery_client::FilterDiscoveryClient;
use wasmfilter_api::control::{Ack, DataplaneMessage, Hello, control_message, dataplane_message};
use wasmfilter_api::{FailurePolicy, FilterLimits, LabelSelector, Phase, RequestMatch};
use wasmfilter_operator::ModuleCache;
use wasmfilter_operator::control::ControlPlane;
use wasmfilter_operator::index::{FilterKey, FilterVersion};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("clients") {
        return clients(&args[1], args[2].parse()?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[100, 1000]
    } else {
        &[100, 1000, 5000]
    };
    let changes = if quick { 3 } else { 5 };
    let mut rows = Vec::new();
    for &n in sizes {
        let row = run(n, changes).with_context(|| format!("N = {n}"))?;
        println!("{row:?}");
        rows.push(row);
    }
    write_report(&rows, changes)?;
    Ok(())
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug)]
struct Row {
    n: usize,
    initial_sync: Duration,
    ack_p50: Duration,
    ack_p99: Duration,
    ack_max: Duration,
    last_ack_recorded: Duration,
    rss_per_dataplane_kib: f64,
    bytes_per_change: u64,
}

fn version(config: &str) -> FilterVersion {
    FilterVersion {
        key: FilterKey::new("bench", "filter"),
        module_digest: format!("sha256:{}", "0".repeat(64)),
        module_size: 200_000,
        root_id: String::new(),
        configuration: config.as_bytes().to_vec(),
        vm_id: String::new(),
        vm_configuration: Vec::new(),
        env: BTreeMap::new(),
        matches: RequestMatch::default(),
        phase: Phase::Default,
        priority: 0,
        failure_policy: FailurePolicy::FailClosed,
        limits: FilterLimits::default(),
        plugin_type: Default::default(),
        listeners: Vec::new(),
    }
}

fn run(n: usize, changes: usize) -> anyhow::Result<Row> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cache_dir = std::env::temp_dir().join(format!("wasmfilter-fanout-{}", std::process::id()));
    let control = ControlPlane::new(Arc::new(ModuleCache::open(&cache_dir)?));
    // No controller: filters are published by hand, so snapshots may go out at once.
    control.mark_synced();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(wasmfilter_operator::grpc::serve(
        control.clone(),
        listener,
        None,
        std::future::pending(),
    ));
    let key = FilterKey::new("bench", "filter");
    control.publish(LabelSelector::default(), version(r#"{"change": 0}"#));
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = rss_kib();

    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["clients", &format!("http://{addr}"), &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    wait(Duration::from_secs(300), || {
        let r = control.rollout(&key);
        r.ready as usize == n
    })
    .with_context(|| format!("{n} dataplanes did not all acknowledge the first snapshot"))?;
    let initial_sync = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss_per_dataplane_kib = (rss_kib().saturating_sub(rss_before)) as f64 / n as f64;

    // Every client prints one line per snapshot: "<revision> <unix nanos when it acked>".
    let mut acks: Vec<Duration> = Vec::new();
    let mut last_recorded = Vec::new();
    let bytes_before = control.counters.snapshot_bytes_sent.load(Ordering::SeqCst);
    // Skip the lines of the initial snapshot.
    for _ in 0..n {
        lines.next().context("client output ended")??;
    }
    for change in 1..=changes {
        let v = version(&format!(r#"{{"change": {change}}}"#));
        let revision = v.revision();
        let t0 = unix_nanos();
        let t0_instant = Instant::now();
        control.publish(LabelSelector::default(), v);
        wait(Duration::from_secs(300), || {
            let r = control.rollout(&key);
            r.ready as usize == n && r.revision.as_deref() == Some(revision.as_str())
        })?;
        last_recorded.push(t0_instant.elapsed());
        let mut seen = 0;
        while seen < n {
            let line = lines.next().context("client output ended")??;
            let (rev, at) = line.split_once(' ').context("bad client line")?;
            if rev != revision {
                continue;
            }
            let at: u128 = at.parse()?;
            acks.push(Duration::from_nanos((at.saturating_sub(t0)) as u64));
            seen += 1;
        }
    }
    let bytes = control.counters.snapshot_bytes_sent.load(Ordering::SeqCst) - bytes_before;
    child.kill()?;
    let _ = child.wait();
    runtime.shutdown_timeout(Duration::ZERO);
    let _ = std::fs::remove_dir_all(&cache_dir);
    acks.sort();
    let pct = |p: f64| acks[((acks.len() as f64 * p) as usize).min(acks.len() - 1)];
    last_recorded.sort();
    Ok(Row {
        n,
        initial_sync,
        ack_p50: pct(0.50),
        ack_p99: pct(0.99),
        ack_max: *acks.last().unwrap(),
        last_ack_recorded: last_recorded[last_recorded.len() / 2],
        rss_per_dataplane_kib,
        bytes_per_change: bytes / changes as u64,
    })
}

fn wait(limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Child process: `n` simulated dataplanes.
fn clients(addr: &str, n: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    runtime.block_on(async {
        for i in 0..n {
            let addr = addr.to_string();
            let out = out_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = client(&addr, i, out).await {
                    eprintln!("client {i}: {e:#}");
                }
            });
            // Connect in bursts, as a fleet rolling out would.
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(out_tx);
        let stdout = std::io::stdout();
        while let Some(line) = out_rx.recv().await {
            let mut lock = stdout.lock();
            writeln!(lock, "{line}")?;
            lock.flush()?;
        }
        Ok(())
    })
}

async fn client(
    addr: &str,
    i: usize,
    out: tokio::sync::mpsc::UnboundedSender<String>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())?
        .connect()
        .await?;
    let mut client = FilterDiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DataplaneMessage {
        kind: Some(dataplane_message::Kind::Hello(Hello {
            id: format!("sim-{i:05}"),
            labels: [("fleet".to_string(), "bench".to_string())].into(),
            version: "bench".into(),
            module_digests: vec![format!("sha256:{}", "0".repeat(64))],
            applied_version: 0,
        })),
    })
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    while let Some(message) = inbound.message().await? {
        let Some(control_message::Kind::Snapshot(snapshot)) = message.kind else {
            continue;
        };
        tx.send(DataplaneMessage {
            kind: Some(dataplane_message::Kind::Ack(Ack {
                version: snapshot.version,
                errors: Vec::new(),
            })),
        })
        .await?;
        let revision = snapshot
            .filters
            .first()
            .map(|f| f.revision.clone())
            .unwrap_or_default();
        let _ = out.send(format!("{revision} {}", unix_nanos()));
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn write_report(rows: &[Row], changes: usize) -> anyhow::Result<()> {
    let mut md = String::new();
    md.push_str("# Control-plane fan-out (S8)\n\n");
    md.push_str(
        "Generated by `cargo xtask bench` (`target/release/fanout`). One operator (the real \
         ControlPlane and FilterDiscovery gRPC server, plain text, in the measuring process) and N \
         simulated dataplanes in a child process: real tonic clients, one HTTP/2 connection and \
         stream each, answering every snapshot with an Ack at once (no module loading: this \
         measures the control plane). Both processes share the machine's 2 cores.\n\n",
    );
    md.push_str(&format!(
        "A change is a new configuration of one filter selected by every dataplane, published \
         through `ControlPlane::publish`; {changes} changes per N. \"Change → Ack\" is measured \
         per dataplane from the publish to the moment the client sent its Ack (wall clock shared \
         by both processes); it includes the operator's 100 ms debounce. \"Last Ack recorded\" \
         is when the operator's index showed every dataplane ready (median over the changes). \
         RSS per dataplane is the operator process's RSS growth from 0 to N connected dataplanes, \
         divided by N.\n\n"
    ));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md.push_str(&format!(
        "Load average when the report was written (other work on the machine skews latencies): {}.\n\n",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    md.push_str("| N | initial sync (connect + snapshot + Ack, all N) | change → Ack p50 | p99 | max | last Ack recorded | operator RSS per dataplane | snapshot bytes per change (all N) | per dataplane |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} KiB | {} | {} |\n",
            r.n,
            ms(r.initial_sync),
            ms(r.ack_p50),
            ms(r.ack_p99),
            ms(r.ack_max),
            ms(r.last_ack_recorded),
            r.rss_per_dataplane_kib,
            r.bytes_per_change,
            r.bytes_per_change / r.n as u64,
        ));
    }
    md.push_str("\nModule bytes are never part of a change: dataplanes fetch a module once by digest (FetchModule) and a configuration change re-sends only the snapshot (see operator/tests/control_protocol.rs, which counts them).\n");
    let path = wasmfilter_testkit::repo_root().join("docs/benchmarks-fanout.md");
    std::fs::write(&path, md)?;
    println!("wrote {}", path.display());
    Ok(())
}
