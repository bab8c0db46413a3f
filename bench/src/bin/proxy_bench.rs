//! `cargo xtask bench`: runs the side-by-side proxy scenarios (S1–S8 of
//! performance-anchors.md §7) and writes docs/benchmarks.md.
//!
//! Layout (performance-anchors.md §7.1): every proxy gets one worker pinned to CPU 1; the load
//! generators (wrk for saturation, oha at a fixed rate) and the backend (nginx `return 200`)
//! share CPU 0. Each peer runs the same load in the same run, in alternating rounds, so the
//! tables report ratios measured side by side rather than absolute figures from different days.
//!
//! Peers: nginx, HAProxy, Pingora (bench/pingora-peer, built by xtask; skipped with a note if
//! `WASMFILTER_PINGORA_BIN` is not there) and wasmfilter with no filter, the native
//! `header_rewrite`, and 1/5/10 Wasm `header_rewrite` filters. oha comes from
//! `WASMFILTER_OHA_BIN` (xtask installs it); S2 is skipped with a note without it.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmfilter_host::{Host, HostConfig, PluginSpec, VmOptions};

const BACKEND_PORT: u16 = 18080;
const PROXY_PORT: u16 = 18081;
const ADMIN_PORT: u16 = 18901;
const CONNECTIONS: u32 = 32;

struct Settings {
    warmup: Duration,
    measure: Duration,
    rounds: usize,
}

/// A process that is killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn work_dir() -> PathBuf {
    wasmfilter_testkit::repo_root().join("target").join("bench")
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

fn backend(dir: &Path) -> anyhow::Result<Proc> {
    let conf = dir.join("backend.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {dir}/backend.pid; error_log {dir}/backend.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
               server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ client_max_body_size 1m; client_body_buffer_size 1m; return 200 \"hello\"; }} }} }}\n",
            dir = dir.display()
        ),
    )?;
    let p = spawn(
        0,
        "nginx",
        &["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()],
        &dir.join("backend.log"),
    )?;
    wait_for_port(BACKEND_PORT)?;
    Ok(p)
}

/// A filter of a wasmfilter peer: a Wasm module or a native filter, with its configuration.
#[derive(Clone)]
struct FilterSpec {
    name: String,
    /// The YAML line that says what runs: `module: PATH` or `native: NAME`.
    source: String,
    config: String,
}

#[derive(Clone)]
enum Peer {
    Direct,
    Nginx,
    Haproxy,
    Pingora(PathBuf),
    Wasmfilter {
        label: String,
        filters: Vec<FilterSpec>,
    },
}

fn wasmfilter_yaml(filters: &[FilterSpec]) -> String {
    let mut yaml = format!(
        "listen: 127.0.0.1:{PROXY_PORT}\nadmin: 127.0.0.1:{ADMIN_PORT}\nworkers: 1\nroutes:\n  - name: all\n    cluster: backend\nclusters:\n  - name: backend\n    endpoints: [\"127.0.0.1:{BACKEND_PORT}\"]\nfilters:\n"
    );
    if filters.is_empty() {
        yaml.push_str("  []\n");
    }
    for f in filters {
        let _ = writeln!(
            yaml,
            "  - name: {}\n    {}\n    config: {}",
            f.name, f.source, f.config
        );
    }
    yaml
}

impl Peer {
    fn label(&self) -> String {
        match self {
            Peer::Direct => "direct (no proxy)".into(),
            Peer::Nginx => "nginx 1 worker".into(),
            Peer::Haproxy => "HAProxy 1 thread".into(),
            Peer::Pingora(_) => "Pingora 1 thread".into(),
            Peer::Wasmfilter { label, .. } => label.clone(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Peer::Direct => BACKEND_PORT,
            _ => PROXY_PORT,
        }
    }

    fn start(&self, dir: &Path, dataplane: &Path) -> anyhow::Result<Option<Proc>> {
        wait_port_free(PROXY_PORT);
        let proc = match self {
            Peer::Direct => return Ok(None),
            Peer::Nginx => {
                let conf = dir.join("nginx-proxy.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemon off; master_process off; worker_processes 1; pid {dir}/proxy.pid; error_log {dir}/proxy.err warn;\n\
                         events {{ worker_connections 4096; }}\n\
                         http {{ access_log off; keepalive_requests 1000000;\n\
                           client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                           upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}\n\
                           server {{ listen 127.0.0.1:{PROXY_PORT}; location / {{ client_max_body_size 1m; client_body_buffer_size 1m; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }} }} }}\n",
                        dir = dir.display()
                    ),
                )?;
                spawn(
                    1,
                    "nginx",
                    &["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()],
                    &dir.join("nginx-proxy.log"),
                )?
            }
            Peer::Haproxy => {
                let conf = dir.join("haproxy.cfg");
                std::fs::write(
                    &conf,
                    format!(
                        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\
                         frontend f\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{BACKEND_PORT}\n"
                    ),
                )?;
                spawn(
                    1,
                    "haproxy",
                    &["-f", conf.to_str().unwrap()],
                    &dir.join("haproxy.log"),
                )?
            }
            Peer::Pingora(bin) => spawn(
                1,
                bin.to_str().unwrap(),
                &[
                    &format!("127.0.0.1:{PROXY_PORT}"),
                    &format!("127.0.0.1:{BACKEND_PORT}"),
                    dir.join("pingora.pid").to_str().unwrap(),
                ],
                &dir.join("pingora.log"),
            )?,
            Peer::Wasmfilter { filters, .. } => {
                let conf = dir.join("wasmfilter.yaml");
                std::fs::write(&conf, wasmfilter_yaml(filters))?;
                spawn(
                    1,
                    dataplane.to_str().unwrap(),
                    &["--config", conf.to_str().unwrap()],
                    &dir.join("wasmfilter.log"),
                )?
            }
        };
        wait_for_port(PROXY_PORT)?;
        Ok(Some(proc))
    }
}

/// One wrk run's figures.
#[derive(Clone, Debug, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: f64,
    errors: u64,
    cpu_us_per_request: Option<f64>,
    rss_mib: Option<f64>,
}

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

