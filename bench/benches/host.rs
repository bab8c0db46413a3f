//! Host micro-benchmarks (criterion): what one proxy-wasm callback, one stream, one VM and one
//! module load cost in `wasmfilter-host`, measured in-process with no HTTP server around it.
//!
//! Run: `cargo bench -p wasmfilter-bench --bench host` (a full run takes well under a minute).
//! Filter one group: `cargo bench -p wasmfilter-bench --bench host -- callback/`.
//!
//! * `callback/empty_request_headers`: `Vm::on_request_headers` on a hand-written WAT module
//!   whose `proxy_on_request_headers` returns Continue straight away, i.e. the host's fixed
//!   cost per callback (context bookkeeping, deadline, wasm entry and exit).
//! * `callback/header_filter_rust_sdk`: the Rust SDK `header_rewrite` filter adding one header
//!   and replacing another (two hostcalls) on a realistic 8-header request.
//! * `stream/full_lifecycle_rust_sdk`: create_stream, request headers, response headers,
//!   finish_stream (done, log, delete) with `header_rewrite`.
//! * `vm/instantiate_pooling`, `vm/instantiate_ondemand`: `Host::new_vm` + `Vm::start_plugin`
//!   + drop, with and without wasmtime's pooling allocator.
//! * `module/compile`, `module/load_cached`: `Host::load` of `header_rewrite` compiling with
//!   Cranelift, and loading the compiled form from a warm on-disk cache.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, criterion_group, criterion_main};
use parking_lot::Mutex;
use wasmfilter_host::{
    Action, Fields, Host, HostConfig, HttpExchange, LogSink, PluginModule, PluginSpec,
    SharedExchange, Vm, VmOptions,
};

