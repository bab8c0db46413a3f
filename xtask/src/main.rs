//! `cargo xtask demo`: builds the example filter from source and runs the dataplane standalone
//! in front of its built-in echo upstream (examples/standalone.yaml).
//! `cargo xtask ci`: every check CI runs (format, lints, all tests).

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
    run(Command::new(&cargo).args(["test", "--workspace"]))?;
    Ok(())
}

/// Builds the release dataplane and the benchmark runner, then runs every scenario.
fn bench(args: Vec<String>) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
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
    ]))?;
    let runner = wasmfilter_testkit::repo_root().join("target/release/proxy_bench");
    run(Command::new(runner).args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
