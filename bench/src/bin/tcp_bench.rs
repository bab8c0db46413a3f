//! `tcp_bench`: TCP proxying side by side with nginx (`stream`) and HAProxy (`mode tcp`), and
//! writes docs/benchmarks-tcp.md.
//!
//! Layout (as in proxy_bench.rs): every proxy gets one worker pinned to CPU 1; this runner,
//! which is both the load generator and the backend, pins itself to CPU 0. Every peer runs
//! the same load in the same run, in alternating rounds, so the tables compare ratios
//! measured side by side.
//!
//! The backend (in this process, its own thread and event loop) has two ports:
//! - a sink: reads a connection to its end, discards the bytes, answers with the count it
//!   received (8 bytes, little endian) and closes; the client checks the count;
//! - an echo: sends back what it reads, and closes after the client's end of stream.
//!
//! Scenarios:
//! - T1 bulk throughput: [`BULK_CONNECTIONS`] parallel connections through the proxy to the
//!   sink, each sending its share of the round's volume one way, then half-closing and
//!   waiting for the sink's count. Bytes/s from the first connect to the last count.
//! - T2 connection rate: [`RATE_CLIENTS`] clients, each in a loop for a fixed time: connect
//!   through the proxy to the echo, send [`MESSAGE_BYTES`], read them back, close.
//!
//! The proxy's CPU time (utime + stime of the whole process from `/proc/<pid>/stat`, 10 ms
//! ticks) is read around each measured run.
//!
//! Peers: nginx (1 worker, `stream`), HAProxy (`nbthread 1`, `mode tcp`), wasmfilter with no
//! filter and with one network filter (`filters/rust/tcp_guard`, a `deny` pattern the load
//! never sends and an empty `mask`, so it inspects every chunk and changes nothing).
//!
//! `--quick`: one round, smaller volume, shorter runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The backend's sink port (T1).
const SINK_PORT: u16 = 18280;
/// The backend's echo port (T2).
const ECHO_PORT: u16 = 18281;
/// The proxy's listener that forwards to the sink.
const BULK_PORT: u16 = 18282;
/// The proxy's listener that forwards to the echo.
const RATE_PORT: u16 = 18283;
/// The dataplane's admin port.
const ADMIN_PORT: u16 = 18902;
/// Parallel connections of T1.
const BULK_CONNECTIONS: usize = 4;
/// Bytes per write of a T1 client.
const WRITE_CHUNK_BYTES: usize = 64 << 10;
/// Concurrent clients of T2.
const RATE_CLIENTS: usize = 8;
/// Bytes a T2 client sends and reads back.
const MESSAGE_BYTES: usize = 64;
/// Longest a single connect, write or read may take before it counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The `deny` pattern of the filtered peer: the load sends only `x` bytes, so it never occurs.
const NEVER_SENT: &str = "tcp-bench-never-sent";

struct Settings {
    rounds: usize,
    /// T1 bytes per round (all connections together).
    bulk_bytes: u64,
    /// T1 warm-up bytes before each measured run.
    bulk_warmup_bytes: u64,
    /// T2 measured time.
    rate_time: Duration,
    /// T2 warm-up time.
    rate_warmup: Duration,
}

/// A process that is killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 20 s")
}

