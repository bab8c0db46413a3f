//! Filters written with the official Go SDK (`github.com/proxy-wasm/proxy-wasm-go-sdk`), built
//! with the upstream Go toolchain as WASI reactors (`GOOS=wasip1 GOARCH=wasm`,
//! `-buildmode=c-shared`).
//!
//! Outputs are cached at `cache_dir()/filters/go/<key>/<name>.wasm`, where the key hashes every
//! `.go` file, `go.mod` and `go.sum` under `filters/go` plus the `go version` string. The Go
//! module and build caches (`GOMODCACHE`, `GOCACHE`) are left at their defaults so they persist.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// Every filter in `filters/go` (a `main` package directory, also the `.wasm` file name).
pub const GO_FILTERS: &[&str] = &["headers", "body", "httpcall", "tcpcount"];

/// The oldest Go that can build these filters (`//go:wasmexport`, wasip1 reactors).
const MIN_GO: (u32, u32) = (1, 24);

/// Path of the built `.wasm` for the Go filter `name`, building all of them on first use.
pub fn go_filter(name: &str) -> anyhow::Result<PathBuf> {
    if !GO_FILTERS.contains(&name) {
        bail!("no Go test filter named {name:?}; known: {GO_FILTERS:?}");
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_all().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{name}.wasm"));
    if !path.exists() {
        bail!("{} was not produced by the Go filter build", path.display());
    }
    Ok(path)
}

/// The bytes of the built Go filter `name`.
pub fn go_filter_bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = go_filter(name)?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn build_all() -> anyhow::Result<PathBuf> {
    let src = crate::repo_root().join("filters").join("go");
    let version = go_version()?;

    let mut files = Vec::new();
    collect_sources(&src, &mut files)?;
    files.sort();
    let key = crate::content_key(&files, &[&version])?;
    let out_dir = crate::cache_dir().join("filters").join("go").join(key);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    for name in GO_FILTERS {
        let out = out_dir.join(format!("{name}.wasm"));
        if out.exists() {
            continue;
        }
        // Concurrent test processes may build the same filter: each writes its own temporary
        // file and renames it into place, which is atomic on one file system.
        let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut cmd = go_command();
        cmd.current_dir(&src)
            .args(["build", "-buildmode=c-shared", "-trimpath", "-o"])
            .arg(&tmp)
            .arg(format!("./{name}"));
        let built = crate::run(&mut cmd, &format!("building the Go test filter {name:?}"));
        if let Err(e) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    }
    Ok(out_dir)
}

/// A `go` command set up for building wasip1 reactors reproducibly from the committed go.sum.
fn go_command() -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOOS", "wasip1")
        .env("GOARCH", "wasm")
        .env("CGO_ENABLED", "0")
        // Never edit go.mod/go.sum, and do not stamp VCS state (it would differ per checkout).
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        // Use the installed toolchain: the version check below gives the clearer error.
        .env("GOTOOLCHAIN", "local")
        .env_remove("GOWASM")
        .env_remove("GOEXPERIMENT");
    cmd
}

/// The output of `go version` (e.g. `go version go1.26.8 linux/amd64`), after checking that it
/// is at least [`MIN_GO`].
fn go_version() -> anyhow::Result<String> {
    let output = match Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "go not found: install Go >= {}.{} to build the Go test filters",
                MIN_GO.0,
                MIN_GO.1
            )
        }
        Err(e) => return Err(e).context("running `go version`"),
    };
    if !output.status.success() {
        bail!(
            "`go version` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if let Some(found) = parse_go_version(&version)
        && found < MIN_GO
    {
        bail!(
            "{version}: Go >= {}.{} is needed to build the Go test filters",
            MIN_GO.0,
            MIN_GO.1
        );
    }
    Ok(version)
}

/// `(major, minor)` from `go version go1.26.8 linux/amd64` (or `go1.25rc1`, `devel go1.27-…`).
fn parse_go_version(version: &str) -> Option<(u32, u32)> {
    let start = version.find("go1.")? + 2;
    let rest = &version[start..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Every `.go` file, `go.mod` and `go.sum` below `dir`.
fn collect_sources(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_sources(&path, files)?;
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".go") || name == "go.mod" || name == "go.sum" {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm_exports::{wasm_exports, wasm_imports};

    #[test]
    fn parses_go_versions() {
        assert_eq!(
            parse_go_version("go version go1.26.8 linux/amd64"),
            Some((1, 26))
        );
        assert_eq!(
            parse_go_version("go version go1.24rc1 linux/amd64"),
            Some((1, 24))
        );
        assert_eq!(
            parse_go_version("go version go1.9 linux/amd64"),
            Some((1, 9))
        );
        assert_eq!(parse_go_version("nonsense"), None);
    }

    #[test]
    fn builds_go_filters() {
        for name in GO_FILTERS {
            let bytes = go_filter_bytes(name).unwrap();
            assert!(bytes.starts_with(b"\0asm"), "{name}: not a wasm module");
            let exports = wasm_exports(&bytes);
            for export in [
                "proxy_abi_version_0_2_0",
                "proxy_on_memory_allocate",
                "_initialize",
                "proxy_on_context_create",
                "proxy_on_request_headers",
                "memory",
            ] {
                assert!(
                    exports.iter().any(|e| e == export),
                    "{name}: missing export {export}; exports: {exports:?}"
                );
            }
            let imports = wasm_imports(&bytes);
            assert!(
                imports.iter().any(|i| i == "env.proxy_log"),
                "{name}: imports: {imports:?}"
            );
            assert!(
                imports
                    .iter()
                    .all(|i| i.starts_with("env.") || i.starts_with("wasi_snapshot_preview1.")),
                "{name}: unexpected import module: {imports:?}"
            );
        }
        // Cached: a second lookup is the same file.
        assert_eq!(go_filter("headers").unwrap(), go_filter("headers").unwrap());
        assert!(go_filter("nope").is_err());
    }
}
