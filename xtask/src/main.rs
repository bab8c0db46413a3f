//! `cargo xtask demo`: builds the example filter from source and runs the dataplane standalone
//! in front of its built-in echo upstream (examples/standalone.yaml).
//! `cargo xtask ci`: every check CI runs (format, lints, all tests), after setting up what they
//! need: rustup components, system packages (installed as root, else named with the command),
//! and the e2e suite's API server, kubectl, Helm and the tests' OCI registry, built first.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "demo" => demo(),
        "ci" => ci(),
        "bench" => bench(std::env::args().skip(2).collect()),
        "filters" => {
            for name in wasmfilter_testkit::RUST_FILTERS {
                println!("{}", wasmfilter_testkit::rust_filter(name)?.display());
            }
            Ok(())
        }
        _ => bail!(
            "usage: cargo xtask <demo|ci|bench|filters>\n  demo     run the dataplane standalone with an example filter\n  ci       format check, clippy, all tests\n  bench    side-by-side proxy benchmarks, writes docs/benchmarks.md (--quick for a short run; --tcp: only the TCP proxy benchmarks, docs/benchmarks-tcp.md)\n  filters  build the Rust test filters and print their paths"
        ),
    }
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = installed
        && !String::from_utf8_lossy(&out.stdout).contains("wasm32-wasip1")
    {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip1"]))?;
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    ensure_wasm_target()?;
    let module =
        wasmfilter_testkit::rust_filter("header_rewrite").context("building the example filter")?;
    println!("built {}", module.display());
    let config = wasmfilter_testkit::repo_root()
        .join("examples")
        .join("standalone.yaml");
    let dataplane = wasmfilter_dataplane::Dataplane::start(&config)?;
    println!();
    println!(
        "wasmfilter dataplane is running standalone ({}).",
        config.display()
    );
    println!(
        "The filter adds x-hello to the request (the echo upstream shows it) and x-filtered-by to the response:"
    );
    println!();
    println!("    curl -si http://{}/hello", dataplane.proxy_addr);
    println!();
    println!(
        "Admin: http://{0}/metrics  http://{0}/config_dump   (Enter or Ctrl-C to stop)",
        dataplane.admin_addr
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        // Also stop when stdin closes, so a non-interactive run ends cleanly.
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv();
    dataplane.shutdown();
    Ok(())
}

/// Prints `==> NAME (Ns)` for each step, with the seconds since the task started, so a long
/// run says what it is doing and how far along it is.
struct Steps {
    started: Instant,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            started: Instant::now(),
        }
    }

    fn step(&self, name: &str) {
        println!("\n==> {name} ({}s)", self.started.elapsed().as_secs());
    }
}

/// Everything `cargo xtask ci` needs beyond Rust is set up here, so that the README's test
/// command works on a fresh machine: rustup components and target, the system packages that
/// cannot be done without (installed with apt-get when running as root, else named with the
/// command to install them), and the e2e binaries built from pinned Go modules.
fn ci() -> anyhow::Result<()> {
    let steps = Steps::new();
    steps.step("toolchain: rustfmt, clippy, the wasm32-wasip1 target");
    ensure_components()?;
    ensure_wasm_target()?;
    steps.step("system packages: Go, Node.js and npm, valgrind");
    ensure_system_tools(SYSTEM_TOOLS, running_as_root() && on_path("apt-get"))?;
    ensure_go_version()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    steps.step("format check: cargo fmt --all --check");
    run(Command::new(&cargo).args(["fmt", "--all", "--check"]))?;
    steps.step("lints: cargo clippy --workspace --all-targets -- -D warnings");
    run(Command::new(&cargo).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The e2e suite's real API server, kubectl and Helm, and the OCI registry the operator's,
    // the dataplane's and the e2e tests push to, built from pinned Go modules and cached by
    // version (the scripts return at once when cached); the tests fail without them when
    // CI=true.
    let mut env = e2e_tools(&steps)?;
    // `cargo test --workspace` builds every binary (for its package's own tests) before any
    // test runs: e2e/tests/flow.rs runs those rather than `cargo build -p` its own, which
    // resolves features differently and would compile both binaries a second time.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || wasmfilter_testkit::repo_root().join("target"),
        PathBuf::from,
    );
    env.push((
        "WASMFILTER_E2E_OPERATOR",
        target.join("debug/wasmfilter-operator"),
    ));
    env.push((
        "WASMFILTER_E2E_DATAPLANE",
        target.join("debug/wasmfilter-dataplane"),
    ));
    // --no-fail-fast: every failing test binary is reported, not only the first.
    steps.step("tests: cargo test --workspace --no-fail-fast");
    let result = run(Command::new(&cargo)
        .args(["test", "--workspace", "--no-fail-fast"])
        .envs(env.iter().map(|(k, v)| (*k, v))));
    steps.step(if result.is_ok() {
        "done"
    } else {
        "tests failed"
    });
    result
}

