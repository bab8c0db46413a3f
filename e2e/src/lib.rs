//! Harness of the end-to-end tests: a real kube-apiserver (with embedded etcd) started from
//! the binary `e2e/cluster/build.sh` caches, and the kubectl and Helm built from pinned Go
//! modules next to it. See e2e/README.md.
//!
//! ```no_run
//! let Some(cluster) = wasmfilter_e2e::Cluster::shared() else { return }; // tools missing, not CI
//! cluster.kubectl(&["get", "namespaces"]).ok();
//! cluster.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n").ok();
//! ```

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod local;
pub mod sampler;

/// Environment variables naming the binaries; `cargo xtask ci` sets them after building.
pub const CLUSTER_ENV: &str = "WASMFILTER_E2E_CLUSTER";
pub const KUBECTL_ENV: &str = "WASMFILTER_E2E_KUBECTL";
pub const HELM_ENV: &str = "WASMFILTER_E2E_HELM";
/// A kubeconfig of an existing cluster (e.g. kind, see e2e/kind) to run the suite against
/// instead of starting an API server; kubectl and Helm then default to the ones on PATH.
pub const KUBECONFIG_ENV: &str = "WASMFILTER_E2E_KUBECONFIG";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// True when running under CI (`CI=true`, as .ci/run is run): missing tools fail the tests
/// there instead of skipping them.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The external binaries the suite runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// e2e/cluster: kube-apiserver with embedded etcd.
    pub cluster: PathBuf,
    /// kubectl of the same Kubernetes version, built with the cluster.
    pub kubectl: PathBuf,
    /// Helm, built from e2e/helm.
    pub helm: PathBuf,
}

impl Tools {
    /// Finds the binaries: the paths in `WASMFILTER_E2E_{CLUSTER,KUBECTL,HELM}`, or else where
    /// the build scripts put them for the versions pinned in e2e/cluster/go.mod and
    /// e2e/helm/go.mod. An error lists what is missing and how to build it.
    pub fn find() -> anyhow::Result<Tools> {
        let cache = match std::env::var_os("WASMFILTER_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/wasmfilter"),
        }
        .join("e2e");
        let root = repo_root();
        let kube = pinned_version(&root.join("e2e/cluster/go.mod"), "k8s.io/kubernetes")?;
        let helm = pinned_version(&root.join("e2e/helm/go.mod"), "helm.sh/helm/v3")?;
        let pick =
            |var: &str, default: PathBuf| std::env::var_os(var).map_or(default, PathBuf::from);
        let existing = std::env::var_os(KUBECONFIG_ENV).is_some();
        let tools = if existing {
            Tools {
                cluster: PathBuf::new(),
                kubectl: pick(KUBECTL_ENV, on_path("kubectl")),
                helm: pick(HELM_ENV, on_path("helm")),
            }
        } else {
            Tools {
                cluster: pick(CLUSTER_ENV, cache.join(format!("cluster-{kube}"))),
                kubectl: pick(KUBECTL_ENV, cache.join(format!("kubectl-{kube}"))),
                helm: pick(HELM_ENV, cache.join(format!("helm-{helm}/helm"))),
            }
        };
        let mut needed = vec![(KUBECTL_ENV, &tools.kubectl), (HELM_ENV, &tools.helm)];
        if !existing {
            needed.insert(0, (CLUSTER_ENV, &tools.cluster));
        }
        let missing: Vec<String> = needed
            .iter()
            .filter(|(_, path)| !path.is_file())
            .map(|(var, path)| format!("  {var}: {} does not exist", path.display()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the e2e binaries are not built:\n{}\nbuild them once (cached under {}; the API server takes ~7 min cold):\n  e2e/cluster/build.sh && e2e/helm/build.sh\nor run everything with `cargo xtask ci`",
                missing.join("\n"),
                cache.display()
            );
        }
        Ok(tools)
    }

    /// [`Tools::find`], or, outside CI, `None` after printing why the test does nothing. In CI
    /// (`CI=true`) a missing binary panics: the suite must not pass without running.
    pub fn or_skip() -> Option<Tools> {
        match Tools::find() {
            Ok(tools) => Some(tools),
            Err(e) if in_ci() => panic!("CI=true and {e:#}"),
            Err(e) => {
                // Straight to the process's stderr: the test harness captures eprintln! of
                // passing tests, and a skip must be seen.
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIPPED (not in CI), these tests check nothing: {e:#}"
                    );
                });
                None
            }
        }
    }

    /// Runs Helm without a cluster (lint, template), with its own config and cache homes.
    pub fn helm(&self, home: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.helm);
        helm_env(&mut cmd, home);
        cmd.args(args);
        Output::run(cmd, None)
    }
}

