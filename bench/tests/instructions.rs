//! Regression gate for the host's header-filter path: instructions per request counted by
//! callgrind (deterministic, unlike time on a shared 2-core machine), compared with the
//! checked-in baseline `bench/instructions-baseline.txt` for this build profile, with +15%
//! tolerance. See bench/README.md ("Regression gate").
//!
//! Needs valgrind on PATH: `cargo xtask ci` installs it when run as root, else stops saying to
//! run `sudo apt-get install -y valgrind`. Without it this test is skipped, except under
//! CI=true, where it fails. After an intended change of cost, refresh the baseline:
//!
//!     WASMFILTER_UPDATE_BASELINE=1 cargo test -p wasmfilter-bench --test instructions

use std::path::{Path, PathBuf};
use std::process::Command;

/// Requests counted; enough for per-request figures stable to well under 1%.
const REQUESTS: u64 = 300;
/// How much more a request may cost than the baseline before the gate fails.
const TOLERANCE: f64 = 1.15;
const KEY: &str = "header_filter_path";

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

fn baseline_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("instructions-baseline.txt")
}

/// `profile key value` lines; `#` starts a comment.
fn read_baseline(text: &str, profile: &str, key: &str) -> Option<u64> {
    text.lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .find(|f| f.len() == 3 && f[0] == profile && f[1] == key)
        .and_then(|f| f[2].parse().ok())
}

fn write_baseline(text: &str, profile: &str, key: &str, value: u64) -> String {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            !(f.len() == 3 && f[0] == profile && f[1] == key)
        })
        .map(str::to_string)
        .collect();
    out.push(format!("{profile} {key} {value}"));
    out.join("\n") + "\n"
}

fn has_valgrind() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Instructions per request of `filter_path`, counted by callgrind over `REQUESTS` requests.
fn instructions_per_request() -> u64 {
    let module = wasmfilter_testkit::rust_filter("header_rewrite").expect("the filter builds");
    let work = wasmfilter_testkit::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join(format!("callgrind.{}.out", std::process::id()));
    // A persistent module cache: only the first run pays for compiling under valgrind.
    let cache = work.join(format!("callgrind-module-cache-{}", profile()));
    let run = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=*filter_path::measured*",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(env!("CARGO_BIN_EXE_filter_path"))
        .arg(&module)
        .arg(REQUESTS.to_string())
        .arg(&cache)
        .output()
        .expect("valgrind runs");
    assert!(
        run.status.success(),
        "filter_path under callgrind failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("callgrind wrote its output");
    let _ = std::fs::remove_file(&out);
    let total: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a summary line in the callgrind output");
    assert!(
        total > 0,
        "callgrind counted nothing: did --toggle-collect match?"
    );
    total / REQUESTS
}

#[test]
fn baseline_file_round_trips() {
    let text = "# comment\ndev header_filter_path 100\nrelease header_filter_path 50 # note\n";
    assert_eq!(read_baseline(text, "dev", KEY), Some(100));
    assert_eq!(read_baseline(text, "release", KEY), Some(50));
    assert_eq!(read_baseline(text, "other", KEY), None);
    let updated = write_baseline(text, "dev", KEY, 120);
    assert_eq!(read_baseline(&updated, "dev", KEY), Some(120));
    assert_eq!(read_baseline(&updated, "release", KEY), Some(50));
}

#[test]
fn header_filter_path_instructions_stay_within_the_baseline() {
    if !has_valgrind() {
        assert!(
            std::env::var("CI").is_err(),
            "valgrind is not on PATH: install it with `sudo apt-get install -y valgrind` \
             (`cargo xtask ci` does, when run as root)"
        );
        eprintln!("skipped: valgrind is not on PATH (sudo apt-get install -y valgrind)");
        return;
    }
    let measured = instructions_per_request();
    let file = baseline_file();
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    if std::env::var("WASMFILTER_UPDATE_BASELINE").is_ok() {
        std::fs::write(&file, write_baseline(&text, profile(), KEY, measured)).unwrap();
        eprintln!("{}: {} {KEY} = {measured}", file.display(), profile());
        return;
    }
    let baseline = read_baseline(&text, profile(), KEY).unwrap_or_else(|| {
        panic!(
            "no `{} {KEY}` line in {}: measured {measured} instructions per request; record it with WASMFILTER_UPDATE_BASELINE=1",
            profile(),
            file.display()
        )
    });
    let ratio = measured as f64 / baseline as f64;
    eprintln!(
        "{KEY} ({}): {measured} instructions per request, baseline {baseline} ({ratio:.3}x)",
        profile()
    );
    assert!(
        ratio <= TOLERANCE,
        "the header-filter path costs {measured} instructions per request, {ratio:.2}x the baseline {baseline} (limit {TOLERANCE}x). If the cost is intended, refresh the baseline with WASMFILTER_UPDATE_BASELINE=1 and say why in the commit."
    );
    if ratio < 1.0 / TOLERANCE {
        eprintln!(
            "note: {ratio:.2}x the baseline: the path got cheaper; refresh the baseline (WASMFILTER_UPDATE_BASELINE=1) so the gate keeps the gain"
        );
    }
}