fn wait_port_free(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(cpu: u32, program: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log)?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(program)
        .args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(Proc(child))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn version(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not found".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Backend: sink and echo, on this process's CPU.

async fn sink(mut conn: TcpStream) {
    let mut buf = vec![0u8; WRITE_CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = conn.write_all(&total.to_le_bytes()).await;
    let _ = conn.shutdown().await;
}

async fn echo(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = conn.shutdown().await;
}

/// Starts the backend on its own thread (and event loop); it serves until the process ends.
fn backend() -> anyhow::Result<()> {
    let sink_l = std::net::TcpListener::bind(("127.0.0.1", SINK_PORT))
        .with_context(|| format!("binding the sink on 127.0.0.1:{SINK_PORT}"))?;
    let echo_l = std::net::TcpListener::bind(("127.0.0.1", ECHO_PORT))
        .with_context(|| format!("binding the echo on 127.0.0.1:{ECHO_PORT}"))?;
    sink_l.set_nonblocking(true)?;
    echo_l.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            rt.block_on(async move {
                let sink_l = TcpListener::from_std(sink_l).expect("sink listener");
                let echo_l = TcpListener::from_std(echo_l).expect("echo listener");
                loop {
                    tokio::select! {
                        Ok((c, _)) = sink_l.accept() => { tokio::spawn(sink(c)); }
                        Ok((c, _)) = echo_l.accept() => { tokio::spawn(echo(c)); }
                        else => {}
                    }
                }
            });
        })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load.

/// One measured run's figures.
#[derive(Clone, Debug, Default)]
struct Run {
    /// T1: bytes/s; T2: connections/s.
    rate: f64,
    /// T1: bytes moved; T2: connections completed.
    units: f64,
    /// T2: connection time percentiles (connect to close), µs.
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Wall time of the run, s.
    secs: f64,
    /// Proxy CPU seconds over the run.
    cpu_s: Option<f64>,
    rss_mib: Option<f64>,
}

async fn bulk_one(bytes: u64) -> anyhow::Result<()> {
    let mut conn = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(("127.0.0.1", BULK_PORT)))
        .await
        .context("connect timed out")??;
    let chunk = vec![b'x'; WRITE_CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(WRITE_CHUNK_BYTES as u64) as usize;
        tokio::time::timeout(IO_TIMEOUT, conn.write_all(&chunk[..n]))
            .await
            .context("write timed out")??;
        left -= n as u64;
    }
    conn.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(IO_TIMEOUT, conn.read_exact(&mut count))
        .await
        .context("waiting for the sink's count timed out")??;
    let got = u64::from_le_bytes(count);
    if got != bytes {
        bail!("the sink received {got} bytes of {bytes}");
    }
    Ok(())
}

/// T1: `total` bytes over [`BULK_CONNECTIONS`] connections.
async fn bulk(total: u64) -> Run {
    let per = total / BULK_CONNECTIONS as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..BULK_CONNECTIONS)
        .map(|_| tokio::spawn(bulk_one(per)))
        .collect();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("  bulk connection failed: {e:#}");
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = per * (BULK_CONNECTIONS as u64 - errors);
    Run {
        rate: moved as f64 / secs,
        secs,
        units: moved as f64,
        errors,
        ..Run::default()
    }
}

async fn exchange_once(msg: &[u8]) -> anyhow::Result<()> {
    let mut conn = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(("127.0.0.1", RATE_PORT)))
        .await
        .context("connect timed out")??;
    conn.set_nodelay(true)?;
    tokio::time::timeout(IO_TIMEOUT, conn.write_all(msg))
        .await
        .context("write timed out")??;
    let mut back = [0u8; MESSAGE_BYTES];
    tokio::time::timeout(IO_TIMEOUT, conn.read_exact(&mut back))
        .await
        .context("read timed out")??;
    if back[..] != msg[..] {
        bail!("the echo sent back other bytes");
    }
    Ok(())
}

