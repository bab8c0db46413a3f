//! Filters written with the official Rust SDK (`proxy-wasm` crate), built for `wasm32-wasip1`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// Every filter in `filters/rust` (its `[lib] name`, which is also the `.wasm` file name).
pub const RUST_FILTERS: &[&str] = &[
    "tcp_guard",
    "token_service",
    "token_header",
    "header_rewrite",
    "local_reply",
    "body_rewrite",
    "callout",
    "observe",
    "pause_until_tick",
    "lifecycle_count",
    "queue_producer",
    "queue_consumer",
    "grpc_deny",
    "tick_trap",
];

/// Path of the built `.wasm` for the Rust filter `name`, building all of them on first use.
pub fn rust_filter(name: &str) -> anyhow::Result<PathBuf> {
    if !RUST_FILTERS.contains(&name) {
        bail!("no Rust test filter named {name:?}; known: {RUST_FILTERS:?}");
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_all().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{name}.wasm"));
    if !path.exists() {
        bail!("{} was not produced by the filter build", path.display());
    }
    Ok(path)
}

/// The bytes of the built Rust filter `name`.
pub fn rust_filter_bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = rust_filter(name)?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn build_all() -> anyhow::Result<PathBuf> {
    let root = crate::repo_root();
    let target_dir = root.join("target").join("filters");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root.join("filters").join("rust"))
        .args(["build", "--release", "--target", "wasm32-wasip1"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Settings meant for the host build must not leak into the guest build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS");
    crate::run(
        &mut cmd,
        "building the Rust test filters (needs `rustup target add wasm32-wasip1`)",
    )?;
    Ok(target_dir.join("wasm32-wasip1").join("release"))
}
