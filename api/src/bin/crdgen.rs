//! Prints the WasmFilter CRD as YAML, or with `--write` writes it to `crds/wasmfilter.yaml`
//! (relative to the workspace root), the checked-in copy a test compares against.
//!
//! `cargo run -p wasmfilter-api --bin crdgen -- --write`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = wasmfilter_api::crd::crd_yaml();
    match std::env::args().nth(1).as_deref() {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some("--write") => {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/wasmfilter.yaml");
            match std::fs::write(&path, yaml) {
                Ok(()) => {
                    eprintln!("wrote {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Some(other) => {
            eprintln!("crdgen: unknown argument {other:?}\nusage: crdgen [--write]");
            ExitCode::from(2)
        }
    }
}