fn ensure_components() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup (install Rust with rustup)")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    for component in ["rustfmt", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// A program the checks cannot do without, and the Debian packages that provide it.
struct SystemTool {
    program: &'static str,
    packages: &'static [&'static str],
    needed_for: &'static str,
}

const SYSTEM_TOOLS: &[SystemTool] = &[
    SystemTool {
        program: "go",
        packages: &["golang-go"],
        needed_for: "the Go SDK test filters, and the API server, kubectl, Helm and OCI registry \
                     the tests run, built from pinned Go modules",
    },
    SystemTool {
        program: "npm",
        packages: &["nodejs", "npm"],
        needed_for: "the AssemblyScript test filter",
    },
    SystemTool {
        program: "valgrind",
        packages: &["valgrind"],
        needed_for: "the instruction-count gate (bench/tests/instructions.rs)",
    },
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs the missing ones with apt-get when `can_install` (running as root on a machine that
/// has apt-get); otherwise stops at once, naming each missing program and the command that
/// installs it.
fn ensure_system_tools(tools: &[SystemTool], can_install: bool) -> anyhow::Result<()> {
    let missing: Vec<&SystemTool> = tools.iter().filter(|t| !on_path(t.program)).collect();
    for tool in tools.iter().filter(|t| on_path(t.program)) {
        println!("{}: found", tool.program);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing
        .iter()
        .flat_map(|t| t.packages.iter().copied())
        .collect();
    if can_install {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        let still: Vec<&str> = missing
            .iter()
            .filter(|t| !on_path(t.program))
            .map(|t| t.program)
            .collect();
        if !still.is_empty() {
            bail!(
                "apt-get installed {} but {} is still not on PATH",
                packages.join(" "),
                still.join(", ")
            );
        }
        return Ok(());
    }
    let mut message = String::from("missing programs that `cargo xtask ci` needs:\n");
    for tool in &missing {
        message += &format!("  {}: for {}\n", tool.program, tool.needed_for);
    }
    message += &format!(
        "install them with:\n    sudo apt-get install -y {}\nthen run `cargo xtask ci` again \
         (run as root, it installs them itself)",
        packages.join(" ")
    );
    bail!(message)
}

/// The Go modules under e2e/ say `go 1.26.0`: a Go of 1.24 or newer fetches that toolchain
/// itself (GOTOOLCHAIN=auto); older ones cannot build them.
fn ensure_go_version() -> anyhow::Result<()> {
    let out = Command::new("go")
        .arg("version")
        .output()
        .context("running go version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.trim());
    match go_minor_version(&text) {
        Some(m) if m >= 24 => Ok(()),
        Some(_) => bail!(
            "{} is too old: the tests need Go 1.24 or newer (Debian 13: apt-get install golang-go; or a release of Go from its site)",
            text.trim()
        ),
        None => bail!(
            "could not read Go's version from `go version`: {:?}",
            text.trim()
        ),
    }
}

/// The minor version in `go version`'s output (`go version go1.26.8 linux/amd64` → 26).
fn go_minor_version(text: &str) -> Option<u32> {
    text.split_whitespace()
        .nth(2)?
        .strip_prefix("go1.")?
        .split(['.', 'r', 'b'])
        .next()?
        .parse()
        .ok()
}

/// Runs e2e/cluster/build.sh, e2e/helm/build.sh, e2e/registry/build.sh and
/// e2e/h2spec/build.sh, each its own step; returns the environment that points the tests at
/// what they built.
fn e2e_tools(steps: &Steps) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let root = wasmfilter_testkit::repo_root();
    let build = |what: &str, script: &str| -> anyhow::Result<PathBuf> {
        steps.step(&format!("{what}: {script}"));
        let started = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.arg(root.join(script))
            .stderr(std::process::Stdio::inherit());
        println!("$ {cmd:?}");
        let out = cmd.output().with_context(|| format!("starting {script}"))?;
        if !out.status.success() {
            bail!("{script} failed with {}", out.status);
        }
        let stdout = String::from_utf8(out.stdout)?;
        let path = stdout
            .lines()
            .last()
            .with_context(|| format!("{script} printed no path"))?;
        println!("{path} ({:.1}s)", started.elapsed().as_secs_f64());
        Ok(path.into())
    };
    let cluster = build(
        "kube-apiserver and kubectl for the e2e tests",
        "e2e/cluster/build.sh",
    )?;
    // build.sh puts kubectl-<version> beside cluster-<version>.
    let name = cluster.file_name().unwrap_or_default().to_string_lossy();
    let version = name
        .strip_prefix("cluster-")
        .with_context(|| format!("unexpected cluster binary name {name}"))?;
    let kubectl = cluster.with_file_name(format!("kubectl-{version}"));
    let helm = build("Helm for the e2e tests", "e2e/helm/build.sh")?;
    let registry = build(
        "the OCI registry for the operator's, dataplane's and e2e tests",
        wasmfilter_testkit::registry::REGISTRY_BUILD_SCRIPT,
    )?;
    // The HTTP/2 conformance suite dataplane/daemon/tests/h2spec.rs runs.
    let h2spec = build(
        "h2spec for the dataplane's HTTP/2 conformance test",
        "e2e/h2spec/build.sh",
    )?;
    Ok(vec![
        ("WASMFILTER_H2SPEC_BIN", h2spec),
        ("WASMFILTER_E2E_CLUSTER", cluster),
        ("WASMFILTER_E2E_KUBECTL", kubectl),
        ("WASMFILTER_E2E_HELM", helm),
        (wasmfilter_testkit::registry::REGISTRY_BIN_VAR, registry),
    ])
}

/// The load generator for fixed-rate latency (S2, S6), installed from crates.io once per
/// version under ~/.cache/wasmfilter/tools. Native TLS (the system OpenSSL) rather than the
/// default rustls/aws-lc: the benchmarks only use plain HTTP on loopback.
const OHA_VERSION: &str = "1.16.0";

/// Builds the release dataplane, the benchmark runner, the S8 fan-out binary and the Pingora
/// peer (its own workspace, bench/pingora-peer), installs oha if needed, then runs every
/// scenario. `--quick` gives a short run; `--tcp` runs only the TCP scenarios (tcp_bench).
fn bench(args: Vec<String>) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = wasmfilter_testkit::repo_root();
    if args.iter().any(|a| a == "--tcp") {
        // Only the TCP scenarios (bench/src/bin/tcp_bench.rs, docs/benchmarks-tcp.md).
        run(Command::new(&cargo).args([
            "build",
            "--release",
            "-p",
            "wasmfilter-dataplane",
            "-p",
            "wasmfilter-bench",
            "--bin",
            "wasmfilter-dataplane",
            "--bin",
            "tcp_bench",
        ]))?;
        return run(Command::new(root.join("target/release/tcp_bench"))
            .args(args.iter().filter(|a| *a != "--tcp")));
    }
    run(Command::new(&cargo).args([
        "build",
        "--release",
        "-p",
        "wasmfilter-dataplane",
        "-p",
        "wasmfilter-bench",
        "--bin",
        "wasmfilter-dataplane",
        "--bin",
        "proxy_bench",
        "--bin",
        "fanout",
    ]))?;
    run(Command::new(&cargo)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(root.join("bench/pingora-peer/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/pingora-peer")))?;
    let home = std::env::var("HOME").context("HOME is not set")?;
    let oha_root = std::path::Path::new(&home)
        .join(".cache/wasmfilter/tools")
        .join(format!("oha-{OHA_VERSION}"));
    let oha = oha_root.join("bin/oha");
    if !oha.exists() {
        run(Command::new(&cargo)
            .args([
                "install",
                "oha",
                "--version",
                OHA_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "native-tls",
                "--root",
            ])
            .arg(&oha_root))?;
    }
    let runner = root.join("target/release/proxy_bench");
    run(Command::new(runner)
        .args(args)
        .env(
            "WASMFILTER_PINGORA_BIN",
            root.join("target/pingora-peer/release/pingora-peer"),
        )
        .env("WASMFILTER_OHA_BIN", &oha)
        .env("WASMFILTER_FANOUT_BIN", root.join("target/release/fanout")))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_system_program_stops_with_the_command_that_installs_it() {
        let tools = [
            SystemTool {
                program: "sh",
                packages: &["dash"],
                needed_for: "nothing",
            },
            SystemTool {
                program: "wasmfilter-no-such-program",
                packages: &["pkg-one", "pkg-two"],
                needed_for: "this test",
            },
        ];
        let err = ensure_system_tools(&tools, false).unwrap_err().to_string();
        assert!(
            err.contains("wasmfilter-no-such-program: for this test"),
            "{err}"
        );
        assert!(
            err.contains("sudo apt-get install -y pkg-one pkg-two\n"),
            "{err}"
        );
        assert!(!err.contains("dash"), "a program found is not named: {err}");
        assert!(ensure_system_tools(&tools[..1], false).is_ok());
    }

    #[test]
    fn go_versions_are_read_from_go_version() {
        assert_eq!(
            go_minor_version("go version go1.26.8 linux/amd64"),
            Some(26)
        );
        assert_eq!(
            go_minor_version("go version go1.24rc1 linux/amd64"),
            Some(24)
        );
        assert_eq!(go_minor_version("go version go1.19 linux/amd64"), Some(19));
        assert_eq!(go_minor_version("go version devel +abc linux/amd64"), None);
    }
}
