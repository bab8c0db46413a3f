//! What tests/limits.rs and tests/drain.rs share: configurations, raw loopback upstreams, a
//! probe client, and the dataplane binary as a child process (for RSS, descriptors, signals).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-lim-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn rust_filter(name: &str) -> PathBuf {
    wasmfilter_testkit::rust_filter(name).expect("filter builds")
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One worker; `/probe` goes to the built-in echo upstream, everything else to `upstream`
/// (cluster `main`, with `cluster_extra` lines).
pub fn write_config(
    dir: &Path,
    listen: &str,
    admin: &str,
    extra: &str,
    upstream: &str,
    cluster_extra: &str,
) -> PathBuf {
    let config = format!(
        "listen: {listen}\nadmin: {admin}\nworkers: 1\n{extra}routes:\n  - name: probe\n    match: {{pathPrefixes: [/probe]}}\n    cluster: echo\n  - name: all\n    cluster: main\nclusters:\n  - name: echo\n    builtin: echo\n  - name: main\n    endpoints: [\"{upstream}\"]\n{cluster_extra}"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A raw HTTP/1.1 upstream, one thread per connection: reads the request head, then
/// `handler(path, head, stream)` writes whatever it likes (and the connection closes).
pub fn raw_upstream<F>(handler: F) -> SocketAddr
where
    F: Fn(&str, &str, &mut TcpStream) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                handler(&path, &head, &mut s);
            });
        }
    });
    addr
}

/// Writes a whole response and closes.
pub fn answer(s: &mut TcpStream, status: u16, body: &[u8]) {
    let _ = s.write_all(
        format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let _ = s.write_all(body);
}

/// `GET path` on a fresh connection: (status, body); status 0 when it failed.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let run = || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    run().unwrap_or_else(|e| (0, e.to_string()))
}

/// A client asking `path` every 20 ms on a fresh connection, counting answers and failures.
pub struct Probe {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    pub fn start(addr: SocketAddr) -> Probe {
        Probe::start_path(addr, "/probe")
    }

    pub fn start_path(addr: SocketAddr, path: &str) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f, path) = (stop.clone(), ok.clone(), failed.clone(), path.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match get(addr, &path) {
                    (200, _) => o.fetch_add(1, Ordering::SeqCst),
                    (code, why) => {
                        eprintln!("probe {path}: {code} {why}");
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Probe {
            stop,
            ok,
            failed,
            thread,
        }
    }

    /// (answers, failures)
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// The `wasmfilter-dataplane` binary as a child process, killed if the test ends early.
pub struct Child {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Child {
    /// Starts the binary (behind `prefix`, e.g. `prlimit ... --`, which execs it in place)
    /// and waits until its `/live` answers.
    pub fn spawn_with(config: &Path, admin: SocketAddr, prefix: &[&str]) -> Child {
        let bin = env!("CARGO_BIN_EXE_wasmfilter-dataplane");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let log = config.with_extension("log");
        let child = cmd
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the dataplane binary starts");
        let c = Child { child, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        while get(admin, "/live").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the dataplane did not come up: {}",
                std::fs::read_to_string(&c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// User + system CPU time so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        // Fields 14 and 15 of stat (utime, stime); `after` starts at field 3.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Sends SIGTERM and waits (at most 120 s) for the exit: how long it took.
    pub fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        while started.elapsed() < Duration::from_secs(120) {
            if self.child.try_wait().unwrap().is_some() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the dataplane did not exit within 120 s of SIGTERM");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The sum of a metric's samples in a Prometheus text page.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