/// The pid whose CPU is the proxy's: taskset execs the program, so it is the child itself.
fn parse_duration_us(text: &str) -> f64 {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        (t, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn wrk(port: u16, seconds: u64, script: Option<&Path>) -> anyhow::Result<Run> {
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "0",
        "wrk",
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/bench"));
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            run.p50_us = parse_duration_us(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            run.p99_us = parse_duration_us(v);
        } else if l.contains("requests in") {
            run.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            run.errors += v
                .split(',')
                .filter_map(|p| {
                    p.split_whitespace()
                        .last()
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .sum::<u64>();
        }
    }
    if run.rps == 0.0 {
        bail!(
            "wrk gave no result:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(run)
}

/// Fixed-rate load with oha (`-q`, latency corrected for coordinated omission), as a [`Run`]:
/// `rps` is the achieved rate, errors count non-200 answers and failed requests.
fn oha(oha: &Path, port: u16, seconds: u64, rate: u64) -> anyhow::Result<Run> {
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(oha)
        .args([
            "-z",
            &format!("{seconds}s"),
            "-c",
            &CONNECTIONS.to_string(),
            "-q",
            &rate.to_string(),
            "--latency-correction",
            // Requests in flight at the deadline finish instead of counting as errors.
            "-w",
            "--no-tui",
            "--output-format",
            "json",
        ])
        .arg(format!("http://127.0.0.1:{port}/bench"))
        .output()
        .context("running oha")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha gave no JSON:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let pct = |k: &str| json["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1e6;
    let codes = json["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok = codes.get("200").and_then(|v| v.as_u64()).unwrap_or(0);
    let all: u64 = codes.values().filter_map(|v| v.as_u64()).sum();
    let failed: u64 = json["errorDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    Ok(Run {
        rps: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_us: pct("p50"),
        p99_us: pct("p99"),
        requests: all as f64,
        errors: all - ok + failed,
        cpu_us_per_request: None,
        rss_mib: None,
    })
}

/// The load of one measurement: saturation with wrk (optionally a Lua script), or a fixed rate
/// with oha.
#[derive(Clone, Copy)]
enum Load<'a> {
    Wrk(Option<&'a Path>),
    Oha(&'a Path, u64),
}

impl Load<'_> {
    fn run(&self, port: u16, seconds: u64) -> anyhow::Result<Run> {
        match *self {
            Load::Wrk(script) => wrk(port, seconds, script),
            Load::Oha(bin, rate) => oha(bin, port, seconds, rate),
        }
    }
}

/// Starts the peer, warms it up, runs the load, and reads the proxy's CPU time and RSS.
fn measure(
    peer: &Peer,
    dir: &Path,
    dataplane: &Path,
    s: &Settings,
    load: Load<'_>,
) -> anyhow::Result<Run> {
    let proc = peer.start(dir, dataplane)?;
    load.run(peer.port(), s.warmup.as_secs().max(1))?;
    let pid = proc.as_ref().map(Proc::pid);
    let cpu_before = pid.and_then(cpu_seconds);
    let mut run = load.run(peer.port(), s.measure.as_secs().max(1))?;
    if let (Some(pid), Some(before)) = (pid, cpu_before)
        && let Some(after) = cpu_seconds(pid)
    {
        run.cpu_us_per_request = Some((after - before) * 1e6 / run.requests.max(1.0));
        run.rss_mib = rss_mib(pid);
    }
    drop(proc);
    Ok(run)
}

/// Median of each figure over the rounds (by throughput); errors are summed.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mut m = runs[runs.len() / 2].clone();
    m.errors = runs.iter().map(|r| r.errors).sum();
    m
}

/// Median by p99 (fixed-rate runs: the rate is the same, the tail is what differs).
fn median_p99(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.p99_us.total_cmp(&b.p99_us));
    let mut m = runs[runs.len() / 2].clone();
    m.errors = runs.iter().map(|r| r.errors).sum();
    m
}

/// Runs every peer `rounds` times in alternating order (ABAB), returning each peer's runs.
fn rounds(
    peers: &[Peer],
    dir: &Path,
    dataplane: &Path,
    s: &Settings,
    what: &str,
    load: Load<'_>,
) -> anyhow::Result<Vec<Vec<Run>>> {
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); peers.len()];
    for round in 0..s.rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..peers.len()).collect()
        } else {
            (0..peers.len()).rev().collect()
        };
        for i in order {
            eprintln!("{what} round {}: {}", round + 1, peers[i].label());
            results[i].push(measure(&peers[i], dir, dataplane, s, load)?);
        }
    }
    Ok(results)
}

