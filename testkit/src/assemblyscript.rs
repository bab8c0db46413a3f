//! Filters written with the AssemblyScript SDK (npm `@solo-io/proxy-runtime`), compiled with the
//! `assemblyscript` version pinned in `filters/assemblyscript/package-lock.json`.
//!
//! `npm ci` runs outside the repository, in `cache_dir()/npm/<key of package.json and
//! package-lock.json>/`, once per lock file (a marker file records success). `asc` then
//! compiles the sources straight from `filters/assemblyscript` (resolving packages from that
//! cached `node_modules` via `--path`) into
//! `cache_dir()/filters/assemblyscript/<key>/<name>.wasm`, where the key hashes the sources,
//! `asconfig.json` and the lock file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// Every filter in `filters/assemblyscript` (its root id, also the `.wasm` file name).
pub const AS_FILTERS: &[&str] = &["add_header"];

/// The entry file (relative to `filters/assemblyscript`) of each filter in [`AS_FILTERS`].
fn entry(name: &str) -> &'static str {
    match name {
        "add_header" => "assembly/index.ts",
        _ => unreachable!("AS_FILTERS and entry() disagree about {name:?}"),
    }
}

/// Path of the built `.wasm` for the AssemblyScript filter `name`, building all of them on
/// first use.
pub fn assemblyscript_filter(name: &str) -> anyhow::Result<PathBuf> {
    if !AS_FILTERS.contains(&name) {
        bail!("no AssemblyScript test filter named {name:?}; known: {AS_FILTERS:?}");
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_all().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{name}.wasm"));
    if !path.exists() {
        bail!(
            "{} was not produced by the AssemblyScript filter build",
            path.display()
        );
    }
    Ok(path)
}

/// The bytes of the built AssemblyScript filter `name`.
pub fn assemblyscript_filter_bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = assemblyscript_filter(name)?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn build_all() -> anyhow::Result<PathBuf> {
    let src = crate::repo_root().join("filters").join("assemblyscript");
    let manifest = vec![src.join("package.json"), src.join("package-lock.json")];

    let mut files = manifest.clone();
    files.push(src.join("asconfig.json"));
    collect_sources(&src.join("assembly"), &mut files)?;
    files[3..].sort();
    let key = crate::content_key(&files, &[])?;
    let out_dir = crate::cache_dir()
        .join("filters")
        .join("assemblyscript")
        .join(key);
    if AS_FILTERS
        .iter()
        .all(|name| out_dir.join(format!("{name}.wasm")).exists())
    {
        return Ok(out_dir);
    }

    let modules = npm_ci(&manifest)?.join("node_modules");
    let asc = modules.join(".bin").join("asc");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for name in AS_FILTERS {
        let out = out_dir.join(format!("{name}.wasm"));
        if out.exists() {
            continue;
        }
        // asc picks the output format from the extension, so the temporary name ends in .wasm.
        let tmp = out_dir.join(format!(".{name}.{}.tmp.wasm", std::process::id()));
        let mut cmd = Command::new(&asc);
        cmd.current_dir(&src)
            .arg(entry(name))
            .args(["--target", "release", "--use", "abort=abort_proc_exit"])
            .arg("--path")
            .arg(&modules)
            .arg("-o")
            .arg(&tmp);
        let built = crate::run(
            &mut cmd,
            &format!("compiling the AssemblyScript test filter {name:?} (needs node)"),
        );
        if let Err(e) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    }
    Ok(out_dir)
}

/// `npm ci` of `package.json` + `package-lock.json` into `cache_dir()/npm/<key>/`, once.
/// Returns that directory.
fn npm_ci(manifest: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let npm_root = crate::cache_dir().join("npm");
    let dir = npm_root.join(crate::content_key(manifest, &[])?);
    if dir.join(DONE).exists() {
        return Ok(dir);
    }
    check_tool(
        "node",
        "node not found: install Node.js >= 16 with npm >= 7",
    )?;
    check_tool(
        "npm",
        "npm not found: install npm >= 7 (it ships with Node.js)",
    )?;

    // Install into a private directory and rename it into place when complete, so concurrent
    // processes never see (or use) a half-installed node_modules.
    std::fs::create_dir_all(&npm_root)
        .with_context(|| format!("creating {}", npm_root.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let tmp = npm_root.join(format!(".tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| {
        for file in manifest {
            let name = file.file_name().context("manifest file name")?;
            std::fs::copy(file, tmp.join(name))
                .with_context(|| format!("copying {}", file.display()))?;
        }
        let mut cmd = Command::new("npm");
        cmd.current_dir(&tmp)
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .env("npm_config_update_notifier", "false");
        crate::run(
            &mut cmd,
            "installing the AssemblyScript toolchain with `npm ci` (needs the npm registry)",
        )?;
        std::fs::write(tmp.join(DONE), b"")?;
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process finished first (the target exists and is not empty): use theirs.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(DONE).exists() {
            bail!("could not move the npm install into {}", dir.display());
        }
    }
    Ok(dir)
}

/// Marker written into an npm cache directory once `npm ci` succeeded there.
const DONE: &str = ".npm-ci-done";

fn check_tool(tool: &str, missing: &str) -> anyhow::Result<()> {
    match Command::new(tool).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => bail!(
            "`{tool} --version` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{missing}"),
        Err(e) => Err(e).with_context(|| format!("running `{tool} --version`")),
    }
}

/// Every `.ts` file below `dir`.
fn collect_sources(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_sources(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "ts") {
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
    fn builds_assemblyscript_filters() {
        for name in AS_FILTERS {
            let bytes = assemblyscript_filter_bytes(name).unwrap();
            assert!(bytes.starts_with(b"\0asm"), "{name}: not a wasm module");
            let exports = wasm_exports(&bytes);
            // @solo-io/proxy-runtime 0.1.8 (the newest on npm) still exports the 0.2.0 marker;
            // its unreleased main branch exports proxy_abi_version_0_2_1.
            for export in [
                "proxy_abi_version_0_2_0",
                "malloc",
                "proxy_on_configure",
                "proxy_on_context_create",
                "proxy_on_request_headers",
                "proxy_on_response_headers",
                "memory",
            ] {
                assert!(
                    exports.iter().any(|e| e == export),
                    "{name}: missing export {export}; exports: {exports:?}"
                );
            }
            let imports = wasm_imports(&bytes);
            assert!(
                imports
                    .iter()
                    .any(|i| i == "env.proxy_add_header_map_value"),
                "{name}: imports: {imports:?}"
            );
            assert!(
                imports
                    .iter()
                    .all(|i| i.starts_with("env.") || i == "wasi_unstable.proc_exit"),
                "{name}: unexpected import: {imports:?}"
            );
        }
        assert!(assemblyscript_filter("nope").is_err());
    }
}
