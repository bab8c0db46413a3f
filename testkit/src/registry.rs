//! A real OCI registry for tests: the CNCF distribution registry (`registry serve CONFIG`),
//! built from the Go module pinned in `e2e/registry/go.mod` by `e2e/registry/build.sh`, on a
//! free loopback port with its own storage and optional htpasswd auth, stopped when dropped.
//!
//! The binary is the file `WASMFILTER_REGISTRY_BIN` names (`cargo xtask ci` builds it and sets
//! it), else the build script's cached output,
//! `$WASMFILTER_CACHE/e2e/registry-<version>/registry`. When it is missing the tests fail under
//! CI (`CI=true`), saying how to build it; elsewhere the first test that needs it builds it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The variable naming the registry binary to run.
pub const REGISTRY_BIN_VAR: &str = "WASMFILTER_REGISTRY_BIN";
/// The build script, relative to the repository root.
pub const REGISTRY_BUILD_SCRIPT: &str = "e2e/registry/build.sh";
const REGISTRY_MODULE: &str = "github.com/distribution/distribution/v3";

/// The registry version pinned in `e2e/registry/go.mod`.
pub fn registry_version() -> anyhow::Result<String> {
    let go_mod = crate::repo_root().join("e2e/registry/go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            // `require MODULE VERSION` on one line, or `MODULE VERSION` inside a block.
            let module = if first == "require" {
                words.next()?
            } else {
                first
            };
            (module == REGISTRY_MODULE).then(|| words.next().map(str::to_string))?
        })
        .next()
        .with_context(|| format!("{} requires no {REGISTRY_MODULE}", go_mod.display()))
}

/// Where `e2e/registry/build.sh` puts the binary by default.
pub fn cached_registry_bin() -> anyhow::Result<PathBuf> {
    Ok(crate::cache_dir()
        .join("e2e")
        .join(format!("registry-{}", registry_version()?))
        .join("registry"))
}

/// Runs `e2e/registry/build.sh` (at once when cached; its progress goes to this process's
/// stderr) and returns the path it prints.
pub fn build_registry() -> anyhow::Result<PathBuf> {
    let script = crate::repo_root().join(REGISTRY_BUILD_SCRIPT);
    let out = Command::new("sh")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting sh {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); it needs Go >= 1.24 on PATH and the Go module proxy",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .last()
        .with_context(|| format!("{} printed no path", script.display()))?;
    Ok(PathBuf::from(path))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The registry binary: see the module documentation for where it is looked for.
pub fn registry_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(REGISTRY_BIN_VAR) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{REGISTRY_BIN_VAR}={} does not exist; build it with `sh {REGISTRY_BUILD_SCRIPT}` \
                 (it prints the path), or unset {REGISTRY_BIN_VAR} to use the cached build",
                path.display()
            );
        }
        return Ok(path);
    }
    let cached = cached_registry_bin()?;
    if cached.is_file() {
        return Ok(cached);
    }
    if in_ci() {
        bail!(
            "the OCI registry binary is missing: {REGISTRY_BIN_VAR} is not set and {} does not \
             exist. `cargo xtask ci` builds it before the tests; to build it by hand run \
             `sh {REGISTRY_BUILD_SCRIPT}`, which puts it there",
            cached.display()
        );
    }
    build_registry()
}

/// [`registry_bin`], found (or built) once per process; panics with its error.
fn registry_bin_once() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| registry_bin().unwrap_or_else(|e| panic!("{e:#}")))
}

pub struct TestRegistry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestRegistry {
    /// Starts a registry; with `user`, every request needs that user's basic auth.
    pub fn start(user: Option<(&str, &str)>) -> TestRegistry {
        registry_bin_once();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut auth = String::new();
        if let Some((u, p)) = user {
            let hash = bcrypt::hash(p, 4).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{u}:{hash}\n")).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: \
             127.0.0.1:{port}\n  secret: wasmfilter-test\n{auth}",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut r = TestRegistry {
            child: None,
            dir,
            port,
        };
        r.restart();
        r
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Wait until the port is closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "registry did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (Re)starts the registry on the same port and storage, waiting until it answers /v2/.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
        let bin = registry_bin_once();
        let child = Command::new(bin)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            // v3 exports OpenTelemetry traces to localhost:4318 unless told not to.
            .env("OTEL_TRACES_EXPORTER", "none")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the registry ({}) exited with {status}: {}",
                    bin.display(),
                    std::fs::read_to_string(self.dir.path().join("registry.log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the registry ({}) did not answer on port {} within 20s: {}",
                bin.display(),
                self.port,
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Status code of a bare `METHOD path` request (no auth).
    pub fn status(&self, method: &str, path: &str) -> u16 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.host()
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