/// `name` in a directory of PATH, or just `name` (which then does not exist as a file).
fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn helm_env(cmd: &mut Command, home: &Path) {
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
}

/// The version `module` is required at in a go.mod.
fn pinned_version(go_mod: &Path, module: &str) -> anyhow::Result<String> {
    let text =
        fs::read_to_string(go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let (name, version) = if first == "require" {
                (words.next()?, words.next()?)
            } else {
                (first, words.next()?)
            };
            (name == module && version.starts_with('v')).then(|| version.to_string())
        })
        .next()
        .with_context(|| format!("{} does not require {module}", go_mod.display()))
}

/// What a command did: its exit status and output, and how to say which command it was.
#[derive(Debug)]
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
        let command = format!(
            "{} {}",
            Path::new(cmd.get_program())
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            cmd.get_args()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{command}`: {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(input.as_bytes())
                .unwrap_or_else(|e| panic!("writing to `{command}`: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("running `{command}`: {e}"));
        Output {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, showing the command and everything it printed, unless it succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics, showing the command and everything it printed, unless it failed.
    #[track_caller]
    pub fn failed(self) -> Output {
        assert!(!self.success(), "expected a failure:\n{self}");
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n({})\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// A kube-apiserver with embedded etcd on a free loopback port, in a temporary directory
/// (certificates, etcd data, `kubeconfig`, the server's log `cluster.log`).
///
/// The server runs under a small `sh` guard that stops it and removes the directory when the
/// test process goes away, even if this value is never dropped (as in a `static`). Set
/// `WASMFILTER_E2E_KEEP=1` to keep the directory.
pub struct Cluster {
    pub tools: Tools,
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    guard: Mutex<Option<(Child, ChildStdin)>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Stops the server when stdin reaches end of file (the test process exited or dropped the
/// Cluster), or exits when the server does; then removes the state directory.
const GUARD: &str = r#"
bin=$0 dir=$1 keep=$2
exec 3<&0 0</dev/null
"$bin" -dir "$dir" >>"$dir/cluster.log" 2>&1 &
pid=$!
( read -r _ <&3; kill -TERM "$pid" 2>/dev/null ) &
watcher=$!
exec 3<&-
wait "$pid"
status=$?
kill "$watcher" 2>/dev/null
[ "$keep" = 1 ] || rm -rf "$dir"
exit "$status"
"#;

/// How long the API server may take to answer /readyz (it takes ~3-4 s on 2 cores).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

impl Cluster {
    /// Starts an API server and waits until it is ready.
    pub fn start(tools: &Tools) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("wasmfilter-e2e-")
            .tempdir()
            .context("creating the cluster's directory")?
            .keep();
        let keep = if std::env::var("WASMFILTER_E2E_KEEP").is_ok_and(|v| v == "1") {
            "1"
        } else {
            "0"
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg(&tools.cluster)
            .arg(&dir)
            .arg(keep)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", tools.cluster.display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let ready = dir.join("ready");
        let log = dir.join("cluster.log");
        loop {
            if let Ok(server) = fs::read_to_string(&ready) {
                let cluster = Cluster {
                    tools: tools.clone(),
                    kubeconfig: dir.join("kubeconfig"),
                    dir,
                    server: server.trim().to_string(),
                    guard: Mutex::new(Some((child, stdin))),
                };
                eprintln!(
                    "e2e: API server {} ready after {:.1}s (state in {})",
                    cluster.server,
                    started.elapsed().as_secs_f64(),
                    cluster.dir.display()
                );
                return Ok(cluster);
            }
            let exited = child.try_wait()?;
            if exited.is_some() || started.elapsed() > READY_TIMEOUT {
                let output = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = output.lines().rev().take(40).collect();
                drop(stdin);
                let _ = child.wait();
                bail!(
                    "the API server {} ({:?} after {:.0}s); the end of its log:\n{}",
                    if exited.is_some() {
                        "exited"
                    } else {
                        "did not become ready"
                    },
                    exited,
                    started.elapsed().as_secs_f64(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An existing cluster, by its kubeconfig (its current context); nothing is started or
    /// stopped. The tests create namespaces and cluster-scoped objects in it: use a throwaway
    /// cluster (e2e/kind/run.sh makes one).
    pub fn existing(tools: &Tools, kubeconfig: &Path) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("wasmfilter-e2e-")
            .tempdir()?
            .keep();
        // Only a scratch directory to remove when the test process goes away.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"read -r _ || true; rm -rf "$0""#)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sh")?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut cluster = Cluster {
            tools: tools.clone(),
            dir,
            kubeconfig: fs::canonicalize(kubeconfig)
                .with_context(|| format!("{}", kubeconfig.display()))?,
            server: String::new(),
            guard: Mutex::new(Some((child, stdin))),
        };
        let out = cluster.kubectl(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        if !out.success() {
            bail!("reading the server of {}:\n{out}", kubeconfig.display());
        }
        cluster.server = out.stdout.trim().to_string();
        Ok(cluster)
    }

    /// One cluster shared by every test of a test binary: an API server started on first use,
    /// or the cluster `WASMFILTER_E2E_KUBECONFIG` names. `None` when the binaries are missing
    /// outside CI (see [`Tools::or_skip`]); a failure to start panics in every test that asks
    /// for it.
    pub fn shared() -> Option<&'static Cluster> {
        static SHARED: OnceLock<Result<Option<Cluster>, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| match Tools::or_skip() {
            None => Ok(None),
            Some(tools) => match std::env::var_os(KUBECONFIG_ENV) {
                Some(kubeconfig) => Cluster::existing(&tools, Path::new(&kubeconfig)),
                None => Cluster::start(&tools),
            }
            .map(Some)
            .map_err(|e| format!("{e:#}")),
        });
        match shared {
            Ok(cluster) => cluster.as_ref(),
            Err(e) => panic!("starting the e2e API server: {e}"),
        }
    }

    /// The admin kubeconfig (user `e2e-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:PORT` for one the harness started.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster's state directory; tests may keep files of their own there.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A kubectl command with the admin kubeconfig and a discovery cache in the state
    /// directory, to add arguments to.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(&self.tools.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        cmd
    }

    /// Runs kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        Output::run(cmd, None)
    }

    /// Runs kubectl as the admin with `input` on its standard input.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        Output::run(cmd, Some(input))
    }

    /// `kubectl apply --server-side` of YAML or JSON documents (any namespace they name).
    pub fn apply_yaml(&self, yaml: &str) -> Output {
        self.kubectl_with_input(
            &[
                "apply",
                "--server-side",
                "--field-manager=wasmfilter-e2e",
                "-f",
                "-",
            ],
            yaml,
        )
    }

    /// Runs Helm against this cluster, with its own config, cache and data directories.
    pub fn helm(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.tools.helm);
        helm_env(&mut cmd, &self.dir.join("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        Output::run(cmd, None)
    }

    /// Asks the API server's authorizer (`kubectl auth can-i`, a SubjectAccessReview) whether
    /// `user` may do `verb` on `resource` (e.g. `wasmfilters.wasmfilter.dev`,
    /// `leases.coordination.k8s.io/NAME`) in `namespace` (`None`: all namespaces), optionally
    /// on a `subresource`.
    pub fn can_i(
        &self,
        user: &str,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: Option<&str>,
    ) -> bool {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
        if let Some(sub) = subresource {
            args.extend(["--subresource", sub]);
        }
        match namespace {
            Some(ns) => args.extend(["--namespace", ns]),
            None => args.push("--all-namespaces"),
        }
        let out = self.kubectl(&args);
        match out.stdout.trim() {
            "yes" => true,
            "no" => false,
            _ => panic!("unexpected answer from can-i:\n{out}"),
        }
    }

    /// A kubeconfig that authenticates as a ServiceAccount with a token from the TokenRequest
    /// API (`kubectl create token`, valid for an hour), to run a component with exactly the
    /// permissions its pod would have.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let out = self.kubectl(&[
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration=1h",
        ]);
        if !out.success() {
            bail!("requesting a token for {namespace}/{name}:\n{out}");
        }
        let token = out.stdout.trim().to_string();
        // The admin kubeconfig's cluster entry (server and CA), inlined.
        let out = self.kubectl(&[
            "config",
            "view",
            "--minify",
            "--raw",
            "--flatten",
            "-o",
            "json",
        ]);
        if !out.success() {
            bail!("reading the kubeconfig:\n{out}");
        }
        let admin: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let path = self.dir.join(format!("kubeconfig-{namespace}-{name}"));
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": name, "namespace": namespace}}],
            "current-context": "e2e",
        });
        fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(path)
    }

    /// Stops the server (one the harness started) and removes the state directory (also done
    /// when the process exits).
    pub fn stop(&self) {
        let Some((mut child, stdin)) = self.guard.lock().unwrap().take() else {
            return;
        };
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses a stream of YAML documents (as `helm template` prints) into JSON values, skipping
/// empty documents.
pub fn yaml_documents(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(doc).context("parsing a YAML document")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

// ---- the project's own binaries, run as local processes -----------------------------------

/// Environment variables naming prebuilt `wasmfilter-operator` and `wasmfilter-dataplane`
/// binaries; without them, [`workspace_binaries`] builds them with cargo.
pub const OPERATOR_ENV: &str = "WASMFILTER_E2E_OPERATOR";
pub const DATAPLANE_ENV: &str = "WASMFILTER_E2E_DATAPLANE";

/// The operator and dataplane binaries of this workspace.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub operator: PathBuf,
    pub dataplane: PathBuf,
}

/// The workspace's `wasmfilter-operator` and `wasmfilter-dataplane`: the files
/// `WASMFILTER_E2E_OPERATOR` and `WASMFILTER_E2E_DATAPLANE` name (`cargo xtask ci` points them
/// at the ones `cargo test --workspace` built before running any test), or else built for the
/// profile and target directory of the running test binary with `cargo build -p … --bin …`
/// (a no-op when fresh). Once per process.
pub fn workspace_binaries() -> anyhow::Result<Binaries> {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_binaries() -> anyhow::Result<Binaries> {
    if let (Some(operator), Some(dataplane)) = (
        std::env::var_os(OPERATOR_ENV),
        std::env::var_os(DATAPLANE_ENV),
    ) {
        let binaries = Binaries {
            operator: operator.into(),
            dataplane: dataplane.into(),
        };
        for (var, path) in [
            (OPERATOR_ENV, &binaries.operator),
            (DATAPLANE_ENV, &binaries.dataplane),
        ] {
            if !path.is_file() {
                bail!("{var}: {} does not exist", path.display());
            }
        }
        return Ok(binaries);
    }
    // The test binary is TARGET_DIR/PROFILE_DIR/deps/NAME-HASH.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in a cargo target directory", exe.display()))?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => bail!("{} has no profile directory", exe.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--profile", profile, "--target-dir"])
        .arg(target_dir)
        .args([
            "-p",
            "wasmfilter-operator",
            "-p",
            "wasmfilter-dataplane",
            "--bin",
            "wasmfilter-operator",
            "--bin",
            "wasmfilter-dataplane",
        ]);
    let out = Output::run(cmd, None);
    if !out.success() {
        bail!("building the operator and dataplane binaries:\n{out}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "e2e: operator and dataplane binaries ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(Binaries {
        operator: profile_dir.join("wasmfilter-operator"),
        dataplane: profile_dir.join("wasmfilter-dataplane"),
    })
}

/// A loopback port that was free a moment ago (for a process that must keep its port across
/// restarts, such as the operator's gRPC listener the dataplanes dial).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// A child process whose standard output and error go to a log file; killed (SIGKILL) when
/// dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `cmd` with its output appended to `log` (kept across restarts, so the file tells
    /// the whole story).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Process> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut header = file.try_clone()?;
        writeln!(header, "==== {name}: {cmd:?}")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process (and its earlier runs) printed.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log, for panic messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Polls the log until `find` returns something, up to `timeout`; fails early, with the
    /// log, if the process exits.
    pub fn wait_for_log<T>(
        &mut self,
        timeout: Duration,
        mut find: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = find(&self.log()) {
                return Ok(found);
            }
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited ({status}); its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print what was awaited within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP/1.1 response as a client sees it (header names lower-cased).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a new connection to `addr` (`127.0.0.1:PORT`), `connection: close`, with a
/// 10 s timeout. A plain client on purpose: what it reports is what went over the wire.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<HttpResponse> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: flow.test\r\nuser-agent: wasmfilter-e2e\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} answered no complete response head: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr} answered no status line: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Calls `check` every 100 ms until it returns `Ok`, for at most `timeout`; then panics with
/// `what` and the last error. For conditions that become true eventually (a rollout, a status).
#[track_caller]
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {timeout:?} ({attempts} attempts); last:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Calls `check` every 100 ms until it returns `Ok` (with the time it took), for at most
/// `timeout`; then `Err` with `what` and the last error. [`eventually`] without the panic, for
/// tests that report several findings at the end.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<(T, Duration), String> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match check() {
            Ok(value) => return Ok((value, started.elapsed())),
            Err(last) if started.elapsed() > timeout => {
                return Err(format!(
                    "{what}: not within {timeout:?} ({attempts} attempts); last:\n{last}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