/// The smallest module this host accepts: memory, ABI marker, a bump allocator, and callbacks
/// that do nothing (vm_start and configure answer true, request headers answer Continue).
const EMPTY_FILTER_WAT: &str = r#"
(module
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $bump))
    (global.set $bump
      (i32.and (i32.add (i32.add (global.get $bump) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
)
"#;

/// Plugin configuration of `header_rewrite` for the benchmarks: one add, one replace.
const HEADER_REWRITE_CONFIG: &str = r#"{"request": {"add": {"x-a": "1"}, "set": {"x-b": "2"}}}"#;

/// A typical browser-ish GET as it reaches a filter: 8 headers, pseudo-headers first.
fn request_headers() -> Fields {
    Fields::from_pairs([
        (":method", "GET"),
        (":path", "/api/v1/items?page=2&limit=50"),
        (":authority", "shop.example.test"),
        (":scheme", "https"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("x-request-id", "3f2b8c1e-7d4a-4e2f-9b61-0c5d8e7a1f42"),
    ])
}

fn response_headers() -> Fields {
    Fields::from_pairs([
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "1834"),
        ("date", "Tue, 24 Nov 2026 10:00:00 GMT"),
    ])
}

fn new_exchange() -> SharedExchange {
    Arc::new(Mutex::new(HttpExchange {
        request_headers: request_headers(),
        response_headers: response_headers(),
        ..Default::default()
    }))
}

/// Guest logs go nowhere: the benchmarks measure the host, not a log pipeline.
fn quiet_log() -> LogSink {
    Arc::new(|_| {})
}

fn vm_options() -> VmOptions {
    VmOptions {
        label: "bench".into(),
        log: quiet_log(),
        ..Default::default()
    }
}

fn plugin_spec(config: &str) -> PluginSpec {
    PluginSpec {
        name: "bench".into(),
        configuration: config.as_bytes().into(),
        ..Default::default()
    }
}

fn header_rewrite_bytes() -> Vec<u8> {
    wasmfilter_testkit::rust_filter_bytes("header_rewrite")
        .expect("the Rust test filters build (needs `rustup target add wasm32-wasip1`)")
}

/// The process's pooling host (the production setup: one per process), shared by the
/// benchmarks that do not need a different engine configuration.
fn pooling_host() -> Arc<Host> {
    static HOST: OnceLock<Arc<Host>> = OnceLock::new();
    HOST.get_or_init(|| Host::new(HostConfig::default()).expect("host starts"))
        .clone()
}

/// A started plugin on a fresh VM.
fn start(host: &Arc<Host>, module: &Arc<PluginModule>, config: &str) -> (Vm, u32) {
    let mut vm = host.new_vm(module, vm_options()).expect("VM starts");
    let root = vm.start_plugin(plugin_spec(config)).expect("plugin starts");
    (vm, root)
}

fn callbacks(c: &mut Criterion) {
    let host = pooling_host();
    let mut g = c.benchmark_group("callback");

    // 1. Host overhead of one callback into a guest that does nothing.
    {
        let wasm = wat::parse_str(EMPTY_FILTER_WAT).expect("fixture parses");
        let module = host.load(&wasm).expect("fixture loads");
        let (mut vm, root) = start(&host, &module, "");
        let ctx = vm.create_stream(root, new_exchange()).expect("stream");
        assert_eq!(vm.on_request_headers(ctx, true).unwrap(), Action::Continue);
        g.bench_function("empty_request_headers", |b| {
            b.iter(|| vm.on_request_headers(black_box(ctx), true).unwrap())
        });
        assert!(vm.failure().is_none());
    }

    // 2. A real SDK filter: the SDK dispatch plus two header hostcalls per callback.
    {
        let module = host.load(&header_rewrite_bytes()).expect("filter loads");
        let (mut vm, root) = start(&host, &module, HEADER_REWRITE_CONFIG);
        let ex = new_exchange();
        let ctx = vm.create_stream(root, ex.clone()).expect("stream");
        vm.on_request_headers(ctx, true).unwrap();
        {
            let e = ex.lock();
            assert_eq!(e.request_headers.get_str("x-a").as_deref(), Some("1"));
            assert_eq!(e.request_headers.get_str("x-b").as_deref(), Some("2"));
            assert_eq!(e.request_headers.len(), 10);
        }
        let fresh = request_headers();
        // The copy of the 8 headers is made outside the timed section; putting it in place
        // is timed, and the old map is handed back so it is dropped outside it too.
        g.bench_function("header_filter_rust_sdk", |b| {
            b.iter_batched(
                || fresh.clone(),
                |headers| {
                    let old = std::mem::replace(&mut ex.lock().request_headers, headers);
                    let action = vm.on_request_headers(ctx, true).unwrap();
                    (action, old)
                },
                BatchSize::SmallInput,
            )
        });
        assert!(vm.failure().is_none());
        assert!(vm.take_effects().is_empty());
    }
    g.finish();
}

fn streams(c: &mut Criterion) {
    let host = pooling_host();
    let module = host.load(&header_rewrite_bytes()).expect("filter loads");
    let (mut vm, root) = start(&host, &module, HEADER_REWRITE_CONFIG);
    let mut g = c.benchmark_group("stream");
    // 3. One whole stream: 6 guest callbacks (context create, request headers, response
    // headers, then done, log and delete in finish_stream) and 3 header hostcalls. The
    // exchange is built outside the timed section.
    g.bench_function("full_lifecycle_rust_sdk", |b| {
        b.iter_batched(
            new_exchange,
            |ex| {
                let ctx = vm.create_stream(root, ex.clone()).unwrap();
                vm.on_request_headers(ctx, true).unwrap();
                vm.on_response_headers(ctx, true).unwrap();
                vm.finish_stream(ctx).unwrap();
                ex
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    assert!(vm.failure().is_none());
    assert_eq!(vm.stream_count(), 0);
}

fn instantiation(c: &mut Criterion) {
    let bytes = header_rewrite_bytes();
    let mut g = c.benchmark_group("vm");
    // 4. A VM per iteration: instantiate, run start-up code, start the plugin (context create,
    // vm_start, configure with JSON parsing), then drop it (the pool slot is given back).
    for (name, pooling) in [
        ("instantiate_pooling", true),
        ("instantiate_ondemand", false),
    ] {
        let host = if pooling {
            pooling_host()
        } else {
            Host::new(HostConfig {
                pooling: false,
                ..Default::default()
            })
            .expect("host starts")
        };
        let module = host.load(&bytes).expect("filter loads");
        g.bench_function(name, |b| {
            b.iter(|| {
                let (vm, root) = start(&host, &module, HEADER_REWRITE_CONFIG);
                drop(black_box(vm));
                root
            })
        });
    }
    g.finish();
}

/// A cache directory of this run's own, removed afterwards.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn modules(c: &mut Criterion) {
    let bytes = header_rewrite_bytes();
    let mut g = c.benchmark_group("module");
    g.sampling_mode(SamplingMode::Flat);

    // 5a. Cranelift compilation, validation and linking; slow, so few samples.
    {
        let host = pooling_host();
        g.sample_size(10).measurement_time(Duration::from_secs(4));
        g.bench_function("compile", |b| {
            b.iter(|| {
                let m = host.load(black_box(&bytes)).unwrap();
                assert!(!m.from_cache);
                m
            })
        });
    }

    // 5b. The same module from a warm on-disk cache: hash, deserialize, link.
    {
        let dir = TempDir(
            std::env::temp_dir().join(format!("wasmfilter-bench-cache-{}", std::process::id())),
        );
        let host = Host::new(HostConfig {
            module_cache_dir: Some(dir.0.clone()),
            ..Default::default()
        })
        .expect("host starts");
        assert!(!host.load(&bytes).unwrap().from_cache, "cache starts empty");
        assert!(host.load(&bytes).unwrap().from_cache, "cache is warm");
        g.sample_size(20).measurement_time(Duration::from_secs(2));
        g.bench_function("load_cached", |b| {
            b.iter(|| {
                let m = host.load(black_box(&bytes)).unwrap();
                assert!(m.from_cache);
                m
            })
        });
        drop(host);
        drop(dir);
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = callbacks, streams, instantiation, modules
}
criterion_main!(benches);