fn version(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output();
    match out {
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

fn body_script(dir: &Path, bytes: usize) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("post-{bytes}.lua"));
    std::fs::write(
        &path,
        format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"hello world \", {})\nwrk.headers[\"Content-Type\"] = \"text/plain\"\n",
            bytes / 12
        ),
    )?;
    Ok(path)
}

/// S7: the cold paths of one module, measured in this process (no load running).
struct ColdPaths {
    module_kib: usize,
    compile_ms: f64,
    cached_load_ms: f64,
    instantiate_p50_us: f64,
    instantiate_p99_us: f64,
    start_p50_us: f64,
    start_p99_us: f64,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn cold_paths(bytes: &[u8], dir: &Path, quick: bool) -> anyhow::Result<ColdPaths> {
    let compiles = if quick { 1 } else { 3 };
    let host = Host::new(HostConfig::default())?;
    let mut compile = Vec::new();
    for _ in 0..compiles {
        let t = Instant::now();
        host.load(bytes)?;
        compile.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cache = dir.join("s7-module-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let cached = Host::new(HostConfig {
        module_cache_dir: Some(cache),
        ..Default::default()
    })?;
    cached.load(bytes)?;
    let mut loads = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        cached.load(bytes)?;
        loads.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let module = host.load(bytes)?;
    let options = || VmOptions {
        label: "s7".into(),
        log: Arc::new(|_| {}),
        ..Default::default()
    };
    let spec = PluginSpec {
        name: "s7".into(),
        configuration: TRIVIAL_CONFIG.as_bytes().into(),
        ..Default::default()
    };
    let (mut inst, mut start) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = Instant::now();
        let mut vm = host.new_vm(&module, options())?;
        inst.push(t.elapsed().as_secs_f64() * 1e6);
        vm.start_plugin(spec.clone())?;
        start.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(ColdPaths {
        module_kib: bytes.len() / 1024,
        compile_ms: percentile(compile, 0.5),
        cached_load_ms: percentile(loads, 0.5),
        instantiate_p50_us: percentile(inst.clone(), 0.5),
        instantiate_p99_us: percentile(inst, 0.99),
        start_p50_us: percentile(start.clone(), 0.5),
        start_p99_us: percentile(start, 0.99),
    })
}

/// One row of docs/benchmarks-fanout.md's table (S8).
struct FanoutRow {
    n: usize,
    p99_ms: f64,
    max_ms: f64,
    rss_kib: f64,
}

fn fanout_rows(md: &str) -> Vec<FanoutRow> {
    let num = |cell: &str| -> f64 {
        cell.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    md.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let n: usize = cells.first()?.parse().ok()?;
            (cells.len() >= 7).then(|| FanoutRow {
                n,
                p99_ms: num(cells[3]),
                max_ms: num(cells[4]),
                rss_kib: num(cells[6]),
            })
        })
        .collect()
}

/// Runs target/release/fanout (S8), which writes docs/benchmarks-fanout.md; returns that file.
fn fanout(quick: bool) -> anyhow::Result<String> {
    let bin = std::env::var("WASMFILTER_FANOUT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| wasmfilter_testkit::repo_root().join("target/release/fanout"));
    let mut cmd = Command::new(&bin);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("{} failed with {status}", bin.display());
    }
    Ok(std::fs::read_to_string(
        wasmfilter_testkit::repo_root().join("docs/benchmarks-fanout.md"),
    )?)
}

const TRIVIAL_CONFIG: &str = r#"{"response": {"add": {"x-bench": "1"}}}"#;

