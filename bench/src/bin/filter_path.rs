//! The host's header-filter path, N times, for instruction counting under callgrind
//! (tests/instructions.rs, the CI regression gate, and the S3 profile in bench/README.md).
//!
//! One request here is what the dataplane asks of the host for a GET through one header filter:
//! a fresh exchange with 8 request and 4 response headers, `create_stream`,
//! `on_request_headers`, `on_response_headers`, `finish_stream` (done, log, delete), with
//! `filters/rust/header_rewrite` configured as in the S3 benchmark plus one request rule.
//! Only [`measured`] is meant to be counted (`--toggle-collect=*filter_path::measured*`), so
//! compiling and starting the filter are left out.
//!
//!     filter_path MODULE.wasm N [CACHE_DIR]

use std::hint::black_box;
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use wasmfilter_host::{Fields, Host, HostConfig, HttpExchange, PluginSpec, Vm, VmOptions};

const CONFIG: &str = r#"{"request": {"add": {"x-a": "1"}, "set": {"x-b": "2"}}, "response": {"add": {"x-bench": "1"}}}"#;

/// Requests run before the counted ones (first-touch page faults, lazy initialisation).
const WARMUP: usize = 20;

fn exchange() -> Arc<Mutex<HttpExchange>> {
    Arc::new(Mutex::new(HttpExchange {
        request_headers: Fields::from_pairs([
            (":method", "GET"),
            (":path", "/api/v1/items?page=2&limit=50"),
            (":authority", "shop.example.test"),
            (":scheme", "http"),
            ("user-agent", "wrk"),
            ("accept", "*/*"),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
        ]),
        response_headers: Fields::from_pairs([
            (":status", "200"),
            ("content-type", "text/plain"),
            ("content-length", "5"),
            ("date", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]),
        ..Default::default()
    }))
}

fn one_request(vm: &mut Vm, root: u32) -> anyhow::Result<()> {
    let ex = exchange();
    let ctx = vm.create_stream(root, ex.clone())?;
    vm.on_request_headers(ctx, true)?;
    vm.on_response_headers(ctx, true)?;
    vm.finish_stream(ctx)?;
    let _ = vm.take_effects();
    black_box(ex);
    Ok(())
}

/// The counted section: `n` requests.
#[inline(never)]
fn measured(vm: &mut Vm, root: u32, n: usize) -> anyhow::Result<()> {
    for _ in 0..n {
        one_request(vm, root)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (module, n) = match args.as_slice() {
        [m, n, ..] => (m, n.parse::<usize>().context("N")?),
        _ => bail!("usage: filter_path MODULE.wasm N [CACHE_DIR]"),
    };
    // On-demand instances: the pooling allocator's large address-space reservation is a poor
    // fit for valgrind, and instantiation is not on this path anyway.
    let host = Host::new(HostConfig {
        pooling: false,
        module_cache_dir: args.get(2).map(Into::into),
        ..Default::default()
    })?;
    let bytes = std::fs::read(module).with_context(|| format!("reading {module}"))?;
    let module = host.load(&bytes)?;
    let mut vm = host.new_vm(
        &module,
        VmOptions {
            label: "filter_path".into(),
            log: Arc::new(|_| {}),
            ..Default::default()
        },
    )?;
    let root = vm.start_plugin(PluginSpec {
        name: "filter_path".into(),
        configuration: CONFIG.as_bytes().into(),
        ..Default::default()
    })?;
    // Check once that the filter did its work, so the count is of a working path.
    let ex = exchange();
    let ctx = vm.create_stream(root, ex.clone())?;
    vm.on_request_headers(ctx, true)?;
    vm.on_response_headers(ctx, true)?;
    vm.finish_stream(ctx)?;
    {
        let e = ex.lock();
        if e.request_headers.get_str("x-a").as_deref() != Some("1")
            || e.response_headers.get_str("x-bench").as_deref() != Some("1")
        {
            bail!("the filter did not rewrite the headers");
        }
    }
    for _ in 0..WARMUP {
        one_request(&mut vm, root)?;
    }
    measured(&mut vm, root, n)?;
    if let Some(f) = vm.failure() {
        bail!("the VM failed: {f:?}");
    }
    println!("ok {n}");
    Ok(())
}
