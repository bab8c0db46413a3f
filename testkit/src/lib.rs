//! Builds the filters under `filters/` from source with the official proxy-wasm SDKs.
//!
//! This is the one way filters get built: tests, benchmarks, examples and `cargo xtask` all
//! call these functions, and nothing depends on a prebuilt `.wasm` checked into the repository.
//! Each builder runs at most once per process; the underlying tools (cargo, go, npm) cache
//! their own work, and the Go and AssemblyScript outputs are cached under
//! `$HOME/.cache/wasmfilter` keyed by a hash of their sources and pinned versions.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod assemblyscript;
mod go;
pub mod registry;
mod rust;
mod wasm_exports;
pub use assemblyscript::{AS_FILTERS, assemblyscript_filter, assemblyscript_filter_bytes};
pub use go::{GO_FILTERS, go_filter, go_filter_bytes};
pub use rust::{RUST_FILTERS, rust_filter, rust_filter_bytes};
pub use wasm_exports::{wasm_exports, wasm_imports};

/// The repository root (the directory holding the workspace `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the repository root")
        .to_path_buf()
}

/// Where heavy, version-keyed build outputs live outside the clone:
/// `$WASMFILTER_CACHE`, else `$HOME/.cache/wasmfilter`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WASMFILTER_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("wasmfilter")
}

/// Runs `cmd`, failing with its full output when it does not exit successfully.
pub(crate) fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = cmd
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Hex sha256 over the contents of `files` (in order) and any extra key material.
pub(crate) fn content_key(files: &[PathBuf], extra: &[&str]) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        // Relative paths, so every clone of the same sources shares the cache entry.
        let name = file.strip_prefix(repo_root()).unwrap_or(file);
        hasher.update(name.to_string_lossy().as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    for e in extra {
        hasher.update(e.as_bytes());
    }
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}