fn tool_path(var: &str) -> Option<PathBuf> {
    std::env::var(var)
        .ok()
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

/// S2 at one rate: (fraction of nginx's rate, the rate, each peer's label and run).
type RateRows = (f64, u64, Vec<(String, Run)>);

/// Everything the report needs.
struct Results {
    peers: Vec<Peer>,
    get: Vec<Run>,
    /// S2: (fraction of nginx's rate, rate, per peer label and run).
    latency: Vec<RateRows>,
    latency_note: Option<String>,
    body_rows: Vec<(usize, String, Run)>,
    swap_rate: u64,
    steady: Run,
    swapping: Run,
    reloads: usize,
    swap_rss: Option<f64>,
    cold: ColdPaths,
    fanout_md: Result<String, String>,
    pingora_note: Option<String>,
    load_note: String,
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings {
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(2),
            rounds: 1,
        }
    } else {
        Settings {
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(5),
            rounds: 3,
        }
    };
    for tool in ["nginx", "haproxy", "wrk", "taskset"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!(
                "{tool} not found: install it (apt-get install nginx-light haproxy wrk util-linux)"
            );
        }
    }
    let started = Instant::now();
    let load_note = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = work_dir();
    std::fs::create_dir_all(&dir)?;
    let dataplane = std::env::var("WASMFILTER_DATAPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            wasmfilter_testkit::repo_root().join("target/release/wasmfilter-dataplane")
        });
    if !dataplane.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p wasmfilter-dataplane`",
            dataplane.display()
        );
    }
    let pingora = tool_path("WASMFILTER_PINGORA_BIN");
    let pingora_note = pingora.is_none().then(|| {
        "not measured: the Pingora peer was not built (WASMFILTER_PINGORA_BIN; `cargo xtask bench` builds bench/pingora-peer)".to_string()
    });
    let oha_bin = tool_path("WASMFILTER_OHA_BIN");
    let header = wasmfilter_testkit::rust_filter("header_rewrite")?;
    let body = wasmfilter_testkit::rust_filter("body_rewrite")?;
    let trivial = format!("'{TRIVIAL_CONFIG}'");
    let wasm = |i: usize| FilterSpec {
        name: format!("f{i}"),
        source: format!("module: {}", header.display()),
        config: trivial.clone(),
    };
    let chain = |n: usize| Peer::Wasmfilter {
        label: format!(
            "wasmfilter, {n} Wasm filter{}",
            if n == 1 { "" } else { "s" }
        ),
        filters: (0..n).map(wasm).collect(),
    };
    let native = Peer::Wasmfilter {
        label: "wasmfilter, 1 native filter".into(),
        filters: vec![FilterSpec {
            name: "n0".into(),
            source: "native: header_rewrite".into(),
            config: trivial.clone(),
        }],
    };
    let _backend = backend(&dir)?;

    // S1, S3, S4: GET at saturation (wrk).
    let mut peers = vec![Peer::Direct, Peer::Nginx, Peer::Haproxy];
    if let Some(p) = &pingora {
        peers.push(Peer::Pingora(p.clone()));
    }
    peers.extend([chain(0), native.clone(), chain(1), chain(5), chain(10)]);
    let get: Vec<Run> = rounds(&peers, &dir, &dataplane, &s, "S1", Load::Wrk(None))?
        .into_iter()
        .map(median)
        .collect();
    let nginx_rps = get[1].rps;

    // S2: added latency at 25/50/75% of nginx's saturation rate (oha -q, latency corrected).
    let mut latency = Vec::new();
    let latency_note = match &oha_bin {
        None => Some(
            "not measured: oha was not found (WASMFILTER_OHA_BIN; `cargo xtask bench` installs it)"
                .to_string(),
        ),
        Some(oha_bin) => {
            let mut s2_peers = vec![Peer::Direct, Peer::Nginx, Peer::Haproxy];
            if let Some(p) = &pingora {
                s2_peers.push(Peer::Pingora(p.clone()));
            }
            s2_peers.extend([chain(0), native.clone(), chain(1)]);
            for fraction in [0.25, 0.5, 0.75] {
                let rate = (nginx_rps * fraction).round() as u64;
                let runs = rounds(
                    &s2_peers,
                    &dir,
                    &dataplane,
                    &s,
                    &format!("S2 {rate} req/s"),
                    Load::Oha(oha_bin, rate),
                )?;
                latency.push((
                    fraction,
                    rate,
                    s2_peers
                        .iter()
                        .zip(runs)
                        .map(|(p, r)| (p.label(), median_p99(r)))
                        .collect(),
                ));
            }
            None
        }
    };

    // S5: POST bodies through nginx, wasmfilter without filters, and with the body filter.
    let body_filter = Peer::Wasmfilter {
        label: "wasmfilter, body filter".into(),
        filters: vec![FilterSpec {
            name: "body".into(),
            source: format!("module: {}", body.display()),
            config: "'{\"from\": \"zzz\", \"to\": \"ZZZ\"}'".into(),
        }],
    };
    let body_peers = [Peer::Nginx, chain(0), body_filter];
    let mut body_rows = Vec::new();
    for size in [1024usize, 16 * 1024] {
        let script = body_script(&dir, size)?;
        let runs = rounds(
            &body_peers,
            &dir,
            &dataplane,
            &s,
            &format!("S5 {size} B"),
            Load::Wrk(Some(&script)),
        )?;
        for (p, r) in body_peers.iter().zip(runs) {
            body_rows.push((size, p.label(), median(r)));
        }
    }

    // S6: hot swap at 50% load (half of the one-filter peer's own S1 throughput, so the run
    // is not in overload): the filter's configuration changes and SIGHUP reloads it every
    // 300 ms (each reload loads the module and swaps the chain).
    eprintln!("S6 hot swap");
    let one_filter_rps = peers
        .iter()
        .position(|p| p.label() == "wasmfilter, 1 Wasm filter")
        .map(|i| get[i].rps)
        .unwrap_or(nginx_rps);
    let swap_rate = (one_filter_rps * 0.5).round() as u64;
    let swap_load = match &oha_bin {
        Some(b) => Load::Oha(b, swap_rate),
        None => Load::Wrk(None),
    };
    let swap_peer = chain(1);
    let proc = swap_peer.start(&dir, &dataplane)?.expect("a proxy");
    swap_load.run(PROXY_PORT, s.warmup.as_secs().max(1))?;
    let steady = swap_load.run(PROXY_PORT, 4)?;
    let pid = proc.pid();
    let conf = dir.join("wasmfilter.yaml");
    let first = wasm(0);
    let swapper = std::thread::spawn(move || {
        for i in 0..12 {
            std::thread::sleep(Duration::from_millis(300));
            let mut f = first.clone();
            f.config = format!("'{{\"response\": {{\"add\": {{\"x-bench\": \"{i}\"}}}}}}'");
            let _ = std::fs::write(&conf, wasmfilter_yaml(&[f]));
            let _ = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
        }
    });
    let swapping = swap_load.run(PROXY_PORT, 4)?;
    let _ = swapper.join();
    let swap_rss = rss_mib(pid);
    let mut log = String::new();
    let _ = std::fs::File::open(dir.join("wasmfilter.log"))
        .and_then(|mut f| f.read_to_string(&mut log));
    let reloads = log.matches("configuration reloaded").count();
    drop(proc);

    // S7: cold paths, in this process.
    eprintln!("S7 cold paths");
    let cold = cold_paths(&std::fs::read(&header)?, &dir, quick)?;

    // S8: control-plane fan-out (its own binary; writes docs/benchmarks-fanout.md).
    eprintln!("S8 fan-out");
    let fanout_md = fanout(quick).map_err(|e| format!("{e:#}"));

    let results = Results {
        peers,
        get,
        latency,
        latency_note,
        body_rows,
        swap_rate: if oha_bin.is_some() { swap_rate } else { 0 },
        steady,
        swapping,
        reloads,
        swap_rss,
        cold,
        fanout_md,
        pingora_note,
        load_note,
    };
    let md = report(&results, &s, started.elapsed(), oha_bin.as_deref())?;
    let out = wasmfilter_testkit::repo_root()
        .join("docs")
        .join("benchmarks.md");
    std::fs::write(&out, md)?;
    eprintln!("wrote {} in {:.0?}", out.display(), started.elapsed());
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn report(
    r: &Results,
    s: &Settings,
    took: Duration,
    oha_bin: Option<&Path>,
) -> anyhow::Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let find = |label: &str| -> Option<&Run> {
        r.peers
            .iter()
            .position(|p| p.label() == label)
            .map(|i| &r.get[i])
    };
    let nginx = find("nginx 1 worker").expect("nginx ran");
    let none = find("wasmfilter, 0 Wasm filters").expect("no-filter ran");
    let native = find("wasmfilter, 1 native filter").expect("native ran");
    let one = find("wasmfilter, 1 Wasm filter").expect("one filter ran");
    let five = find("wasmfilter, 5 Wasm filters").expect("five ran");
    let ten = find("wasmfilter, 10 Wasm filters").expect("ten ran");
    let pingora = find("Pingora 1 thread");

    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench` (bench/src/bin/proxy_bench.rs); do not edit by hand. Rerun it to refresh (`--quick` for a short run). Scenarios and goals: performance-anchors.md §7 (S1–S8, G1–G12).\n"
    );
    let _ = writeln!(
        md,
        "TCP proxying (T1 bulk throughput, T2 connection rate) beside nginx `stream` and HAProxy `mode tcp`: [benchmarks-tcp.md](benchmarks-tcp.md) (bench/src/bin/tcp_bench.rs, `cargo xtask bench --tcp`).\n"
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "- Machine: {} cores, {cpu}; load average at the start: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        r.load_note
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        md,
        "- Versions: {}; {}; Pingora 0.9.1 (bench/pingora-peer); {}; {}; wasmfilter {} (release)",
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("wrk", &["-v"]),
        oha_bin
            .map(|b| version(b.to_str().unwrap_or("oha"), &["--version"]))
            .unwrap_or_else(|| "oha not found".into()),
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        md,
        "- Layout: each proxy has one worker pinned to CPU 1 (`taskset -c 1`); the load generator and the backend (nginx `return 200 \"hello\"`, keepalive) share CPU 0. Proxies keep upstream keepalive, access logs off."
    );
    let _ = writeln!(
        md,
        "- Saturation (S1, S3–S5): `taskset -c 0 wrk -t1 -c{CONNECTIONS} -d{}s --latency`, after a {} s warm-up; {} round(s) in alternating order, median by throughput. Fixed rate (S2, S6): `taskset -c 0 oha -c {CONNECTIONS} -q RATE --latency-correction`, median by p99. CPU per request from `/proc/<pid>/stat` (10 ms ticks) over the measured run, RSS from `/proc/<pid>/status` after it.",
        s.measure.as_secs(),
        s.warmup.as_secs(),
        s.rounds
    );
    let _ = writeln!(
        md,
        "- The Wasm filter is `filters/rust/header_rewrite` (Rust SDK) adding one response header; the native filter is the dataplane's built-in twin of it (`native: header_rewrite`, dataplane/daemon/src/native.rs) at the same points of the request path; the body filter is `filters/rust/body_rewrite` buffering and rewriting the whole request body."
    );
    let _ = writeln!(
        md,
        "- The machine is shared: other engineers' builds and tests may run during the benchmark, which is why only ratios measured side by side in one run are compared."
    );
    let _ = writeln!(md, "- Run took {:.0} s.\n", took.as_secs_f64());

    let _ = writeln!(md, "## S1, S3, S4: GET at saturation\n");
    let _ = writeln!(
        md,
        "| peer | req/s | ÷ nginx | ÷ wasmfilter no filter | p50 µs | p99 µs | proxy CPU µs/req | proxy RSS MiB | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for (p, run) in r.peers.iter().zip(&r.get) {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            p.label(),
            run.rps,
            ratio(run.rps, nginx.rps),
            ratio(run.rps, none.rps),
            run.p50_us,
            run.p99_us,
            opt(run.cpu_us_per_request, 1),
            opt(run.rss_mib, 1),
            run.errors
        );
    }
    if let Some(note) = &r.pingora_note {
        let _ = writeln!(md, "\nPingora: {note}.");
    }

    let _ = writeln!(md, "\n## S2: added latency at a fixed rate\n");
    let direct_at = |i: usize| -> Option<&Run> {
        r.latency[i]
            .2
            .iter()
            .find(|(l, _)| l == "direct (no proxy)")
            .map(|(_, run)| run)
    };
    match &r.latency_note {
        Some(note) => {
            let _ = writeln!(md, "{note}.");
        }
        None => {
            let _ = writeln!(
                md,
                "Rates are 25/50/75% of nginx's S1 throughput in this run. \"Added\" is over the direct (no proxy) run at the same rate. A peer whose own S1 throughput is below the rate cannot keep up (achieved req/s below the rate): its figures are queueing in overload, not added latency.\n"
            );
            let _ = writeln!(
                md,
                "| rate | peer | achieved req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | proxy CPU µs/req | proxy RSS MiB | errors |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
            for (i, (fraction, rate, rows)) in r.latency.iter().enumerate() {
                let direct = direct_at(i).cloned().unwrap_or_default();
                for (label, run) in rows {
                    let _ = writeln!(
                        md,
                        "| {:.0}% ({rate}/s) | {label} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                        fraction * 100.0,
                        run.rps,
                        run.p50_us,
                        run.p99_us,
                        if label.starts_with("direct") {
                            "–".into()
                        } else {
                            format!("{:.0}", run.p50_us - direct.p50_us)
                        },
                        if label.starts_with("direct") {
                            "–".into()
                        } else {
                            format!("{:.0}", run.p99_us - direct.p99_us)
                        },
                        opt(run.cpu_us_per_request, 1),
                        opt(run.rss_mib, 1),
                        run.errors
                    );
                }
            }
        }
    }

    let _ = writeln!(md, "\n## S5: request bodies\n");
    let _ = writeln!(
        md,
        "| body | peer | req/s | ÷ nginx | ÷ wasmfilter no filter | p99 µs | proxy CPU µs/req | proxy RSS MiB | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for chunk in r.body_rows.chunks(3) {
        let (n_rps, none_rps) = (chunk[0].2.rps, chunk[1].2.rps);
        for (size, label, run) in chunk {
            let _ = writeln!(
                md,
                "| {} KiB | {label} | {:.0} | {} | {} | {:.0} | {} | {} | {} |",
                size / 1024,
                run.rps,
                ratio(run.rps, n_rps),
                ratio(run.rps, none_rps),
                run.p99_us,
                opt(run.cpu_us_per_request, 1),
                opt(run.rss_mib, 1),
                run.errors
            );
        }
    }

    let _ = writeln!(md, "\n## S6: hot swap under load\n");
    let _ = writeln!(
        md,
        "One Wasm filter at {}; every 300 ms its configuration changes in the file and `SIGHUP` reloads it, during a 4 s run ({} reloads logged, each loading the module, starting it and swapping the chain). Proxy RSS after the run: {} MiB.\n",
        if r.swap_rate > 0 {
            format!(
                "a fixed {} req/s (50% of its own S1 throughput, oha)",
                r.swap_rate
            )
        } else {
            "saturation (wrk; oha not found)".into()
        },
        r.reloads,
        opt(r.swap_rss, 1)
    );
    let _ = writeln!(
        md,
        "| phase | req/s | p50 µs | p99 µs | failed requests |\n|---|---|---|---|---|"
    );
    for (phase, run) in [("steady", &r.steady), ("swapping", &r.swapping)] {
        let _ = writeln!(
            md,
            "| {phase} | {:.0} | {:.0} | {:.0} | {} |",
            run.rps, run.p50_us, run.p99_us, run.errors
        );
    }

    let c = &r.cold;
    let _ = writeln!(md, "\n## S7: cold paths\n");
    let _ = writeln!(
        md,
        "`filters/rust/header_rewrite` ({} KiB), measured in the runner process with the dataplane's host (pooling allocator) while no load runs; instantiation over 200 VMs.\n",
        c.module_kib
    );
    let _ = writeln!(md, "| step | figure |\n|---|---|");
    let _ = writeln!(
        md,
        "| compile (Cranelift, no cache), median | {:.1} ms |",
        c.compile_ms
    );
    let _ = writeln!(
        md,
        "| load from the compiled-module cache (sha256 + deserialize + link), median | {:.2} ms |",
        c.cached_load_ms
    );
    let _ = writeln!(
        md,
        "| new instance from `InstancePre` (`Host::new_vm`), p50 / p99 | {:.1} / {:.1} µs |",
        c.instantiate_p50_us, c.instantiate_p99_us
    );
    let _ = writeln!(
        md,
        "| instance + `_initialize`, `proxy_on_vm_start`, `proxy_on_configure`, p50 / p99 | {:.1} / {:.1} µs |",
        c.start_p50_us, c.start_p99_us
    );

    let _ = writeln!(md, "\n## S8: control-plane fan-out\n");
    let fan = match &r.fanout_md {
        Ok(text) => {
            let _ = writeln!(
                md,
                "From `target/release/fanout`, which also writes [benchmarks-fanout.md](benchmarks-fanout.md) (setup and definitions there):\n"
            );
            for l in text.lines().filter(|l| l.starts_with('|')) {
                let _ = writeln!(md, "{l}");
            }
            fanout_rows(text)
        }
        Err(e) => {
            let _ = writeln!(md, "fan-out failed: {e}");
            Vec::new()
        }
    };

    // Goals.
    let cpu_delta = diff(one.cpu_us_per_request, none.cpu_us_per_request);
    let native_delta = diff(native.cpu_us_per_request, none.cpu_us_per_request);
    let body16 = |l: &str| {
        r.body_rows
            .iter()
            .find(|(s, label, _)| *s == 16 * 1024 && label.contains(l))
            .map(|x| x.2.rps)
            .unwrap_or(0.0)
    };
    let (body16, none16) = (body16("body filter"), body16("0 Wasm"));
    let _ = writeln!(md, "\n## Goals (performance-anchors.md §7.3)\n");
    let _ = writeln!(md, "| goal | measured | verdict |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| G1 S1 no filter ≥ 90% of nginx throughput | {} of nginx | {} |",
        ratio(none.rps, nginx.rps),
        met(none.rps >= 0.9 * nginx.rps)
    );
    match pingora {
        Some(p) => {
            let _ = writeln!(
                md,
                "| G1 S1 no filter ≥ 100% of Pingora | {} of Pingora ({:.0} vs {:.0} req/s) | {} |",
                ratio(none.rps, p.rps),
                none.rps,
                p.rps,
                met(none.rps >= p.rps)
            );
        }
        None => {
            let _ = writeln!(
                md,
                "| G1 ≥ 100% of Pingora | {} | – |",
                r.pingora_note.as_deref().unwrap_or("not measured")
            );
        }
    }
    let _ = writeln!(
        md,
        "| G1 ≥ 100% of Go `httputil` | not measured: no Go peer in this runner | – |"
    );
    let _ = writeln!(
        md,
        "| G1 CPU per request ≤ 1.1× nginx | {} µs vs {} µs | {} |",
        opt(none.cpu_us_per_request, 1),
        opt(nginx.cpu_us_per_request, 1),
        met(
            matches!((none.cpu_us_per_request, nginx.cpu_us_per_request), (Some(a), Some(b)) if a <= 1.1 * b)
        )
    );
    // G2 at 50%.
    if let Some(i) = r
        .latency
        .iter()
        .position(|(f, _, _)| (*f - 0.5).abs() < 1e-9)
    {
        let rows = &r.latency[i].2;
        let get = |l: &str| rows.iter().find(|(x, _)| x == l).map(|(_, run)| run);
        if let (Some(d), Some(w), Some(n)) = (
            get("direct (no proxy)"),
            get("wasmfilter, 0 Wasm filters"),
            get("nginx 1 worker"),
        ) {
            let (a50, a99, n99) = (
                w.p50_us - d.p50_us,
                w.p99_us - d.p99_us,
                n.p99_us - d.p99_us,
            );
            let _ = writeln!(
                md,
                "| G2 added latency at 50% of nginx's rate: p50 ≤ 50 µs, p99 ≤ 200 µs | +{a50:.0} µs p50, +{a99:.0} µs p99 | {} |",
                met(a50 <= 50.0 && a99 <= 200.0)
            );
            let _ = writeln!(
                md,
                "| G2 added p99 ≤ 1.2× nginx's added p99 | +{a99:.0} µs vs +{n99:.0} µs | {} |",
                met(a99 <= 1.2 * n99.max(0.0))
            );
        }
    } else {
        let _ = writeln!(
            md,
            "| G2 added latency (oha -q) | {} | – |",
            r.latency_note.as_deref().unwrap_or("not measured")
        );
    }
    // G3's added p99 at the lowest rate, where every peer keeps up.
    if let Some((_, rate, rows)) = r.latency.first() {
        let get = |l: &str| rows.iter().find(|(x, _)| x == l).map(|(_, run)| run);
        if let (Some(w0), Some(w1)) = (
            get("wasmfilter, 0 Wasm filters"),
            get("wasmfilter, 1 Wasm filter"),
        ) {
            let add = w1.p99_us - w0.p99_us;
            let _ = writeln!(
                md,
                "| G3 one Wasm filter adds ≤ 20 µs p99 (at {rate} req/s, 25% of nginx's rate) | +{add:.0} µs | {} |",
                met(add <= 20.0)
            );
        }
    }
    let _ = writeln!(
        md,
        "| G3 one Wasm filter ≥ 85% of no-filter throughput | {} | {} |",
        ratio(one.rps, none.rps),
        met(one.rps >= 0.85 * none.rps)
    );
    let _ = writeln!(
        md,
        "| G3 one Wasm filter ≥ 75% of nginx plain | {} | {} |",
        ratio(one.rps, nginx.rps),
        met(one.rps >= 0.75 * nginx.rps)
    );
    let _ = writeln!(
        md,
        "| G3 added CPU ≤ 5 µs/request | {} µs | {} |",
        opt(cpu_delta, 1),
        met(cpu_delta.is_some_and(|d| d <= 5.0))
    );
    let _ = writeln!(
        md,
        "| G4 Wasm filter's CPU ≤ max(2× the native filter's, native + 3 µs) | Wasm +{} µs, native +{} µs per request | {} |",
        opt(cpu_delta, 1),
        opt(native_delta, 1),
        met(matches!((cpu_delta, native_delta), (Some(w), Some(n)) if w <= (2.0 * n).max(n + 3.0)))
    );
    let per_filter = |a: &Run, b: &Run, n: f64| (1e6 / b.rps - 1e6 / a.rps) / n;
    let (m15, m510) = (per_filter(one, five, 4.0), per_filter(five, ten, 5.0));
    let _ = writeln!(
        md,
        "| G5 ten filters ≥ 60% of no-filter throughput | {} | {} |",
        ratio(ten.rps, none.rps),
        met(ten.rps >= 0.6 * none.rps)
    );
    let _ = writeln!(
        md,
        "| G5 marginal cost per filter linear (1→5 vs 5→10, ±20%) | {m15:.2} vs {m510:.2} µs/filter (from throughput) | {} |",
        met(m15 > 0.0 && (m510 / m15 - 1.0).abs() <= 0.2)
    );
    let _ = writeln!(
        md,
        "| G6 16 KiB body filter ≥ 50% of no-filter throughput | {} | {} |",
        ratio(body16, none16),
        met(none16 > 0.0 && body16 >= 0.5 * none16)
    );
    let _ = writeln!(
        md,
        "| G6 ≤ 2 copies of the body | not measured (no copy counter) | – |"
    );
    let per_module = diff(ten.rss_mib, none.rss_mib).map(|d| d / 10.0);
    let _ = writeln!(
        md,
        "| G7 per filter module per worker ≤ 10 MB RSS | {} MiB ((10 filters − 0) ÷ 10) | {} |",
        opt(per_module, 2),
        met(per_module.is_some_and(|m| m <= 10.0))
    );
    let _ = writeln!(
        md,
        "| G7 whole proxy with 5 filters ≤ 50 MB RSS | {} MiB | {} |",
        opt(five.rss_mib, 1),
        met(five.rss_mib.is_some_and(|m| m <= 50.0))
    );
    let _ = writeln!(
        md,
        "| G8 `.cwasm` load ≤ 5 ms for a 2 MB module | {:.2} ms for a {} KiB module; a 2 MB module was not measured | {} |",
        c.cached_load_ms,
        c.module_kib,
        if c.cached_load_ms <= 5.0 {
            "**met** for this module"
        } else {
            "**not met**"
        }
    );
    let _ = writeln!(
        md,
        "| G8 fresh instance ≤ 10 µs p99 | {:.1} µs p99 (`new_vm`) | {} |",
        c.instantiate_p99_us,
        met(c.instantiate_p99_us <= 10.0)
    );
    let _ = writeln!(
        md,
        "| G8 epoch interruption ≤ 5% throughput on S3 | not measured: the dataplane has no switch to turn it off | – |"
    );
    let _ = writeln!(
        md,
        "| G9 hot swap: 0 failed requests | {} failed | {} |",
        r.swapping.errors,
        met(r.swapping.errors == 0)
    );
    let kept_up = r.swap_rate == 0 || r.steady.rps >= 0.95 * r.swap_rate as f64;
    let _ = writeln!(
        md,
        "| G9 p99 during swap ≤ 2× steady | {:.0} vs {:.0} µs | {} |",
        r.swapping.p99_us,
        r.steady.p99_us,
        if kept_up {
            met(r.swapping.p99_us <= 2.0 * r.steady.p99_us)
        } else {
            "not valid: the steady run did not reach its rate (overload)"
        }
    );
    let row = |n: usize| fan.iter().find(|f| f.n == n);
    match row(1000) {
        Some(f) => {
            let _ = writeln!(
                md,
                "| G10 1,000 dataplanes: p99 ≤ 1 s, max ≤ 2 s | p99 {:.0} ms, max {:.0} ms | {} |",
                f.p99_ms,
                f.max_ms,
                met(f.p99_ms <= 1000.0 && f.max_ms <= 2000.0)
            );
            let _ = writeln!(
                md,
                "| G11 ≤ 64 KiB operator RSS per connected dataplane (1,000) | {:.1} KiB | {} |",
                f.rss_kib,
                met(f.rss_kib <= 64.0)
            );
        }
        None => {
            let _ = writeln!(
                md,
                "| G10/G11 at 1,000 dataplanes | not measured (fan-out did not run) | – |"
            );
        }
    }
    match row(5000) {
        Some(f) => {
            let _ = writeln!(
                md,
                "| G10 5,000 dataplanes: p99 ≤ 3 s | p99 {:.0} ms | {} |",
                f.p99_ms,
                met(f.p99_ms <= 3000.0)
            );
        }
        None => {
            let _ = writeln!(
                md,
                "| G10 5,000 dataplanes | not measured in this run (`--quick` stops at 1,000) | – |"
            );
        }
    }
    let _ = writeln!(
        md,
        "| G11 ≤ 0.5 core during a push storm; bytes per Ack ≤ 2× the change | not measured here (snapshot bytes per change are in the S8 table) | – |"
    );
    let _ = writeln!(
        md,
        "| G12 ≥ 200 CR changes/s to the push queue | not measured: no reconcile-throughput scenario yet | – |"
    );
    Ok(md)
}
