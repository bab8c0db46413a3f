//! `cargo xtask demo`: builds the example filter from source and runs the dataplane standalone
//! in front of its built-in echo upstream (examples/standalone.yaml).
//! `cargo xtask ci`: every check CI runs (format, lints, all tests, with the e2e suite's API
//! server, kubectl and Helm built first).

use std::process::Command;

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
            "usage: cargo xtask <demo|ci|bench|filters>\n  demo     run the dataplane standalone with an example filter\n  ci       format check, clippy, all tests\n  bench    side-by-side proxy benchmarks, writes docs/benchmarks.md (--quick for a short run)\n  filters  build the Rust test filters and print their paths"
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
        "Admin: http://{0}/metrics  http://{0}/config_dump   (Ctrl-C to stop)",
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

fn ci() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).args(["fmt", "--all", "--check"]))?;
    run(Command::new(&cargo).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The e2e suite's real API server, kubectl and Helm, built from pinned Go modules and
    // cached by version (the scripts return at once when cached); the tests fail without them
    // when CI=true.
    let mut e2e = e2e_tools()?;
    // `cargo test --workspace` builds every binary (for its package's own tests) before any
    // test runs: e2e/tests/flow.rs runs those rather than `cargo build -p` its own, which
    // resolves features differently and would compile both binaries a second time.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || wasmfilter_testkit::repo_root().join("target"),
        std::path::PathBuf::from,
    );
    e2e.push((
        "WASMFILTER_E2E_OPERATOR",
        target.join("debug/wasmfilter-operator"),
    ));
    e2e.push((
        "WASMFILTER_E2E_DATAPLANE",
        target.join("debug/wasmfilter-dataplane"),
    ));
    run(Command::new(&cargo)
        .args(["test", "--workspace"])
        .envs(e2e.iter().map(|(k, v)| (*k, v))))?;
    Ok(())
}

/// Runs e2e/cluster/build.sh and e2e/helm/build.sh; returns the environment that points the
/// e2e tests at what they built.
fn e2e_tools() -> anyhow::Result<Vec<(&'static str, std::path::PathBuf)>> {
    let root = wasmfilter_testkit::repo_root();
    let build = |script: &str| -> anyhow::Result<std::path::PathBuf> {
        let started = std::time::Instant::now();
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
    let cluster = build("e2e/cluster/build.sh")?;
    // build.sh puts kubectl-<version> beside cluster-<version>.
    let name = cluster.file_name().unwrap_or_default().to_string_lossy();
    let version = name
        .strip_prefix("cluster-")
        .with_context(|| format!("unexpected cluster binary name {name}"))?;
    let kubectl = cluster.with_file_name(format!("kubectl-{version}"));
    let helm = build("e2e/helm/build.sh")?;
    Ok(vec![
        ("WASMFILTER_E2E_CLUSTER", cluster),
        ("WASMFILTER_E2E_KUBECTL", kubectl),
        ("WASMFILTER_E2E_HELM", helm),
    ])
}

/// The load generator for fixed-rate latency (S2, S6), installed from crates.io once per
/// version under ~/.cache/wasmfilter/tools. Native TLS (the system OpenSSL) rather than the
/// default rustls/aws-lc: the benchmarks only use plain HTTP on loopback.
const OHA_VERSION: &str = "1.16.0";

/// Builds the release dataplane, the benchmark runner, the S8 fan-out binary and the Pingora
/// peer (its own workspace, bench/pingora-peer), installs oha if needed, then runs every
/// scenario. `--quick` gives a short run.
fn bench(args: Vec<String>) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = wasmfilter_testkit::repo_root();
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