/// T2: [`RATE_CLIENTS`] clients making short connections until `time` has passed.
async fn rate(time: Duration) -> Run {
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..RATE_CLIENTS)
        .map(|_| {
            tokio::spawn(async move {
                let msg = [b'x'; MESSAGE_BYTES];
                let mut times = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match exchange_once(&msg).await {
                        Ok(()) => times.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
                (times, errors, first_error)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((mut ts, e, first)) = t.await {
            times.append(&mut ts);
            errors += e;
            if let Some(first) = first {
                eprintln!("  {e} connection(s) failed, first: {first}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if times.is_empty() {
            0.0
        } else {
            times[((times.len() - 1) as f64 * p).round() as usize]
        }
    };
    Run {
        rate: times.len() as f64 / secs,
        secs,
        units: times.len() as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
        ..Run::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Peers.

#[derive(Clone)]
enum Peer {
    Nginx,
    Haproxy,
    /// `filter`: the `tcp_guard` module and its `deny` pattern.
    Wasmfilter {
        filter: Option<(PathBuf, &'static str)>,
    },
}

impl Peer {
    fn label(&self) -> &'static str {
        match self {
            Peer::Nginx => "nginx 1 worker (stream)",
            Peer::Haproxy => "HAProxy 1 thread (mode tcp)",
            Peer::Wasmfilter { filter: None } => "wasmfilter, no filter",
            Peer::Wasmfilter {
                filter: Some((_, "")),
            } => "wasmfilter, 1 network filter, empty deny (no scan)",
            Peer::Wasmfilter { filter: Some(_) } => "wasmfilter, 1 network filter",
        }
    }

    fn start(&self, dir: &Path, dataplane: &Path, stream_module: &Path) -> anyhow::Result<Proc> {
        wait_port_free(BULK_PORT);
        wait_port_free(RATE_PORT);
        let d = dir.display();
        let proc = match self {
            Peer::Nginx => {
                let conf = dir.join("nginx-tcp.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "load_module {module};\n\
                         daemon off; master_process off; worker_processes 1; pid {d}/nginx-tcp.pid; error_log {d}/nginx-tcp.err warn;\n\
                         events {{ worker_connections 4096; }}\n\
                         stream {{ proxy_half_close on;\n\
                           server {{ listen 127.0.0.1:{BULK_PORT}; proxy_pass 127.0.0.1:{SINK_PORT}; }}\n\
                           server {{ listen 127.0.0.1:{RATE_PORT}; proxy_pass 127.0.0.1:{ECHO_PORT}; }}\n\
                         }}\n",
                        module = stream_module.display()
                    ),
                )?;
                spawn(
                    1,
                    "nginx",
                    &["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()],
                    &dir.join("nginx-tcp.log"),
                )?
            }
            Peer::Haproxy => {
                let conf = dir.join("haproxy-tcp.cfg");
                std::fs::write(
                    &conf,
                    format!(
                        "global\n  nbthread 1\n  maxconn 4096\n\
                         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                         frontend bulk\n  bind 127.0.0.1:{BULK_PORT}\n  default_backend sink\n\
                         frontend rate\n  bind 127.0.0.1:{RATE_PORT}\n  default_backend echo\n\
                         backend sink\n  server s1 127.0.0.1:{SINK_PORT}\n\
                         backend echo\n  server e1 127.0.0.1:{ECHO_PORT}\n"
                    ),
                )?;
                spawn(
                    1,
                    "haproxy",
                    &["-f", conf.to_str().unwrap()],
                    &dir.join("haproxy-tcp.log"),
                )?
            }
            Peer::Wasmfilter { filter } => {
                let mut yaml = format!(
                    "admin: 127.0.0.1:{ADMIN_PORT}\nworkers: 1\n\
                     listeners:\n\
                     \x20 - name: bulk\n    address: 127.0.0.1:{BULK_PORT}\n    protocol: TCP\n    cluster: sink\n\
                     \x20 - name: rate\n    address: 127.0.0.1:{RATE_PORT}\n    protocol: TCP\n    cluster: echo\n\
                     routes:\n  - name: all\n    cluster: echo\n\
                     clusters:\n\
                     \x20 - name: sink\n    endpoints: [\"127.0.0.1:{SINK_PORT}\"]\n\
                     \x20 - name: echo\n    endpoints: [\"127.0.0.1:{ECHO_PORT}\"]\n\
                     filters:\n"
                );
                match filter {
                    None => yaml.push_str("  []\n"),
                    Some((module, deny)) => {
                        let _ = writeln!(
                            yaml,
                            "  - name: guard\n    type: Network\n    listeners: [bulk, rate]\n    module: {}\n    logLevel: warn\n    config: {{\"deny\": \"{deny}\", \"mask\": \"\"}}",
                            module.display()
                        );
                    }
                }
                let conf = dir.join("wasmfilter-tcp.yaml");
                std::fs::write(&conf, yaml)?;
                spawn(
                    1,
                    dataplane.to_str().unwrap(),
                    &["--config", conf.to_str().unwrap()],
                    &dir.join("wasmfilter-tcp.log"),
                )?
            }
        };
        wait_for_port(BULK_PORT)?;
        wait_for_port(RATE_PORT)?;
        Ok(proc)
    }
}

/// Runs `load` and reads the proxy's CPU time around it.
fn measured<F: std::future::Future<Output = Run>>(
    rt: &tokio::runtime::Runtime,
    pid: u32,
    load: F,
) -> Run {
    let before = cpu_seconds(pid);
    let mut run = rt.block_on(load);
    if let (Some(b), Some(a)) = (before, cpu_seconds(pid)) {
        run.cpu_s = Some(a - b);
    }
    run.rss_mib = rss_mib(pid);
    run
}

/// Both scenarios on one started peer: warm-up and measured T1, then warm-up and measured T2.
fn measure(
    peer: &Peer,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    dataplane: &Path,
    stream_module: &Path,
    s: &Settings,
) -> anyhow::Result<(Run, Run)> {
    let proc = peer.start(dir, dataplane, stream_module)?;
    let pid = proc.0.id();
    rt.block_on(bulk(s.bulk_warmup_bytes));
    let t1 = measured(rt, pid, bulk(s.bulk_bytes));
    rt.block_on(rate(s.rate_warmup));
    let t2 = measured(rt, pid, rate(s.rate_time));
    drop(proc);
    Ok((t1, t2))
}

/// The run with the median rate; errors are summed over all runs.
fn median(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut m = sorted[sorted.len() / 2].clone();
    m.errors = runs.iter().map(|r| r.errors).sum();
    m
}

// ---------------------------------------------------------------------------------------------
// Report.

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// The proxy's CPU time ÷ the run's wall time.
fn busy(m: &Run) -> String {
    m.cpu_s
        .map(|c| format!("{:.0}%", c * 100.0 / m.secs.max(1e-9)))
        .unwrap_or_else(|| "–".into())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

struct Results {
    peers: Vec<Peer>,
    bulk: Vec<Vec<Run>>,
    rate: Vec<Vec<Run>>,
}

fn report(r: &Results, s: &Settings, setup: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# TCP proxy benchmarks\n\nGenerated by bench/src/bin/tcp_bench.rs (`cargo xtask bench --tcp`, see bench/README.md); do not edit by hand. The HTTP scenarios are in [benchmarks.md](benchmarks.md).\n\n## Setup\n"
    );
    for line in setup {
        let _ = writeln!(md, "- {line}");
    }
    let nginx = r
        .peers
        .iter()
        .position(|p| matches!(p, Peer::Nginx))
        .unwrap();
    let bare = r
        .peers
        .iter()
        .position(|p| matches!(p, Peer::Wasmfilter { filter: None }))
        .unwrap();
    let filtered = r
        .peers
        .iter()
        .position(|p| matches!(p, Peer::Wasmfilter { filter: Some((_, d)) } if !d.is_empty()));
    let unscanned = r
        .peers
        .iter()
        .position(|p| matches!(p, Peer::Wasmfilter { filter: Some((_, d)) } if d.is_empty()));

    let bulk: Vec<Run> = r.bulk.iter().map(|runs| median(runs)).collect();
    let _ = writeln!(
        md,
        "\n## T1: bulk throughput\n\n{BULK_CONNECTIONS} connections, {} MiB per round in all, client → proxy → sink (one way; the sink answers with an 8-byte count that the client checks). Median of the rounds by throughput; \"rounds\" lists every round's MiB/s.\n\n| peer | MiB/s | ÷ nginx | ÷ wasmfilter no filter | proxy CPU s/GiB | proxy busy | proxy RSS MiB | errors | rounds (MiB/s) |\n|---|---|---|---|---|---|---|---|---|",
        s.bulk_bytes / (1 << 20)
    );
    for (i, p) in r.peers.iter().enumerate() {
        let m = &bulk[i];
        let rounds: Vec<String> = r.bulk[i]
            .iter()
            .map(|x| format!("{:.0}", x.rate / MIB))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            p.label(),
            m.rate / MIB,
            ratio(m.rate, bulk[nginx].rate),
            ratio(m.rate, bulk[bare].rate),
            opt(m.cpu_s.map(|c| c / (m.units / GIB).max(1e-9)), 2),
            busy(m),
            opt(m.rss_mib, 1),
            m.errors,
            rounds.join(" / ")
        );
    }

    let rate: Vec<Run> = r.rate.iter().map(|runs| median(runs)).collect();
    let _ = writeln!(
        md,
        "\n## T2: connection rate\n\n{RATE_CLIENTS} clients for {} s each round, each in a loop: connect, send {MESSAGE_BYTES} bytes, read them back from the echo, close. Median of the rounds by rate; p50/p99 are the connect-to-close time of the median round.\n\n| peer | conn/s | ÷ nginx | ÷ wasmfilter no filter | p50 µs | p99 µs | proxy CPU µs/conn | proxy busy | proxy RSS MiB | errors | rounds (conn/s) |\n|---|---|---|---|---|---|---|---|---|---|---|",
        s.rate_time.as_secs_f64()
    );
    for (i, p) in r.peers.iter().enumerate() {
        let m = &rate[i];
        let rounds: Vec<String> = r.rate[i].iter().map(|x| format!("{:.0}", x.rate)).collect();
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            p.label(),
            m.rate,
            ratio(m.rate, rate[nginx].rate),
            ratio(m.rate, rate[bare].rate),
            m.p50_us,
            m.p99_us,
            opt(m.cpu_s.map(|c| c * 1e6 / m.units.max(1.0)), 1),
            busy(m),
            opt(m.rss_mib, 1),
            m.errors,
            rounds.join(" / ")
        );
    }

    let cpu_gib = |m: &Run| m.cpu_s.map(|c| c / (m.units / GIB).max(1e-9));
    let cpu_conn = |m: &Run| m.cpu_s.map(|c| c * 1e6 / m.units.max(1.0));
    let cpu_ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => "–".into(),
    };
    let column = |f: Option<usize>| -> [String; 4] {
        match f {
            Some(f) => [
                ratio(bulk[f].rate, bulk[bare].rate),
                cpu_ratio(cpu_gib(&bulk[f]), cpu_gib(&bulk[bare])),
                ratio(rate[f].rate, rate[bare].rate),
                cpu_ratio(cpu_conn(&rate[f]), cpu_conn(&rate[bare])),
            ],
            None => std::array::from_fn(|_| "–".to_string()),
        }
    };
    let (a, b) = (column(filtered), column(unscanned));
    let _ = writeln!(
        md,
        "\n## The cost of one network filter\n\nwasmfilter with `tcp_guard` ÷ wasmfilter with no filter, same run (medians above). The filter is called for every chunk read from either side (up to 16 KiB) and copies the client's chunk into the guest (`get_downstream_data`); with a `deny` pattern it then scans the chunk for it (`windows(len).any(..)`), with an empty `deny` it does not, so the second column is the host, the Wasm boundary and the copy, and the difference between the two is the guest's own scan.\n\n| figure | `deny` that never occurs | empty `deny` (no scan) |\n|---|---|---|"
    );
    for (i, name) in [
        "T1 throughput",
        "T1 proxy CPU per GiB",
        "T2 connections/s",
        "T2 proxy CPU per connection",
    ]
    .iter()
    .enumerate()
    {
        let _ = writeln!(md, "| {name} | {} | {} |", a[i], b[i]);
    }
    md
}

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings {
            rounds: 1,
            bulk_bytes: 256 << 20,
            bulk_warmup_bytes: 32 << 20,
            rate_time: Duration::from_secs(2),
            rate_warmup: Duration::from_millis(500),
        }
    } else {
        Settings {
            rounds: 3,
            bulk_bytes: 1 << 30,
            bulk_warmup_bytes: 64 << 20,
            rate_time: Duration::from_secs(3),
            rate_warmup: Duration::from_secs(1),
        }
    };
    for tool in ["nginx", "haproxy", "taskset"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!(
                "{tool} not found: install it (apt-get install nginx-light libnginx-mod-stream haproxy util-linux)"
            );
        }
    }
    let stream_module = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
    if !stream_module.exists() {
        bail!(
            "{} not found: install nginx's stream module (apt-get install libnginx-mod-stream)",
            stream_module.display()
        );
    }
    let root = wasmfilter_testkit::repo_root();
    let dataplane = std::env::var("WASMFILTER_DATAPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/wasmfilter-dataplane"));
    if !dataplane.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p wasmfilter-dataplane`",
            dataplane.display()
        );
    }
    let guard = wasmfilter_testkit::rust_filter("tcp_guard").context("building tcp_guard")?;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // The load and the backend share CPU 0: pin this process (its threads inherit it).
    let status = Command::new("taskset")
        .args(["-p", "-c", "0", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("taskset could not pin the runner to CPU 0");
    }

    let started = Instant::now();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = root.join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    backend()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let peers = vec![
        Peer::Nginx,
        Peer::Haproxy,
        Peer::Wasmfilter { filter: None },
        Peer::Wasmfilter {
            filter: Some((guard.clone(), NEVER_SENT)),
        },
        Peer::Wasmfilter {
            filter: Some((guard, "")),
        },
    ];
    let mut results = Results {
        bulk: vec![Vec::new(); peers.len()],
        rate: vec![Vec::new(); peers.len()],
        peers: peers.clone(),
    };
    for round in 0..s.rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..peers.len()).collect()
        } else {
            (0..peers.len()).rev().collect()
        };
        for i in order {
            eprintln!("round {}: {}", round + 1, peers[i].label());
            let (t1, t2) = measure(&peers[i], &rt, &dir, &dataplane, &stream_module, &s)?;
            eprintln!(
                "  T1 {:.0} MiB/s (cpu {:?} s), T2 {:.0} conn/s (cpu {:?} s), errors {}",
                t1.rate / MIB,
                t1.cpu_s,
                t2.rate,
                t2.cpu_s,
                t1.errors + t2.errors
            );
            results.bulk[i].push(t1);
            results.rate[i].push(t2);
        }
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let field3 = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let setup = vec![
        format!(
            "Machine: {cores} cores, {cpu}; load average at the start: {}, at the end: {}",
            field3(&load_start),
            field3(&load_end)
        ),
        format!(
            "Versions: {}; {}; wasmfilter {} (`{}`); runner built in the {} profile",
            version("nginx", &["-v"]),
            version("haproxy", &["-v"]),
            env!("CARGO_PKG_VERSION"),
            dataplane.strip_prefix(&root).unwrap_or(&dataplane).display(),
            if cfg!(debug_assertions) {
                "dev (dependencies at opt-level 1)"
            } else {
                "release"
            }
        ),
        "Layout: each proxy has one worker pinned to CPU 1 (`taskset -c 1`); the runner, which is both the load generator and the backend (sink and echo on their own event loop thread), is pinned to CPU 0. Loopback only; nginx with `proxy_half_close on` (the sink answers after the client's end of stream; HAProxy and wasmfilter pass half-closes by default); access logs off; buffers at each proxy's defaults (nginx `proxy_buffer_size` 16k, HAProxy `tune.bufsize` 16k, wasmfilter 16 KiB reads).".into(),
        format!(
            "Each peer is started afresh per round; T1 after {} MiB of warm-up, T2 after {:.1} s of warm-up. {} round(s), each in the reverse order of the one before, median by throughput. Proxy CPU is utime + stime of the whole proxy process from `/proc/<pid>/stat` (10 ms ticks) over the measured run; RSS from `/proc/<pid>/status` after it.",
            s.bulk_warmup_bytes >> 20,
            s.rate_warmup.as_secs_f64(),
            s.rounds
        ),
        format!(
            "The network filter is `filters/rust/tcp_guard` (Rust SDK) on both listeners with `{{\"deny\": \"{NEVER_SENT}\", \"mask\": \"\"}}` (the load sends only `x` bytes, so nothing is denied or masked) and `logLevel: warn` (its per-connection info lines are not written, so the figure is its data path, not its logging)."
        ),
        "\"Proxy busy\" is the proxy's CPU time ÷ the run's wall time. The client and the backend on CPU 0 make as many socket calls as the proxy on CPU 1, so a light proxy is not saturated (busy well under 100%): its rate is then bounded by CPU 0 and by the other load on the machine, and the figures to compare are the proxy's CPU per GiB and per connection. A peer at about 100% busy is limited by its own CPU.".into(),
        "The machine is shared: other engineers' builds and tests may run during the benchmark (see the load averages), which is why only ratios measured side by side in one run are compared.".into(),
        format!("Run took {:.0} s.", started.elapsed().as_secs_f64()),
    ];
    let md = report(&results, &s, &setup);
    let out = root.join("docs").join("benchmarks-tcp.md");
    std::fs::write(&out, &md)?;
    println!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
