//! Hostile guests: modules written by hand in WAT that break every rule of the ABI they can
//! (wild pointers, lying allocators, endless loops, unbounded memory, traps in every callback,
//! hostcalls from inside the allocator, oversized maps, malformed modules, WASI abuse).
//!
//! Each test asserts what the embedder or the guest observes (the status code the guest got,
//! the `LoadError` / `VmError` / `StartError` / `CallbackError` variant and its message), that
//! the host itself never panics, and that a healthy plugin built with the Rust SDK keeps
//! serving afterwards: both one that was already running next to the hostile VM and a new one.
//!
//! Guests report what they saw through the request headers of the stream they run on:
//! `x-st` holds one byte per status, `b'a' + status`, in call order (see `$rec`/`$report`),
//! and `x-u0`..`x-u9` hold u32 values as 8 hex digits (see `$put_u32`; header values cannot
//! carry raw bytes). Header edits reach
//! the exchange at once, so a report written just before a deliberate trap survives it.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use wasmfilter_host::limits::MAX_PAIRS_BYTES;
use wasmfilter_host::*;

// ---------------------------------------------------------------------------------------
// Fixture building
// ---------------------------------------------------------------------------------------

/// Compiles WAT text and loads it into the shared test host.
fn wat_module(text: &str) -> Arc<PluginModule> {
    wat_load(text).unwrap_or_else(|e| panic!("fixture loads: {e}\n{text}"))
}

fn wat_load(text: &str) -> Result<Arc<PluginModule>, LoadError> {
    let bytes = wat::parse_str(text).unwrap_or_else(|e| panic!("fixture parses: {e}\n{text}"));
    host().load(&bytes)
}

/// A data segment holding `bytes` at `addr`.
fn wat_data(addr: u32, bytes: &[u8]) -> String {
    let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
    format!("(data (i32.const {addr:#x}) \"{escaped}\")")
}

/// The pieces of a minimal proxy-wasm module. Every fixture gets:
/// - imports `$log` (proxy_log) and `$add` (proxy_add_header_map_value), then `imports`;
/// - `$bump`, a bump allocator over `$heap` (starting at 0x10000) that grows memory as needed
///   and returns 0 when it cannot;
/// - `$rec` / `$report` / `$put_u32` (reporting, see the module docs) and `$memend` (bytes of
///   linear memory);
/// - scratch space: 0x400..0x1000 for fixture data, 0x1000..0x2000 for return slots.
///
/// Memory map: 0x100 "x-st", 0x200.. recorded statuses, 0x2f0 "x-uN" key, 0x2f8 its value.
struct Wat {
    marker: &'static str,
    imports: String,
    memory: String,
    allocator: String,
    roots: String,
    body: String,
}

const BUMP_ALLOCATOR: &str = r#"
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $bump (local.get 0)))"#;

const DEFAULT_ROOTS: &str = r#"
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))"#;

impl Default for Wat {
    fn default() -> Self {
        Wat {
            marker: "proxy_abi_version_0_2_1",
            imports: String::new(),
            memory: r#"(memory (export "memory") 2)"#.into(),
            allocator: BUMP_ALLOCATOR.into(),
            roots: DEFAULT_ROOTS.into(),
            body: String::new(),
        }
    }
}

impl Wat {
    fn text(&self) -> String {
        let Wat {
            marker,
            imports,
            memory,
            allocator,
            roots,
            body,
        } = self;
        let marker = if marker.is_empty() {
            String::new()
        } else {
            format!(r#"(func (export "{marker}"))"#)
        };
        format!(
            r#"(module $hostile
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  {imports}
  {memory}
  (global $heap (mut i32) (i32.const 0x10000))
  (global $nst (mut i32) (i32.const 0))
  (data (i32.const 0x100) "x-st")
  (data (i32.const 0x2f0) "x-u")
  (func $memend (result i32) (i32.shl (memory.size) (i32.const 16)))
  (func $bump (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.set $have (call $memend))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow
                (i32.shr_u
                  (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 0xffff))
                  (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
  (func $rec (param $s i32)
    (i32.store8 (i32.add (i32.const 0x200) (global.get $nst))
                (i32.add (local.get $s) (i32.const 97)))
    (global.set $nst (i32.add (global.get $nst) (i32.const 1))))
  (func $report
    (drop (call $add (i32.const 0) (i32.const 0x100) (i32.const 4)
                     (i32.const 0x200) (global.get $nst)))
    (global.set $nst (i32.const 0)))
  (func $put_u32 (param $slot i32) (param $v i32)
    (local $i i32) (local $d i32)
    (i32.store8 (i32.const 0x2f3) (i32.add (i32.const 48) (local.get $slot)))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const 8)))
      (local.set $d
        (i32.and
          (i32.shr_u (local.get $v) (i32.sub (i32.const 28) (i32.shl (local.get $i) (i32.const 2))))
          (i32.const 15)))
      (i32.store8 (i32.add (i32.const 0x2f8) (local.get $i))
        (i32.add (local.get $d)
          (select (i32.const 48) (i32.const 87) (i32.lt_u (local.get $d) (i32.const 10)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (drop (call $add (i32.const 0) (i32.const 0x2f0) (i32.const 4)
                     (i32.const 0x2f8) (i32.const 8))))
  {marker}
  {allocator}
  {roots}
  {body}
)"#
        )
    }

    fn load(&self) -> Arc<PluginModule> {
        wat_module(&self.text())
    }
}

// ---------------------------------------------------------------------------------------
// Running fixtures
// ---------------------------------------------------------------------------------------

fn options(logs: &Logs) -> VmOptions {
    VmOptions {
        label: "hostile".into(),
        log: logs.sink(),
        log_level: LogLevel::Trace,
        embedder: Arc::new(TestEmbedder {
            clusters: vec!["upstream".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn spec() -> PluginSpec {
    PluginSpec {
        name: "hostile".into(),
        configuration: b"hostile-config".to_vec().into(),
        ..Default::default()
    }
}

struct Guest {
    vm: Vm,
    root: u32,
    logs: Logs,
}

/// Starts a VM and one plugin on it, with `tweak` applied to the VM options.
fn start_guest(module: &Arc<PluginModule>, tweak: impl FnOnce(&mut VmOptions)) -> Guest {
    let logs = Logs::default();
    let mut opts = options(&logs);
    tweak(&mut opts);
    let mut vm = host()
        .new_vm(module, opts)
        .unwrap_or_else(|e| panic!("VM starts: {e}; logs: {:?}", logs.messages()));
    let root = vm
        .start_plugin(spec())
        .unwrap_or_else(|e| panic!("plugin starts: {e}; logs: {:?}", logs.messages()));
    Guest { vm, root, logs }
}

impl Guest {
    /// Runs `proxy_on_context_create` + `proxy_on_request_headers` on a new stream.
    fn request(
        &mut self,
        headers: &[(&str, &str)],
    ) -> (SharedExchange, Result<Action, CallbackError>) {
        let ex = exchange(headers);
        self.request_on(ex.clone())
    }

    fn request_on(
        &mut self,
        ex: SharedExchange,
    ) -> (SharedExchange, Result<Action, CallbackError>) {
        let ctx = self
            .vm
            .create_stream(self.root, ex.clone())
            .expect("stream context created");
        let result = self.vm.on_request_headers(ctx, true);
        (ex, result)
    }
}

/// The statuses the guest recorded with `$rec` and published with `$report`.
fn statuses(ex: &SharedExchange) -> Vec<i32> {
    let ex = ex.lock();
    let raw = ex
        .request_headers
        .get("x-st")
        .unwrap_or_else(|| panic!("the guest reported no statuses: {:?}", ex.request_headers));
    raw.iter().map(|b| i32::from(*b) - 97).collect()
}

/// The u32 the guest published with `$put_u32(slot, v)`.
fn reported_u32(ex: &SharedExchange, slot: u32) -> u32 {
    let ex = ex.lock();
    let raw = ex
        .request_headers
        .get(&format!("x-u{slot}"))
        .unwrap_or_else(|| panic!("the guest reported no x-u{slot}"));
    u32::from_str_radix(std::str::from_utf8(raw).expect("hex digits"), 16).expect("8 hex digits")
}

/// The request headers without the guest's report headers.
fn original_headers(ex: &SharedExchange) -> Vec<(String, Vec<u8>)> {
    ex.lock()
        .request_headers
        .0
        .iter()
        .filter(|(k, _)| k != "x-st" && !k.starts_with("x-u"))
        .cloned()
        .collect()
}

fn headers_of(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The healthy neighbour
// ---------------------------------------------------------------------------------------

fn healthy_module() -> Arc<PluginModule> {
    static MODULE: OnceLock<Arc<PluginModule>> = OnceLock::new();
    MODULE.get_or_init(|| rust_module("header_rewrite")).clone()
}

/// A Rust SDK plugin started before the hostile guest runs.
fn healthy_neighbour() -> Plugin {
    let mut p = Setup::new(healthy_module()).start();
    assert_serves(&mut p);
    p
}

fn assert_serves(p: &mut Plugin) {
    let ex = exchange(GET_ROOT);
    let ctx = p.vm.create_stream(p.root, ex.clone()).unwrap();
    assert_eq!(
        p.vm.on_request_headers(ctx, true).unwrap(),
        Action::Continue
    );
    ex.lock().response_headers = Fields::from_pairs([(":status", "200")]);
    assert_eq!(
        p.vm.on_response_headers(ctx, true).unwrap(),
        Action::Continue
    );
    p.vm.finish_stream(ctx).unwrap();
    assert_eq!(
        get_response_header(&ex, "x-wasmfilter").as_deref(),
        Some("header_rewrite")
    );
    assert!(p.vm.failure().is_none());
}

/// The neighbour that ran alongside the hostile guest still serves, and so does a new one.
fn assert_neighbours_unharmed(mut neighbour: Plugin) {
    assert_serves(&mut neighbour);
    assert_serves(&mut Setup::new(healthy_module()).start());
}

fn expect_trap(err: &CallbackError) -> (&'static str, &str, &str) {
    match err {
        CallbackError::Trap {
            callback,
            message,
            backtrace,
        } => (callback, message.as_str(), backtrace.as_str()),
        other => panic!("expected a trap, got {other:?}"),
    }
}

fn assert_vm_failed<T: std::fmt::Debug>(r: Result<T, CallbackError>) {
    assert!(
        matches!(r, Err(CallbackError::VmFailed(_))),
        "a failed VM must refuse further calls, got {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 1. Out-of-bounds pointers and lengths
// ---------------------------------------------------------------------------------------

#[test]
fn out_of_bounds_pointers_and_lengths_get_statuses_not_crashes() {
    let neighbour = healthy_neighbour();

    let truncated = {
        let full = pairs::serialize(&Fields::from_pairs([("abc", "def")]));
        full[..full.len() - 2].to_vec()
    };
    let too_many = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    // One pair whose key length claims 2 GiB.
    let lying: Vec<u8> = [
        &1u32.to_le_bytes()[..],
        &0x7fff_ffffu32.to_le_bytes(),
        &1u32.to_le_bytes(),
        b"a\0b\0",
    ]
    .concat();
    let body = format!(
        r#"
  (data (i32.const 0x400) ":path")
  (data (i32.const 0x410) "hello")
  {trunc}
  {many}
  {lying}
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $heap_before i32)
    ;; proxy_log
    (call $rec (call $log (i32.const 2) (i32.const 0x7fff0000) (i32.const 5)))       ;; ptr beyond memory
    (call $rec (call $log (i32.const 2) (i32.const 0x410) (i32.const -1)))           ;; len 0xFFFFFFFF
    (call $rec (call $log (i32.const 2) (i32.const -16) (i32.const 0x20)))            ;; ptr+len wraps u32
    (call $rec (call $log (i32.const 2) (i32.sub (call $memend) (i32.const 2)) (i32.const 5))) ;; straddles the end
    (call $rec (call $log (i32.const 2) (i32.const 0) (i32.const 0)))                 ;; null, empty: fine
    (call $rec (call $log (i32.const 2) (i32.const 0x7fff0000) (i32.const 0)))        ;; wild ptr, empty: fine
    (call $rec (call $log (i32.const 9) (i32.const 0x410) (i32.const 5)))             ;; no such level
    (call $rec (call $log (i32.const 2) (i32.const 0x410) (i32.const 5)))             ;; "hello"
    ;; proxy_get_header_map_value with bad return slots: refused before allocating
    (local.set $heap_before (global.get $heap))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                (i32.const 0x7ffffff0) (i32.const 0x1004)))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                (i32.const 0x1000) (i32.const -4)))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                (i32.const 0x1000) (i32.sub (call $memend) (i32.const 2))))
    (call $rec (i32.ne (local.get $heap_before) (global.get $heap)))                  ;; 0: nothing allocated
    (call $rec (call $get_value (i32.const 0) (i32.const 0x7fff0000) (i32.const 5)    ;; key out of bounds
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const -1)        ;; key len 4 GiB
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $rec (call $get_value (i32.const 99) (i32.const 0x400) (i32.const 5)        ;; no such map
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $rec (call $get_pairs (i32.const 0) (i32.const 0x7ffffff0) (i32.const 0x1004)))
    ;; proxy_set_header_map_pairs with broken maps: refused, the map is left alone
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x420) (i32.const {trunc_len})))
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x460) (i32.const 8)))
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x480) (i32.const {lying_len})))
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x7fff0000) (i32.const 16)))
    ;; and a well-formed call still works afterwards
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1004)))
    (call $put_u32 (i32.const 1) (i32.load8_u (i32.load (i32.const 0x1000))))
    (call $report)
    (i32.const 0))"#,
        trunc = wat_data(0x420, &truncated),
        trunc_len = truncated.len(),
        many = wat_data(0x460, &too_many),
        lying = wat_data(0x480, &lying),
        lying_len = lying.len(),
    );
    let module = Wat {
        imports: r#"
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))"#
            .into(),
        body,
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(
        result.unwrap(),
        Action::Continue,
        "logs: {:?}",
        g.logs.messages()
    );
    #[rustfmt::skip]
    // A length past the end of memory is INVALID_MEMORY_ACCESS (6) whatever its size, as the
    // ABI says; BAD_ARGUMENT (2) is for arguments inside memory that are wrong.
    let expected = vec![
        6, 6, 6, 6, 0, 0, 2, 0, // proxy_log
        6, 6, 6, 0, 6, 6, 2, 6, // proxy_get_header_map_value / _pairs
        2, 2, 2, 6,             // proxy_set_header_map_pairs
        0,                      // a valid call afterwards
    ];
    assert_eq!(statuses(&ex), expected);
    assert_eq!(reported_u32(&ex, 0), 1, "value length of :path");
    assert_eq!(reported_u32(&ex, 1), u32::from(b'/'), "value of :path");
    assert_eq!(
        original_headers(&ex),
        headers_of(GET_ROOT),
        "refused set_header_map_pairs calls must leave the map alone"
    );
    assert!(g.logs.contains(LogLevel::Info, "hello"));
    assert!(g.vm.failure().is_none());
    // The VM keeps serving.
    let (_, again) = g.request(GET_ROOT);
    assert_eq!(again.unwrap(), Action::Continue);

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 2. Lying allocators
// ---------------------------------------------------------------------------------------

#[test]
fn allocator_returning_null_or_wild_pointers_gets_invalid_memory_access() {
    let neighbour = healthy_neighbour();
    let module = Wat {
        imports: r#"
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))"#
            .into(),
        allocator: r#"
  (global $mode (mut i32) (i32.const 0))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (return (i32.const 0x7fffffff))))
    (if (i32.eq (global.get $mode) (i32.const 3))           ;; a block straddling the end
      (then (return (i32.sub (call $memend) (i32.const 4)))))
    (if (i32.eq (global.get $mode) (i32.const 4)) (then (return (i32.const -8))))
    (call $bump (local.get $n)))"#
            .into(),
        body: r#"
  (func $try (param $mode i32)
    (global.set $mode (local.get $mode))
    (i32.store (i32.const 0x1000) (i32.const 0x5a5a5a5a))
    (i32.store (i32.const 0x1004) (i32.const 0x5a5a5a5a))
    (call $rec (call $get_pairs (i32.const 0) (i32.const 0x1000) (i32.const 0x1004)))
    ;; 1 when both return slots were left untouched
    (call $rec (i32.and (i32.eq (i32.load (i32.const 0x1000)) (i32.const 0x5a5a5a5a))
                        (i32.eq (i32.load (i32.const 0x1004)) (i32.const 0x5a5a5a5a)))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $try (i32.const 1))
    (call $try (i32.const 2))
    (call $try (i32.const 3))
    (call $try (i32.const 4))
    (global.set $mode (i32.const 0))
    (call $rec (call $get_pairs (i32.const 0) (i32.const 0x1000) (i32.const 0x1004)))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1004)))
    (call $put_u32 (i32.const 1) (i32.load (i32.load (i32.const 0x1000))))
    (call $report)
    (i32.const 0))"#
            .into(),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // null, 0x7fffffff, straddling the end, 0xfffffff8: each INVALID_MEMORY_ACCESS with the
    // return slots untouched; then an honest allocator gets the whole map.
    assert_eq!(statuses(&ex), vec![6, 1, 6, 1, 6, 1, 6, 1, 0]);
    let expected = pairs::serialize(&Fields::from_pairs(GET_ROOT.iter().copied()));
    assert_eq!(reported_u32(&ex, 0) as usize, expected.len());
    assert_eq!(reported_u32(&ex, 1), GET_ROOT.len() as u32);
    assert!(g.vm.failure().is_none());

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 3. Endless loops
// ---------------------------------------------------------------------------------------

const SPIN: &str = "(loop $spin (br $spin))";

#[test]
fn endless_loop_in_a_callback_times_out_and_fails_the_vm() {
    let neighbour = healthy_neighbour();
    let module = Wat {
        body: format!(
            r#"
  (func $spin_forever {SPIN})
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $spin_forever)
    (i32.const 0))
  (func (export "proxy_on_tick") (param i32))"#
        ),
        ..Wat::default()
    }
    .load();
    let limit = Duration::from_millis(50);
    let mut g = start_guest(&module, |o| o.callback_timeout = limit);
    let ex = exchange(GET_ROOT);
    let ctx = g.vm.create_stream(g.root, ex.clone()).unwrap();
    let started = Instant::now();
    let err = g.vm.on_request_headers(ctx, true).unwrap_err();
    let took = started.elapsed();
    match &err {
        CallbackError::Timeout { callback, limit: l } => {
            assert_eq!(*callback, "proxy_on_request_headers");
            assert_eq!(*l, limit);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    assert!(took >= Duration::from_millis(40), "stopped early: {took:?}");
    let why = g.vm.failure().expect("the VM is failed").to_string();
    assert!(why.contains("proxy_on_request_headers"), "{why}");
    assert!(why.contains("deadline"), "{why}");
    assert_eq!(g.vm.traps(), 1);
    assert!(g.logs.contains(LogLevel::Critical, "deadline"));
    assert_vm_failed(g.vm.on_request_headers(ctx, true));
    assert_vm_failed(g.vm.create_stream(g.root, exchange(GET_ROOT)));
    assert_vm_failed(g.vm.on_tick(g.root));
    assert!(matches!(
        g.vm.start_plugin(spec()),
        Err(StartError::Callback(CallbackError::VmFailed(_)))
    ));

    assert_neighbours_unharmed(neighbour);
}

#[test]
fn endless_loop_inside_the_allocator_times_out_the_outer_callback() {
    let neighbour = healthy_neighbour();
    let module = Wat {
        imports: r#"
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))"#
            .into(),
        allocator: format!(
            r#"
  (func $spinning_alloc (export "proxy_on_memory_allocate") (param i32) (result i32)
    {SPIN}
    (i32.const 0))"#
        ),
        body: r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $get_pairs (i32.const 0) (i32.const 0x1000) (i32.const 0x1004)))
    (i32.const 0))"#
            .into(),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |o| o.callback_timeout = Duration::from_millis(50));
    let started = Instant::now();
    let (_, result) = g.request(GET_ROOT);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    match result {
        Err(CallbackError::Timeout { callback, .. }) => {
            assert_eq!(callback, "proxy_on_request_headers")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(g.vm.failure().is_some());

    assert_neighbours_unharmed(neighbour);
}

#[test]
fn endless_loop_at_start_up_is_bounded_by_the_start_timeout() {
    let neighbour = healthy_neighbour();
    let short = |o: &mut VmOptions| o.start_timeout = Duration::from_millis(50);

    // In _initialize: the VM is never created.
    let module = Wat {
        body: format!(r#"(func (export "_initialize") {SPIN})"#),
        ..Wat::default()
    }
    .load();
    let logs = Logs::default();
    let mut opts = options(&logs);
    short(&mut opts);
    let started = Instant::now();
    let err = host().new_vm(&module, opts).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    match err {
        VmError::Start(CallbackError::Timeout { callback, limit }) => {
            assert_eq!(callback, "_initialize");
            assert_eq!(limit, Duration::from_millis(50));
        }
        other => panic!("expected a start-up timeout, got {other:?}"),
    }

    // In proxy_on_vm_start: the plugin does not start.
    let module = Wat {
        roots: format!(
            r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) {SPIN} (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))"#
        ),
        ..Wat::default()
    }
    .load();
    let logs = Logs::default();
    let mut opts = options(&logs);
    short(&mut opts);
    let mut vm = host().new_vm(&module, opts).unwrap();
    let started = Instant::now();
    let err = vm.start_plugin(spec()).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err,
            StartError::Callback(CallbackError::Timeout {
                callback: "proxy_on_vm_start",
                ..
            })
        ),
        "{err:?}"
    );
    assert!(vm.failure().is_some());

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 4. Unbounded memory growth
// ---------------------------------------------------------------------------------------

#[test]
fn memory_growth_stops_at_the_vm_memory_limit() {
    let neighbour = healthy_neighbour();
    const LIMIT: usize = 2 << 20;
    let msg = "memory.grow returned -1";
    let module = Wat {
        body: format!(
            r#"
  (data (i32.const 0x400) "{msg}")
  (func $grow_until_refused (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; one 4 GiB request: refused
    (call $rec (i32.eq (memory.grow (i32.const 0x10000)) (i32.const -1)))
    ;; then a page at a time until refused
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    (call $put_u32 (i32.const 0) (memory.size))
    (call $report)
    (drop (call $log (i32.const 2) (i32.const 0x400) (i32.const {len})))
    unreachable)"#,
            len = msg.len()
        ),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |o| o.memory_limit_bytes = LIMIT);
    let (ex, result) = g.request(GET_ROOT);
    let err = result.unwrap_err();
    let (callback, message, backtrace) = expect_trap(&err);
    assert_eq!(callback, "proxy_on_request_headers");
    assert!(message.contains("unreachable"), "{message}");
    assert!(backtrace.contains("grow_until_refused"), "{backtrace}");
    assert_eq!(statuses(&ex), vec![1], "the 4 GiB grow is refused");
    assert_eq!(reported_u32(&ex, 0) as usize, LIMIT >> 16, "pages");
    assert!(g.logs.contains(LogLevel::Info, msg));
    assert!(g.vm.memory_bytes() <= LIMIT);
    assert_eq!(g.vm.memory_bytes(), LIMIT);
    assert!(g.vm.failure().is_some());

    // A module whose initial memory is already over the limit is refused at instantiation.
    let big = Wat {
        memory: r#"(memory (export "memory") 64)"#.into(),
        ..Wat::default()
    }
    .load();
    let logs = Logs::default();
    let err = host()
        .new_vm(
            &big,
            VmOptions {
                memory_limit_bytes: LIMIT,
                ..options(&logs)
            },
        )
        .unwrap_err();
    assert!(matches!(err, VmError::Instantiate(_)), "{err:?}");

    // A limit above the host's maximum is refused before anything runs.
    let err = host()
        .new_vm(
            &big,
            VmOptions {
                memory_limit_bytes: 2 << 30,
                ..options(&logs)
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, VmError::MemoryLimit(requested, _) if requested == 2 << 30),
        "{err:?}"
    );

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 5. A trap in every callback
// ---------------------------------------------------------------------------------------

const TRAP_TARGETS: &[&str] = &[
    "_initialize",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "proxy_on_response_headers",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_tick",
    "proxy_on_http_call_response",
];

/// A module whose `target` callback calls `$explode` (an `unreachable`); every other callback
/// behaves. `proxy_on_request_headers` dispatches an HTTP callout so that
/// `proxy_on_http_call_response` can be reached.
fn trap_fixture(target: &str) -> Arc<PluginModule> {
    let t = |name: &str| {
        if name == target {
            "(call $explode)"
        } else {
            ""
        }
    };
    let call_headers = pairs::serialize(&Fields::from_pairs([
        (":method", "GET"),
        (":path", "/"),
        (":authority", "upstream"),
    ]));
    Wat {
        imports: r#"
  (import "env" "proxy_http_call" (func $http_call
    (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))"#
            .into(),
        roots: format!(
            r#"
  (func $explode unreachable)
  (func (export "_initialize") {init})
  (func (export "proxy_on_context_create") (param i32 i32)
    (if (local.get 1) (then {create})))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) {vm_start} (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) {configure} (i32.const 1))"#,
            init = t("_initialize"),
            create = t("proxy_on_context_create"),
            vm_start = t("proxy_on_vm_start"),
            configure = t("proxy_on_configure"),
        ),
        body: format!(
            r#"
  (data (i32.const 0x400) "upstream")
  {headers}
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    {request}
    (drop (call $http_call (i32.const 0x400) (i32.const 8) (i32.const 0x600) (i32.const {hlen})
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                           (i32.const 1000) (i32.const 0x1000)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    {response} (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) {done} (i32.const 1))
  (func (export "proxy_on_log") (param i32) {log})
  (func (export "proxy_on_tick") (param i32) {tick})
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32) {call_response})"#,
            headers = wat_data(0x600, &call_headers),
            hlen = call_headers.len(),
            request = t("proxy_on_request_headers"),
            response = t("proxy_on_response_headers"),
            done = t("proxy_on_done"),
            log = t("proxy_on_log"),
            tick = t("proxy_on_tick"),
            call_response = t("proxy_on_http_call_response"),
        ),
        ..Wat::default()
    }
    .load()
}

/// Drives one stream through every stream callback, then a tick and the callout answer.
fn drive_everything(vm: &mut Vm, root: u32) -> Result<(), CallbackError> {
    let ex = exchange(GET_ROOT);
    let ctx = vm.create_stream(root, ex.clone())?;
    vm.on_request_headers(ctx, true)?;
    let token = vm
        .take_effects()
        .iter()
        .find_map(|e| match e {
            Effect::HttpCall(call) => Some(call.token),
            _ => None,
        })
        .expect("the guest dispatched a callout");
    ex.lock().response_headers = Fields::from_pairs([(":status", "200")]);
    vm.on_response_headers(ctx, true)?;
    vm.finish_stream(ctx)?;
    assert_eq!(vm.stream_count(), 0);
    vm.on_tick(root)?;
    vm.on_http_call_response(
        token,
        Some(HttpCallResponse {
            headers: Fields::from_pairs([(":status", "200")]),
            ..Default::default()
        }),
    )?;
    Ok(())
}

#[test]
fn a_trap_in_any_callback_is_reported_with_its_backtrace_and_fails_the_vm() {
    let neighbour = healthy_neighbour();

    // The fixture without a trap runs every callback cleanly.
    let mut clean = start_guest(&trap_fixture("none"), |_| {});
    let root = clean.root;
    drive_everything(&mut clean.vm, root).unwrap();
    assert!(clean.vm.failure().is_none());

    for &target in TRAP_TARGETS {
        let module = trap_fixture(target);
        let logs = Logs::default();
        let (err, vm) = match host().new_vm(&module, options(&logs)) {
            Err(VmError::Start(err)) => (err, None),
            Err(other) => panic!("{target}: unexpected {other:?}"),
            Ok(mut vm) => match vm.start_plugin(spec()) {
                Err(StartError::Callback(err)) => {
                    // The root context is gone and the VM refuses another plugin.
                    assert!(
                        matches!(
                            vm.start_plugin(spec()),
                            Err(StartError::Callback(CallbackError::VmFailed(_)))
                        ),
                        "{target}"
                    );
                    (err, Some(vm))
                }
                Err(other) => panic!("{target}: unexpected {other:?}"),
                Ok(root) => {
                    let err = drive_everything(&mut vm, root)
                        .expect_err(&format!("{target} should have trapped"));
                    assert_vm_failed(vm.on_tick(root));
                    assert_vm_failed(vm.create_stream(root, exchange(GET_ROOT)));
                    (err, Some(vm))
                }
            },
        };
        let (callback, message, backtrace) = expect_trap(&err);
        assert_eq!(callback, target);
        assert!(message.contains("unreachable"), "{target}: {message}");
        assert!(
            backtrace.contains("explode"),
            "{target}: the backtrace should name the guest function:\n{backtrace}"
        );
        if let Some(vm) = &vm {
            let why = vm.failure().expect("the VM is failed");
            assert!(why.contains(target), "{why}");
            assert_eq!(vm.traps(), 1);
        }
        assert!(
            logs.contains(LogLevel::Critical, &format!("{target} trapped")),
            "{target}: {:?}",
            logs.messages()
        );
        assert!(logs.contains(LogLevel::Critical, "explode"), "{target}");
    }

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 6. Hostcalls from inside the allocator
// ---------------------------------------------------------------------------------------

/// A module whose allocator first runs `inside`, then allocates honestly; its request
/// callback asks for `:path` (so the host calls the allocator) and then sets a tick period.
fn allocator_fixture(inside: &str) -> Arc<PluginModule> {
    Wat {
        imports: r#"
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))"#
            .into(),
        allocator: format!(
            r#"
  (data (i32.const 0x500) "allocating")
  (func $meddling_alloc (export "proxy_on_memory_allocate") (param i32) (result i32)
    {inside}
    (call $bump (local.get 0)))"#
        ),
        body: r#"
  (data (i32.const 0x400) ":path")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                (i32.const 0x1000) (i32.const 0x1004)))
    ;; outside the allocator every hostcall is allowed again
    (call $rec (call $set_tick (i32.const 100)))
    (call $report)
    (i32.const 0))"#
            .into(),
        ..Wat::default()
    }
    .load()
}

#[test]
fn hostcalls_from_inside_the_allocator_trap_except_logging() {
    let neighbour = healthy_neighbour();

    for (call, inside) in [
        (
            "proxy_get_header_map_pairs",
            "(drop (call $get_pairs (i32.const 0) (i32.const 0x1100) (i32.const 0x1104)))",
        ),
        (
            "proxy_set_tick_period_milliseconds",
            "(drop (call $set_tick (i32.const 5)))",
        ),
    ] {
        let mut g = start_guest(&allocator_fixture(inside), |_| {});
        let (ex, result) = g.request(GET_ROOT);
        let err = result.unwrap_err();
        let (callback, message, backtrace) = expect_trap(&err);
        assert_eq!(callback, "proxy_on_request_headers");
        assert!(message.contains("allocator"), "{message}");
        assert!(message.contains(call), "{message}");
        assert!(backtrace.contains("meddling_alloc"), "{backtrace}");
        assert!(
            g.vm.take_effects().is_empty(),
            "the refused hostcall had no effect"
        );
        assert!(ex.lock().request_headers.get("x-st").is_none());
        assert!(g.vm.failure().is_some());
        assert_vm_failed(g.vm.create_stream(g.root, exchange(GET_ROOT)));
    }

    // proxy_log is allowed in the allocator.
    let mut g = start_guest(
        &allocator_fixture("(drop (call $log (i32.const 2) (i32.const 0x500) (i32.const 10)))"),
        |_| {},
    );
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![0, 0]);
    assert!(g.logs.contains(LogLevel::Info, "allocating"));
    assert!(matches!(
        g.vm.take_effects().as_slice(),
        [Effect::TickPeriod { period: Some(p), .. }] if *p == Duration::from_millis(100)
    ));

    // An allocator that traps on its own ends the callback with its backtrace.
    let mut g = start_guest(&allocator_fixture("unreachable"), |_| {});
    let (_, result) = g.request(GET_ROOT);
    let err = result.unwrap_err();
    let (callback, message, backtrace) = expect_trap(&err);
    assert_eq!(callback, "proxy_on_request_headers");
    assert!(message.contains("unreachable"), "{message}");
    assert!(backtrace.contains("meddling_alloc"), "{backtrace}");

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 7. Oversized header maps
// ---------------------------------------------------------------------------------------

fn big_headers_fixture() -> Arc<PluginModule> {
    Wat {
        imports: r#"
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))"#
            .into(),
        body: format!(
            r#"
  (data (i32.const 0x400) "x-huge")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $status i32)
    (i32.store (i32.const 0x1000) (i32.const 0x5a5a5a5a))
    (i32.store (i32.const 0x1004) (i32.const 0x5a5a5a5a))
    (local.set $status (call $get_pairs (i32.const 0) (i32.const 0x1000) (i32.const 0x1004)))
    (call $rec (local.get $status))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1004)))
    (call $put_u32 (i32.const 1)
      (if (result i32) (local.get $status)
        (then (i32.const 0x5a5a5a5a))
        (else (i32.load (i32.load (i32.const 0x1000))))))
    ;; make sure 2 MiB of guest memory exist, so the refusals below are about size, not bounds
    (if (i32.lt_u (call $memend) (i32.const {two_mib_and_more}))
      (then (drop (memory.grow (i32.const 34)))))
    (call $put_u32 (i32.const 2) (call $memend))
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x10000) (i32.const {two_mib})))
    (call $rec (call $set_pairs (i32.const 0) (i32.const 0x10000) (i32.const {over})))
    (call $rec (call $add (i32.const 0) (i32.const 0x400) (i32.const 6)
                          (i32.const 0x10000) (i32.const {over})))
    (call $report)
    (i32.const 0))"#,
            two_mib = 2 << 20,
            two_mib_and_more = (2 << 20) + 0x10000,
            over = MAX_PAIRS_BYTES + 1,
        ),
        ..Wat::default()
    }
    .load()
}

fn ten_megabytes_of_headers() -> SharedExchange {
    let mut ex = HttpExchange::default();
    for i in 0..10 {
        ex.request_headers
            .add(&format!("x-big-{i}"), vec![b'a' + i as u8; 1 << 20]);
    }
    Arc::new(parking_lot::Mutex::new(ex))
}

#[test]
fn ten_megabytes_of_headers_reach_the_guest_and_oversized_maps_from_it_are_refused() {
    let neighbour = healthy_neighbour();
    let module = big_headers_fixture();

    // Default memory limit (64 MiB): the host allocates in the guest and copies everything.
    let mut g = start_guest(&module, |o| {
        // Copying 10 MiB must not be mistaken for a runaway guest on a busy machine.
        o.callback_timeout = Duration::from_secs(5);
        // The guest's report headers go into a map the client already filled past the
        // default headerBytes: this filter is allowed 16 MiB.
        o.quotas.header_bytes = 16 << 20;
    });
    let ex = ten_megabytes_of_headers();
    let before = ex.lock().request_headers.clone();
    let expected_len: usize = 4 + before
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    assert_eq!(expected_len, pairs::serialize(&before).len());
    assert!(expected_len > 10 << 20);
    let started = Instant::now();
    let (ex, result) = g.request_on(ex);
    let took = started.elapsed();
    assert_eq!(result.unwrap(), Action::Continue);
    // get_pairs OK; set_pairs of 2 MiB and of MAX_PAIRS_BYTES + 1: BAD_ARGUMENT; a single
    // value of MAX_PAIRS_BYTES + 1: BAD_ARGUMENT.
    assert_eq!(statuses(&ex), vec![0, 2, 2, 2]);
    assert_eq!(reported_u32(&ex, 0) as usize, expected_len, "length seen");
    assert_eq!(reported_u32(&ex, 1), 10, "pair count seen");
    assert!(reported_u32(&ex, 2) as usize >= expected_len);
    assert!(g.vm.memory_bytes() <= 64 << 20);
    assert_eq!(
        original_headers(&ex),
        before.0,
        "the refused writes left the headers alone"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // With a 2 MiB memory limit the allocator cannot grow: the guest gets
    // INVALID_MEMORY_ACCESS and untouched return slots, not a trap.
    let mut small = start_guest(&module, |o| {
        o.memory_limit_bytes = 2 << 20;
        o.callback_timeout = Duration::from_secs(5);
        o.quotas.header_bytes = 16 << 20;
    });
    let (ex, result) = small.request_on(ten_megabytes_of_headers());
    assert_eq!(result.unwrap(), Action::Continue);
    // The oversized buffers it then hands over lie past the end of its 2 MiB memory:
    // INVALID_MEMORY_ACCESS before any size check.
    assert_eq!(statuses(&ex), vec![6, 6, 6, 6]);
    assert_eq!(reported_u32(&ex, 0), 0x5a5a5a5a);
    assert_eq!(reported_u32(&ex, 1), 0x5a5a5a5a);
    assert!(small.vm.memory_bytes() <= 2 << 20);
    assert!(small.vm.failure().is_none());

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 8. Malformed modules
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_modules_are_refused_at_load_with_a_precise_error() {
    let neighbour = healthy_neighbour();

    // Not wasm at all.
    let err = host().load(b"#!/bin/sh\necho pwned\n").unwrap_err();
    assert!(
        matches!(&err, LoadError::NotWasm(head) if head == b"#!/b"),
        "{err:?}"
    );
    assert!(err.to_string().contains("00 61 73 6d"), "{err}");
    assert!(matches!(
        host().load(b"\0asm").unwrap_err(),
        LoadError::NotWasm(_)
    ));
    assert!(matches!(
        host().load(b"").unwrap_err(),
        LoadError::NotWasm(_)
    ));
    // The magic, then garbage.
    assert!(matches!(
        host().load(b"\0asm\x01\0\0\0\xff\xff\xff\xff").unwrap_err(),
        LoadError::Invalid(_)
    ));

    // No ABI marker.
    let err = wat_load(
        &Wat {
            marker: "",
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::NoAbiMarker(exports) if exports.contains("proxy_on_memory_allocate")),
        "{err:?}"
    );
    assert!(err.to_string().contains("proxy_abi_version_0_2_1"), "{err}");

    // No allocator.
    let err = wat_load(
        &Wat {
            allocator: String::new(),
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::NoAllocator), "{err:?}");
    assert!(err.to_string().contains("proxy_on_memory_allocate"));

    // Memory under another name.
    let err = wat_load(
        &Wat {
            memory: r#"(memory (export "mem") 2)"#.into(),
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::NoMemory), "{err:?}");

    // A callback with the wrong signature.
    let err = wat_load(
        &Wat {
            body: r#"(func (export "proxy_on_request_headers") (param i32) (result i32) (i32.const 0))"#
                .into(),
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    match &err {
        LoadError::BadExport {
            name,
            found,
            expected,
        } => {
            assert_eq!(name, "proxy_on_request_headers");
            assert_eq!(found, "(i32) -> i32");
            assert!(expected.contains("(i32, i32, i32) -> i32"), "{expected}");
        }
        other => panic!("expected BadExport, got {other:?}"),
    }
    assert!(
        err.to_string().contains("proxy_on_request_headers"),
        "{err}"
    );

    // An allocator returning i64.
    let err = wat_load(
        &Wat {
            allocator: r#"(func (export "proxy_on_memory_allocate") (param i32) (result i64) (i64.const 0))"#
                .into(),
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::BadExport { name, .. } if name == "proxy_on_memory_allocate"),
        "{err:?}"
    );

    // A hostcall imported with the wrong type cannot be linked.
    let err = wat_load(
        &Wat {
            imports: r#"(import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32) (result i32)))"#
                .into(),
            ..Wat::default()
        }
        .text(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::UnknownImport(what) if what.contains("env.proxy_get_header_map_pairs")),
        "{err:?}"
    );

    // An import the host does not know loads (as in cpp-host) and traps only when called.
    let module = Wat {
        imports: r#"(import "env" "proxy_not_a_hostcall" (func $nope (param i32) (result i32)))"#
            .into(),
        body: r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $nope (i32.const 0)))"#
            .into(),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |_| {});
    let (_, result) = g.request(GET_ROOT);
    let err = result.unwrap_err();
    let (callback, message, _) = expect_trap(&err);
    assert_eq!(callback, "proxy_on_request_headers");
    assert!(message.contains("proxy_not_a_hostcall"), "{message}");

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 9. ABI 0.1.0 versus 0.2.1
// ---------------------------------------------------------------------------------------

/// Asks for a missing and a present header with sentinel-filled return slots.
fn missing_header_fixture(marker: &'static str, headers_params: &str) -> Arc<PluginModule> {
    Wat {
        marker,
        imports: r#"
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_configuration" (func $get_config (param i32 i32) (result i32)))"#
            .into(),
        roots: r#"
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (i32.eqz (call $get_config (i32.const 0x1100) (i32.const 0x1104)))
      (then (drop (call $log (i32.const 2)
                             (i32.load (i32.const 0x1100)) (i32.load (i32.const 0x1104))))))
    (i32.const 1))"#
            .into(),
        body: format!(
            r#"
  (data (i32.const 0x400) "x-missing")
  (data (i32.const 0x410) ":path")
  (func $slots_untouched (result i32)
    (i32.and (i32.eq (i32.load (i32.const 0x1000)) (i32.const 0x5a5a5a5a))
             (i32.eq (i32.load (i32.const 0x1004)) (i32.const 0x5a5a5a5a))))
  (func $slots_empty (result i32)
    (i32.and (i32.eqz (i32.load (i32.const 0x1000))) (i32.eqz (i32.load (i32.const 0x1004)))))
  (func (export "proxy_on_request_headers") (param {headers_params}) (result i32)
    (call $put_u32 (i32.const 0) (local.get 1))
    (i32.store (i32.const 0x1000) (i32.const 0x5a5a5a5a))
    (i32.store (i32.const 0x1004) (i32.const 0x5a5a5a5a))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x400) (i32.const 9)
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $rec (call $slots_untouched))
    (call $rec (call $slots_empty))
    (call $rec (call $get_value (i32.const 0) (i32.const 0x410) (i32.const 5)
                                (i32.const 0x1000) (i32.const 0x1004)))
    (call $put_u32 (i32.const 1) (i32.load (i32.const 0x1004)))
    (call $report)
    (i32.const 0))"#
        ),
        ..Wat::default()
    }
    .load()
}

#[test]
fn abi_0_1_0_answers_a_missing_header_with_an_empty_value_and_0_2_1_with_not_found() {
    let neighbour = healthy_neighbour();

    let old = missing_header_fixture("proxy_abi_version_0_1_0", "i32 i32");
    assert_eq!(old.abi, AbiVersion::V0_1_0);
    let mut g = start_guest(&old, |_| {});
    assert_eq!(g.vm.abi_version(), AbiVersion::V0_1_0);
    // proxy_get_configuration (0.1.0 only) hands the plugin configuration to on_configure.
    assert!(
        g.logs.contains(LogLevel::Info, "hostile-config"),
        "{:?}",
        g.logs.messages()
    );
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // missing key: OK, slots written with 0/0; present key: OK.
    assert_eq!(statuses(&ex), vec![0, 0, 1, 0]);
    assert_eq!(reported_u32(&ex, 0), GET_ROOT.len() as u32, "num_headers");
    assert_eq!(reported_u32(&ex, 1), 1, "length of :path");

    let new = missing_header_fixture("proxy_abi_version_0_2_1", "i32 i32 i32");
    assert_eq!(new.abi, AbiVersion::V0_2_1);
    let mut g = start_guest(&new, |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // missing key: NOT_FOUND, slots untouched; present key: OK.
    assert_eq!(statuses(&ex), vec![1, 1, 0, 0]);
    assert_eq!(reported_u32(&ex, 0), GET_ROOT.len() as u32, "num_headers");
    assert_eq!(reported_u32(&ex, 1), 1, "length of :path");

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 10. WASI
// ---------------------------------------------------------------------------------------

#[test]
fn wasi_stdio_random_preopens_and_environment_are_sandboxed() {
    let neighbour = healthy_neighbour();
    let iov = |ptr: u32, len: u32| [ptr.to_le_bytes(), len.to_le_bytes()].concat();
    let module = Wat {
        imports: r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))"#
            .into(),
        body: format!(
            r#"
  (data (i32.const 0x400) "hello\n")
  (data (i32.const 0x410) "oops\n")
  (data (i32.const 0x420) "tail")
  {iov_hello}
  {iov_oops}
  {iov_tail}
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (call $fd_write (i32.const 1) (i32.const 0x480) (i32.const 1) (i32.const 0x1000)))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1000)))
    (call $rec (call $fd_write (i32.const 2) (i32.const 0x488) (i32.const 1) (i32.const 0x1000)))
    (call $rec (call $fd_write (i32.const 3) (i32.const 0x480) (i32.const 1) (i32.const 0x1000)))
    (call $rec (call $fd_write (i32.const 1) (i32.const 0x7fff0000) (i32.const 1) (i32.const 0x1000)))
    (call $rec (call $fd_write (i32.const 1) (i32.const 0x490) (i32.const 1) (i32.const 0x1000)))
    (call $rec (call $random_get (i32.const 0x2000) (i32.const 70000)))
    (call $rec (call $random_get (i32.const 0x2000) (i32.const 65536)))
    (call $rec (call $random_get (i32.const 0x7fff0000) (i32.const 16)))
    (call $rec (call $fd_prestat_get (i32.const 3) (i32.const 0x1000)))
    (call $rec (call $environ_sizes_get (i32.const 0x1000) (i32.const 0x1004)))
    (call $put_u32 (i32.const 1) (i32.load (i32.const 0x1000)))
    (call $put_u32 (i32.const 2) (i32.load (i32.const 0x1004)))
    (call $rec (call $environ_get (i32.const 0x1100) (i32.const 0x1200)))
    (call $put_u32 (i32.const 3) (i32.load (i32.const 0x1100)))
    (call $put_u32 (i32.const 4) (i32.load (i32.const 0x1104)))
    ;; The environment block holds NULs, which no header value may: it goes to the log.
    (drop (call $log (i32.const 2) (i32.const 0x1200) (i32.load (i32.const 0x1004))))
    (call $report)
    (i32.const 0))"#,
            iov_hello = wat_data(0x480, &iov(0x400, 6)),
            iov_oops = wat_data(0x488, &iov(0x410, 5)),
            iov_tail = wat_data(0x490, &iov(0x420, 4)),
        ),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |o| {
        o.env = vec![("A".into(), "1".into()), ("GREETING".into(), "hi".into())]
    });
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    #[rustfmt::skip]
    let expected = vec![
        0, 0, 8, 21, 0, // fd_write: stdout, stderr, fd 3 (EBADF), wild iovec (EFAULT), partial line
        28, 0, 21,      // random_get: 70000 bytes (EINVAL), 64 KiB, wild pointer (EFAULT)
        8,              // fd_prestat_get(3): EBADF, no preopens
        0, 0,           // environ_sizes_get, environ_get
    ];
    assert_eq!(statuses(&ex), expected);
    assert_eq!(reported_u32(&ex, 0), 6, "bytes written");
    let messages = g.logs.messages();
    assert!(
        messages.contains(&(LogLevel::Info, "hello".into())),
        "{messages:?}"
    );
    assert!(messages.contains(&(LogLevel::Error, "oops".into())));
    // A partial line is flushed when the callback returns.
    assert!(messages.contains(&(LogLevel::Info, "tail".into())));
    assert_eq!(reported_u32(&ex, 1), 2, "environment entries");
    assert_eq!(reported_u32(&ex, 2), 16, "environment bytes");
    assert_eq!(reported_u32(&ex, 3), 0x1200);
    assert_eq!(reported_u32(&ex, 4), 0x1204);
    assert!(g.logs.contains(LogLevel::Info, "A=1\0GREETING=hi\0"));

    // proc_exit(0) from _start (AssemblyScript imports it from wasi_unstable) is a clean start.
    let command = |code: i32| {
        Wat {
            imports: r#"(import "wasi_unstable" "proc_exit" (func $proc_exit (param i32)))"#.into(),
            body: format!(
                r#"
  (func $main (export "_start") (call $proc_exit (i32.const {code})) unreachable)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $proc_exit (i32.const 0))
    (i32.const 0))"#
            ),
            ..Wat::default()
        }
        .load()
    };
    let mut g = start_guest(&command(0), |_| {});
    assert!(g.vm.failure().is_none());
    // ... but proc_exit in a stream callback ends the callback as a trap.
    let (_, result) = g.request(GET_ROOT);
    let err = result.unwrap_err();
    let (callback, message, _) = expect_trap(&err);
    assert_eq!(callback, "proxy_on_request_headers");
    assert!(message.contains("proc_exit(0)"), "{message}");

    // A non-zero exit at start-up fails the VM.
    let logs = Logs::default();
    match host().new_vm(&command(3), options(&logs)) {
        Err(VmError::Start(err)) => {
            let (callback, message, _) = expect_trap(&err);
            assert_eq!(callback, "_start");
            assert!(message.contains("proc_exit(3)"), "{message}");
        }
        other => panic!("expected a start-up failure, got {other:?}"),
    }

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// Extra probes
// ---------------------------------------------------------------------------------------

#[test]
fn every_kind_of_wasm_trap_is_reported_as_a_trap() {
    let neighbour = healthy_neighbour();
    // The number of request headers picks the trap.
    let module = Wat {
        body: r#"
  (type $v (func))
  (table 1 funcref)
  (func $recurse (param i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func $pick_a_trap (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (local.get 1) (i32.const 1))
      (then (drop (i32.div_u (i32.const 1) (i32.sub (local.get 1) (i32.const 1))))))
    (if (i32.eq (local.get 1) (i32.const 2))
      (then (drop (i32.load (i32.const 0x7ffffff0)))))
    (if (i32.eq (local.get 1) (i32.const 3))
      (then (drop (call $recurse (i32.const 0)))))
    (if (i32.eq (local.get 1) (i32.const 4))
      (then (call_indirect (type $v) (i32.const 0))))
    (if (i32.eq (local.get 1) (i32.const 5))
      (then (drop (i32.trunc_f32_s (f32.div (f32.const 0) (f32.const 0))))))
    (i32.const 0))"#
            .into(),
        ..Wat::default()
    }
    .load();
    let h = [
        ("h1", "1"),
        ("h2", "2"),
        ("h3", "3"),
        ("h4", "4"),
        ("h5", "5"),
    ];
    // wasmtime shows the innermost 20 frames, so the overflow names only `recurse`.
    for (n, expected, frame) in [
        (1, "divide by zero", "pick_a_trap"),
        (2, "out of bounds memory access", "pick_a_trap"),
        (3, "call stack exhausted", "recurse"),
        (4, "uninitialized element", "pick_a_trap"),
        (5, "invalid conversion to integer", "pick_a_trap"),
    ] {
        let mut g = start_guest(&module, |_| {});
        let (_, result) = g.request(&h[..n]);
        let err = result.unwrap_err();
        let (callback, message, backtrace) = expect_trap(&err);
        assert_eq!(callback, "proxy_on_request_headers");
        assert!(message.contains(expected), "{n}: {message}");
        assert!(backtrace.contains(frame), "{n}: {backtrace}");
        assert!(g.vm.failure().is_some());
    }

    assert_neighbours_unharmed(neighbour);
}

#[test]
fn a_huge_proxy_log_message_is_cut_and_a_bigger_one_refused() {
    let neighbour = healthy_neighbour();
    const MAX_GUEST_BUFFER: usize = limits::MAX_GUEST_BUFFER_BYTES;
    let module = Wat {
        memory: r#"(memory (export "memory") 272)"#.into(), // 17 MiB
        body: format!(
            r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (memory.fill (i32.const 0x10000) (i32.const 0x78) (i32.const {max}))
    (call $rec (call $log (i32.const 2) (i32.const 0x10000) (i32.const {max})))
    (call $rec (call $log (i32.const 2) (i32.const 0x10000) (i32.const {over})))
    (call $report)
    (i32.const 0))"#,
            max = MAX_GUEST_BUFFER,
            over = MAX_GUEST_BUFFER + 1,
        ),
        ..Wat::default()
    }
    .load();
    // Copying 16 MiB in a debug build on a busy machine: not a runaway guest.
    let mut g = start_guest(&module, |o| o.callback_timeout = Duration::from_secs(5));
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![0, 2]);
    let longest = g
        .logs
        .messages()
        .iter()
        .filter(|(_, m)| m.starts_with("xxxx"))
        .map(|(_, m)| m.len())
        .max()
        .expect("the log line arrived");
    assert_eq!(
        longest,
        limits::MAX_LOG_MESSAGE_BYTES + "…[truncated]".len()
    );

    assert_neighbours_unharmed(neighbour);
}

/// A guest whose `proxy_on_request_headers` writes `count` iovecs to stdout, each pointing at
/// the same `len` bytes of 'x' (no newline).
fn stdout_flood_fixture(count: u32, len: u32) -> Arc<PluginModule> {
    Wat {
        imports: r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#
            .into(),
        memory: r#"(memory (export "memory") 40)"#.into(),
        body: format!(
            r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    (memory.fill (i32.const 0x100000) (i32.const 0x78) (i32.const {len}))
    (block $done
      (loop $fill
        (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
        (i32.store (i32.add (i32.const 0x10000) (i32.shl (local.get $i) (i32.const 3)))
                   (i32.const 0x100000))
        (i32.store (i32.add (i32.const 0x10004) (i32.shl (local.get $i) (i32.const 3)))
                   (i32.const {len}))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $fill)))
    (call $rec (call $fd_write (i32.const 1) (i32.const 0x10000) (i32.const {count})
                               (i32.const 0x1000)))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1000)))
    (call $report)
    (i32.const 0))"#
        ),
        ..Wat::default()
    }
    .load()
}

#[test]
fn stdout_lines_are_cut_like_proxy_log_messages() {
    let neighbour = healthy_neighbour();
    let mut g = start_guest(&stdout_flood_fixture(1, 1 << 20), |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![0]);
    assert_eq!(reported_u32(&ex, 0), 1 << 20);
    let longest = g
        .logs
        .messages()
        .iter()
        .map(|(_, m)| m.len())
        .max()
        .unwrap();
    assert!(
        longest <= limits::MAX_LOG_MESSAGE_BYTES + "…[truncated]".len(),
        "a {longest}-byte stdout line reached the log sink"
    );

    assert_neighbours_unharmed(neighbour);
}

#[test]
fn one_fd_write_cannot_outlast_the_callback_deadline() {
    let neighbour = healthy_neighbour();
    // 1024 iovecs x 1 MiB = 1 GiB copied and logged by one hostcall, from 1 MiB of guest memory.
    let module = stdout_flood_fixture(1024, 1 << 20);
    let logged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let records = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (l, r) = (logged.clone(), records.clone());
    let sink: LogSink = Arc::new(move |rec: &LogRecord| {
        l.fetch_add(rec.message.len(), std::sync::atomic::Ordering::Relaxed);
        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let mut g = start_guest(&module, |o| {
        o.log = sink;
        o.callback_timeout = Duration::from_millis(50);
    });
    let started = Instant::now();
    let (_, result) = g.request(GET_ROOT);
    let took = started.elapsed();
    eprintln!(
        "fd_write flood: {took:?}, {} bytes in {} log records, result {result:?}",
        logged.load(std::sync::atomic::Ordering::Relaxed),
        records.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        took < Duration::from_millis(500),
        "a 50 ms callback ran for {took:?}"
    );
    assert!(
        logged.load(std::sync::atomic::Ordering::Relaxed) <= 16 << 20,
        "one callback logged {} bytes",
        logged.load(std::sync::atomic::Ordering::Relaxed)
    );

    assert_neighbours_unharmed(neighbour);
}

#[test]
fn a_failed_vm_refuses_even_callbacks_the_module_does_not_export() {
    let neighbour = healthy_neighbour();
    // Exports only proxy_on_request_headers (which traps) among the stream callbacks.
    let module = Wat {
        body: r#"
  (func $explode (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    unreachable)"#
            .into(),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |_| {});
    let ex = exchange(GET_ROOT);
    let first = g.vm.create_stream(g.root, ex.clone()).unwrap();
    let second = g.vm.create_stream(g.root, exchange(GET_ROOT)).unwrap();
    expect_trap(&g.vm.on_request_headers(first, true).unwrap_err());
    assert!(g.vm.failure().is_some());
    // Documented: "After any of these the VM is failed: every later call returns VmFailed".
    assert_vm_failed(g.vm.on_request_headers(second, true)); // exported: VmFailed
    assert_vm_failed(g.vm.on_request_body(second, true)); // not exported
    assert_vm_failed(g.vm.on_response_headers(second, true));
    assert_vm_failed(g.vm.on_tick(g.root));
    assert_vm_failed(g.vm.finish_stream(second));

    assert_neighbours_unharmed(neighbour);
}

// ---------------------------------------------------------------------------------------
// 11. Quotas: every host resource a guest can grow, and headers HTTP cannot carry (#15)
// ---------------------------------------------------------------------------------------
//
// Each test sets a quota low, drives a guest past it, and asserts the status the guest gets,
// the refusal counter (`QuotaState`: the `limit` label of
// `wasmfilter_filter_quota_refusals_total`), the one log line naming the filter and the
// `limits` field however many refusals there were, and that the neighbours still serve.

const QUOTA_IMPORTS: &str = r#"
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))"#;

/// A guest with every quota-related hostcall imported, `pages` of memory, module-level
/// `data`, and `body` as its `proxy_on_request_headers` (locals `$i $ok $st $other`, global
/// `$n` counting requests); its refusals are counted in the returned state.
fn quota_guest(
    pages: u32,
    data: &str,
    body: &str,
    tweak: impl FnOnce(&mut VmOptions),
) -> (Guest, Arc<QuotaState>) {
    let module = Wat {
        imports: QUOTA_IMPORTS.into(),
        memory: format!(r#"(memory (export "memory") {pages})"#),
        body: format!(
            r#"
  {data}
  (global $n (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32) (local $ok i32) (local $st i32) (local $other i32)
    {body}
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.const 0))"#
        ),
        ..Wat::default()
    }
    .load();
    let state = Arc::new(QuotaState::default());
    let counted = state.clone();
    let g = start_guest(&module, |o| {
        o.quota_state = counted;
        // Thousands of hostcalls in one callback: no deadline in the way on a busy machine.
        o.callback_timeout = Duration::from_secs(20);
        tweak(o);
    });
    (g, state)
}

/// `n` rounds of `call` (an expression leaving a status), counting OK in `$ok` and keeping
/// the last other status in `$other`.
fn counted_loop(n: u32, call: &str) -> String {
    format!(
        r#"
    (local.set $i (i32.const 0))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
      (local.set $st {call})
      (if (i32.eqz (local.get $st))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1))))
        (else (local.set $other (local.get $st))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))"#
    )
}

/// The host's warnings about filter `hostile` that contain `text`.
fn warnings(logs: &Logs, text: &str) -> Vec<String> {
    logs.0
        .lock()
        .iter()
        .filter(|r| r.level == LogLevel::Warn && r.plugin == "hostile" && r.message.contains(text))
        .map(|r| r.message.clone())
        .collect()
}

/// Exactly one line about `text` however many refusals (rate-limited), naming the filter.
fn assert_one_line(logs: &Logs, text: &str) -> String {
    let lines = warnings(logs, text);
    assert_eq!(lines.len(), 1, "{text}: {lines:#?}");
    assert!(lines[0].starts_with("filter \"hostile\" "), "{}", lines[0]);
    lines[0].clone()
}

/// Fills `len` bytes at `addr` with `byte` (bulk memory).
fn fill(addr: u32, byte: u8, len: u32) -> String {
    format!("(memory.fill (i32.const {addr}) (i32.const {byte}) (i32.const {len}))")
}

/// The guest's resident set, from /proc/self/status (VmRSS, in KiB).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

#[test]
fn a_hundred_thousand_added_headers_stop_at_the_header_count_quota() {
    let neighbour = healthy_neighbour();
    let body = format!(
        r#"{fill}
    (drop (call $remove (i32.const 0) (i32.const 0x400) (i32.const 3)))
    (call $put_u32 (i32.const 0) (local.get $ok))
    (call $put_u32 (i32.const 1) (local.get $other))"#,
        fill = counted_loop(
            100_000,
            "(call $add (i32.const 0) (i32.const 0x400) (i32.const 3) (i32.const 0x410) (i32.const 1))"
        )
    );
    let data = r#"(data (i32.const 0x400) "x-h") (data (i32.const 0x410) "v")"#;
    let (mut g, state) = quota_guest(2, data, &body, |o| o.quotas.header_count = 64);
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    let allowed = 64 - GET_ROOT.len() as u32;
    assert_eq!(reported_u32(&ex, 0), allowed, "adds answered OK");
    assert_eq!(
        reported_u32(&ex, 1),
        Status::BadArgument as u32,
        "the others"
    );
    assert_eq!(
        state.count(Limit::HeaderCount),
        u64::from(100_000 - allowed)
    );
    let line = assert_one_line(&g.logs, "limits.headerCount (64)");
    assert!(
        line.contains("proxy_add_header_map_value refused with BAD_ARGUMENT"),
        "{line}"
    );
    assert!(g.vm.failure().is_none());
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn a_value_that_would_overgrow_the_map_is_refused_by_the_header_bytes_quota() {
    let neighbour = healthy_neighbour();
    let body = format!(
        r#"{big}
    (call $rec (call $replace (i32.const 0) (i32.const 0x400) (i32.const 5) (i32.const 0x4000) (i32.const 8192)))
    (call $rec (call $add (i32.const 0) (i32.const 0x400) (i32.const 5) (i32.const 0x4000) (i32.const 8192)))
    (call $rec (call $add (i32.const 0) (i32.const 0x400) (i32.const 5) (i32.const 0x4000) (i32.const 1024)))
    (call $rec (call $replace (i32.const 0) (i32.const 0x400) (i32.const 5) (i32.const 0x4000) (i32.const 2048)))
    (call $report)"#,
        big = fill(0x4000, b'a', 8192)
    );
    let data = r#"(data (i32.const 0x400) "x-big")"#;
    let (mut g, state) = quota_guest(2, data, &body, |o| o.quotas.header_bytes = 4096);
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![2, 2, 0, 0]);
    assert_eq!(ex.lock().request_headers.get("x-big").unwrap().len(), 2048);
    assert_eq!(state.count(Limit::HeaderBytes), 2);
    assert_one_line(&g.logs, "limits.headerBytes (4096)");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn headers_http_cannot_carry_are_refused_with_bad_argument_and_the_filter_named() {
    let neighbour = healthy_neighbour();
    let data = r#"
  (data (i32.const 0x400) "x-a")
  (data (i32.const 0x410) "a\0d\0ax-evil: 1")
  (data (i32.const 0x430) "a\00b")
  (data (i32.const 0x440) "bad name")
  (data (i32.const 0x450) ":path")
  (data (i32.const 0x460) "/a\0d\0a")
  (data (i32.const 0x470) "/a b")
  (data (i32.const 0x480) ":status")
  (data (i32.const 0x490) "200")
  (data (i32.const 0x4a0) ":bogus")
  (data (i32.const 0x4b0) "99")
  (data (i32.const 0x4c0) "204")
  (data (i32.const 0x4d0) "/ok")
  (data (i32.const 0x4e0) "x-ok")
  (data (i32.const 0x4f0) "fine")"#;
    let body = r#"
    (call $rec (call $add (i32.const 0) (i32.const 0x400) (i32.const 3) (i32.const 0x410) (i32.const 12)))
    (call $rec (call $add (i32.const 0) (i32.const 0x400) (i32.const 3) (i32.const 0x430) (i32.const 3)))
    (call $rec (call $add (i32.const 0) (i32.const 0x440) (i32.const 8) (i32.const 0x4f0) (i32.const 4)))
    (call $rec (call $replace (i32.const 0) (i32.const 0x450) (i32.const 5) (i32.const 0x460) (i32.const 4)))
    (call $rec (call $replace (i32.const 0) (i32.const 0x450) (i32.const 5) (i32.const 0x470) (i32.const 4)))
    (call $rec (call $add (i32.const 0) (i32.const 0x480) (i32.const 7) (i32.const 0x490) (i32.const 3)))
    (call $rec (call $add (i32.const 0) (i32.const 0x4a0) (i32.const 6) (i32.const 0x4f0) (i32.const 4)))
    (call $rec (call $replace (i32.const 2) (i32.const 0x480) (i32.const 7) (i32.const 0x4b0) (i32.const 2)))
    (call $rec (call $add (i32.const 1) (i32.const 0x450) (i32.const 5) (i32.const 0x4d0) (i32.const 3)))
    (call $rec (call $replace (i32.const 0) (i32.const 0x450) (i32.const 5) (i32.const 0x4d0) (i32.const 3)))
    (call $rec (call $replace (i32.const 2) (i32.const 0x480) (i32.const 7) (i32.const 0x4c0) (i32.const 3)))
    (call $rec (call $add (i32.const 0) (i32.const 0x4e0) (i32.const 4) (i32.const 0x4f0) (i32.const 4)))
    (call $report)"#;
    let (mut g, state) = quota_guest(1, data, body, |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // CRLF value, NUL value, name with a space, :path with CRLF, :path with a space,
    // :status in a request, an unknown pseudo-header, :status 99, :path in trailers: all
    // BAD_ARGUMENT; a valid :path, :status and header: OK.
    assert_eq!(statuses(&ex), vec![2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0]);
    {
        let ex = ex.lock();
        assert_eq!(ex.request_headers.get(":path").unwrap(), b"/ok");
        assert_eq!(ex.request_headers.get("x-ok").unwrap(), b"fine");
        assert!(ex.request_headers.get("x-a").is_none());
        assert!(ex.request_headers.get("x-evil").is_none());
        assert_eq!(ex.response_headers.get(":status").unwrap(), b"204");
        assert!(ex.request_trailers.is_empty());
    }
    assert_eq!(state.count(Limit::HeaderSyntax), 9);
    let line = assert_one_line(&g.logs, "sent a header HTTP cannot carry");
    assert!(
        line.contains(
            "proxy_add_header_map_value refused with BAD_ARGUMENT: the value of \"x-a\" holds CR"
        ),
        "{line}"
    );
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn malformed_map_encodings_are_refused_in_every_hostcall_that_takes_a_map() {
    let neighbour = healthy_neighbour();
    let ok = |pairs: &[(&str, &str)]| pairs::serialize(&Fields::from_pairs(pairs.iter().copied()));
    let mut trailing = ok(&[("x-a", "1")]);
    trailing.push(7);
    let mut unterminated = ok(&[("x-a", "1")]);
    *unterminated.last_mut().unwrap() = b'x';
    let crlf = ok(&[("x-a", "1\r\nx-b: 2")]);
    let pseudo = ok(&[(":status", "200")]);
    let callout_bad_path = ok(&[(":method", "GET"), (":path", "/a b"), (":authority", "up")]);
    let good = ok(&[
        (":method", "GET"),
        (":path", "/p"),
        (":authority", "a"),
        ("x-new", "1"),
    ]);
    let maps = [
        &trailing,
        &unterminated,
        &crlf,
        &pseudo,
        &callout_bad_path,
        &good,
    ];
    let mut data = String::from(r#"(data (i32.const 0x400) "upstream")"#);
    let mut at = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let addr = 0x2000 + 0x100 * i as u32;
        data.push_str(&wat_data(addr, m));
        at.push((addr, m.len()));
    }
    let set = |i: usize| {
        format!(
            "(call $rec (call $set_pairs (i32.const 0) (i32.const {}) (i32.const {})))",
            at[i].0, at[i].1
        )
    };
    let call = |i: usize| {
        format!(
            "(call $rec (call $http_call (i32.const 0x400) (i32.const 8) (i32.const {}) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x1000)))",
            at[i].0, at[i].1
        )
    };
    let local = format!(
        "(call $rec (call $local (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const {}) (i32.const {}) (i32.const -1)))",
        at[2].0, at[2].1
    );
    let body = format!(
        "{} {} {} {} {} {} {local} {} (call $report)",
        set(0),
        set(1),
        set(2),
        set(3),
        call(2),
        call(4),
        set(5)
    );
    let (mut g, state) = quota_guest(1, &data, &body, |_| {});
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![2, 2, 2, 2, 2, 2, 2, 0]);
    assert_eq!(
        original_headers(&ex),
        headers_of(&[
            (":method", "GET"),
            (":path", "/p"),
            (":authority", "a"),
            ("x-new", "1")
        ])
    );
    assert!(
        g.vm.take_effects().is_empty(),
        "no callout and no local reply"
    );
    assert_eq!(state.count(Limit::HeaderSyntax), 7);
    let line = assert_one_line(&g.logs, "sent a header HTTP cannot carry");
    assert!(
        line.contains("serialized map has 1 bytes after its last pair"),
        "{line}"
    );
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn shared_data_stops_at_its_byte_quota_and_the_host_stays_small() {
    let neighbour = healthy_neighbour();
    // Every request stores a 4 MiB value under a new key (the unbounded version of this grew
    // the host by 3.3 GB in 200 requests of 16 MiB).
    let data = r#"(data (i32.const 0x400) "key-")"#;
    let body = r#"
    (i32.store8 (i32.const 0x404) (i32.add (i32.const 97) (i32.rem_u (global.get $n) (i32.const 26))))
    (i32.store8 (i32.const 0x405) (i32.add (i32.const 97) (i32.rem_u (i32.div_u (global.get $n) (i32.const 26)) (i32.const 26))))
    (call $rec (call $set_shared (i32.const 0x400) (i32.const 6) (i32.const 0x10000) (i32.const 0x400000) (i32.const 0)))
    (call $report)"#;
    let (mut g, state) = quota_guest(80, data, body, |o| {
        o.vm_id = "shared-data-quota".into();
        o.quotas.shared_data_bytes = 16 << 20;
    });
    let before = rss_kib();
    let mut seen = Vec::new();
    for _ in 0..300 {
        let (ex, result) = g.request(GET_ROOT);
        assert_eq!(result.unwrap(), Action::Continue);
        seen.push(statuses(&ex)[0]);
    }
    let after = rss_kib();
    // 16 MiB hold three 4 MiB values (and their keys); every later write: CAS_MISMATCH, the
    // only refusal the SDKs accept from proxy_set_shared_data.
    assert_eq!(&seen[..4], &[0, 0, 0, 8]);
    assert!(seen[3..].iter().all(|s| *s == 8));
    let held = host().shared().data_bytes("shared-data-quota");
    assert_eq!(held, 3 * ((4 << 20) + 6));
    assert_eq!(state.count(Limit::SharedDataBytes), 297);
    let line = assert_one_line(&g.logs, "limits.sharedDataBytes (16777216)");
    assert!(line.contains("refused with CAS_MISMATCH"), "{line}");
    eprintln!(
        "shared data flood: 300 requests x 4 MiB, {} KiB held, RSS {before} -> {after} KiB",
        held / 1024
    );
    // Generous (other tests run in this process at the same time): unbounded, the same
    // requests would hold 1.2 GB.
    assert!(
        after.saturating_sub(before) < 400 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn full_queues_drop_their_oldest_items_and_an_item_larger_than_the_queue_is_refused() {
    let neighbour = healthy_neighbour();
    let data = r#"(data (i32.const 0x400) "q")"#;
    let body = format!(
        r#"
    (call $rec (call $register (i32.const 0x400) (i32.const 1) (i32.const 0x1000)))
    (call $put_u32 (i32.const 0) (i32.load (i32.const 0x1000)))
    {small}
    {big}
    (call $rec (call $enqueue (i32.load (i32.const 0x1000)) (i32.const 0x4000) (i32.const 4000)))
    (call $put_u32 (i32.const 1) (local.get $ok))
    (call $report)"#,
        small = counted_loop(
            6,
            "(call $enqueue (i32.load (i32.const 0x1000)) (i32.const 0x4000) (i32.const 100))"
        ),
        big = counted_loop(
            4,
            "(call $enqueue (i32.load (i32.const 0x1000)) (i32.const 0x4000) (i32.const 1000))"
        ),
    );
    let (mut g, state) = quota_guest(2, data, &body, |o| {
        o.vm_id = "queue-quota".into();
        o.quotas.queue_items = 4;
        o.quotas.queue_bytes = 3000;
    });
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // register OK; the 4000-byte item is larger than the whole queue: BAD_ARGUMENT.
    assert_eq!(statuses(&ex), vec![0, 2]);
    assert_eq!(
        reported_u32(&ex, 1),
        10,
        "every enqueue within the quota is OK"
    );
    let id = reported_u32(&ex, 0);
    // Six 100-byte items: two dropped for the item count. Then 1000-byte items: the
    // count drops one more each, and the bytes drop the rest: three 1000-byte items stay.
    assert_eq!(host().shared().queue_size(id), Some((3, 3000)));
    assert!(state.count(Limit::QueueItems) >= 2);
    assert!(state.count(Limit::QueueBytes) >= 2);
    assert_one_line(&g.logs, "limits.queueItems (4)");
    let line = assert_one_line(&g.logs, "limits.queueBytes (3000)");
    assert!(line.contains("dropped its"), "{line}");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn metric_definitions_stop_at_the_count_quota_and_long_names_are_refused() {
    let neighbour = healthy_neighbour();
    let data = r#"(data (i32.const 0x400) "m-aa")"#;
    let body = format!(
        r#"{long}
    (call $rec (call $define (i32.const 0) (i32.const 0x4000) (i32.const 60000) (i32.const 0x1000)))
    (local.set $i (i32.const 0))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const 100)))
      (i32.store8 (i32.const 0x402) (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 26))))
      (i32.store8 (i32.const 0x403) (i32.add (i32.const 97) (i32.div_u (local.get $i) (i32.const 26))))
      (if (i32.eqz (call $define (i32.const 0) (i32.const 0x400) (i32.const 4) (i32.const 0x1000)))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    ;; an existing metric is still found past the quota
    (i32.store16 (i32.const 0x402) (i32.const 0x6161))
    (call $rec (call $define (i32.const 0) (i32.const 0x400) (i32.const 4) (i32.const 0x1000)))
    (call $put_u32 (i32.const 0) (local.get $ok))
    (call $report)"#,
        long = fill(0x4000, b'a', 60000)
    );
    let (mut g, state) = quota_guest(2, data, &body, |o| {
        o.quotas.metrics = 10;
        o.quotas.metric_name_bytes = 64;
    });
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(statuses(&ex), vec![2, 0]);
    assert_eq!(reported_u32(&ex, 0), 10);
    assert_eq!(state.count(Limit::MetricNameBytes), 1);
    assert_eq!(state.count(Limit::Metrics), 90);
    assert_one_line(&g.logs, "limits.metricNameBytes (64)");
    assert_one_line(&g.logs, "limits.metrics (10)");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn callouts_past_the_pending_quota_get_internal_failure_and_one_log_line() {
    let neighbour = healthy_neighbour();
    let headers = pairs::serialize(&Fields::from_pairs([
        (":method", "GET"),
        (":path", "/"),
        (":authority", "upstream"),
    ]));
    let data = format!(
        r#"(data (i32.const 0x400) "upstream") {}"#,
        wat_data(0x2000, &headers)
    );
    let body = format!(
        r#"{calls}
    (call $put_u32 (i32.const 0) (local.get $ok))
    (call $put_u32 (i32.const 1) (local.get $other))"#,
        calls = counted_loop(
            1000,
            &format!(
                "(call $http_call (i32.const 0x400) (i32.const 8) (i32.const 0x2000) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x1000))",
                headers.len()
            )
        )
    );
    let (mut g, state) = quota_guest(1, &data, &body, |o| o.quotas.pending_callouts = 5);
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    assert_eq!(reported_u32(&ex, 0), 5);
    assert_eq!(reported_u32(&ex, 1), Status::InternalFailure as u32);
    let calls =
        g.vm.take_effects()
            .into_iter()
            .filter(|e| matches!(e, Effect::HttpCall(_)))
            .count();
    assert_eq!(calls, 5);
    assert_eq!(state.count(Limit::PendingCallouts), 995);
    // 995 refusals, one line (this used to be one "too many callouts outstanding" each).
    let line = assert_one_line(&g.logs, "limits.pendingCallouts (5)");
    assert!(line.contains("5 callouts outstanding"), "{line}");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn a_log_flood_is_cut_to_the_filter_rate_and_the_excess_counted() {
    let neighbour = healthy_neighbour();
    let body = format!(
        r#"{text}
    {logs}
    (call $put_u32 (i32.const 0) (local.get $ok))"#,
        text = fill(0x4000, b'a', 1024),
        logs = counted_loop(
            7_800,
            "(call $log (i32.const 2) (i32.const 0x4000) (i32.const 1024))"
        )
    );
    let (mut g, state) = quota_guest(2, "", &body, |o| o.quotas.log_records_per_second = 100);
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // proxy_log answers OK either way (the SDKs accept nothing else).
    assert_eq!(reported_u32(&ex, 0), 7_800);
    let kept = g
        .logs
        .0
        .lock()
        .iter()
        .filter(|r| r.level == LogLevel::Info && r.message.len() == 1024)
        .count();
    // A burst of 100, plus what refills while the loop runs.
    assert!((100..=400).contains(&kept), "{kept} records kept");
    assert_eq!(state.count(Limit::LogRecordsPerSecond), 7_800 - kept as u64);
    assert_one_line(&g.logs, "limits.logRecordsPerSecond (100)");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn local_replies_past_the_quota_are_refused_and_bodies_past_memory_are_invalid_access() {
    let neighbour = healthy_neighbour();
    let body = format!(
        r#"{text}
    (call $rec (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0x4000) (i32.const 32768) (i32.const 0) (i32.const 0) (i32.const -1)))
    (call $rec (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0x400) (i32.const 0x4000000) (i32.const 0) (i32.const 0) (i32.const -1)))
    (call $rec (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0x4000) (i32.const 1024) (i32.const 0) (i32.const 0) (i32.const -1)))
    (call $report)"#,
        text = fill(0x4000, b'a', 32768)
    );
    let (mut g, state) = quota_guest(2, "", &body, |o| o.quotas.local_reply_bytes = 16384);
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // Over the quota: BAD_ARGUMENT; a 64 MiB body past the end of memory:
    // INVALID_MEMORY_ACCESS (it was BAD_ARGUMENT); within both: OK.
    assert_eq!(statuses(&ex), vec![2, 6, 0]);
    let replies: Vec<usize> =
        g.vm.take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::LocalResponse { response, .. } => Some(response.body.len()),
                _ => None,
            })
            .collect();
    assert_eq!(replies, vec![1024]);
    assert_eq!(state.count(Limit::LocalReplyBytes), 1);
    assert_one_line(&g.logs, "limits.localReplyBytes (16384)");
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn a_looping_start_function_is_refused_naming_the_start_up_deadline() {
    let neighbour = healthy_neighbour();
    let module = Wat {
        body: format!("(func $boot {SPIN}) (start $boot)"),
        ..Wat::default()
    }
    .load();
    let logs = Logs::default();
    let mut opts = options(&logs);
    opts.start_timeout = Duration::from_millis(50);
    let err = host().new_vm(&module, opts).unwrap_err();
    assert!(
        matches!(
            err,
            VmError::Start(CallbackError::Timeout {
                callback: "the module's start function",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the module's start-up code failed: the module's start function ran past its 50ms deadline and was stopped"
    );
    assert_neighbours_unharmed(neighbour);
}

#[test]
fn quotas_out_of_range_are_refused_when_the_vm_is_built_naming_the_field() {
    let module = Wat::default().load();
    let logs = Logs::default();
    for (tweak, expected) in [
        (
            Box::new(|q: &mut Quotas| q.header_count = 0) as Box<dyn Fn(&mut Quotas)>,
            "limits.headerCount is 0: it must be between 1 and 1048576",
        ),
        (
            Box::new(|q: &mut Quotas| q.shared_data_bytes = 4 << 30),
            "limits.sharedDataBytes is 4294967296: it must be between 1 and 1073741824",
        ),
        (
            Box::new(|q: &mut Quotas| q.metrics = 1_000_000),
            "limits.metrics is 1000000: it must be between 1 and 10000",
        ),
    ] {
        let mut opts = options(&logs);
        tweak(&mut opts.quotas);
        let err = host().new_vm(&module, opts).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn the_quotas_of_one_filter_do_not_touch_another() {
    // Two filters' VMs, one over its header quota: the other's counters stay at zero and
    // its requests pass untouched.
    let data = r#"(data (i32.const 0x400) "x-h") (data (i32.const 0x410) "v")"#;
    let body = counted_loop(
        1000,
        "(call $add (i32.const 0) (i32.const 0x400) (i32.const 3) (i32.const 0x410) (i32.const 1))",
    );
    let (mut noisy, noisy_state) = quota_guest(1, data, &body, |o| o.quotas.header_count = 16);
    let (mut quiet, quiet_state) = quota_guest(1, data, "", |_| {});
    for _ in 0..50 {
        let (_, r) = noisy.request(GET_ROOT);
        assert_eq!(r.unwrap(), Action::Continue);
        let (ex, r) = quiet.request(GET_ROOT);
        assert_eq!(r.unwrap(), Action::Continue);
        assert_eq!(original_headers(&ex), headers_of(GET_ROOT));
    }
    assert_eq!(noisy_state.count(Limit::HeaderCount), 50 * (1000 - 12));
    assert!(quiet_state.refusals().iter().all(|(_, n)| *n == 0));
    assert!(warnings(&quiet.logs, "limits.").is_empty());
    // 50 requests within the 10 s interval: still one line.
    assert_one_line(&noisy.logs, "limits.headerCount (16)");
}

#[test]
fn a_filter_cannot_grow_a_body_past_64_mib_by_appending() {
    let neighbour = healthy_neighbour();
    let module = Wat {
        imports: r#"
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))"#
            .into(),
        memory: r#"(memory (export "memory") 260)"#.into(),
        body: r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32) (local $ok i32) (local $st i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const 6)))
      ;; append 16 MiB (start past the end appends)
      (local.set $st (call $set_buffer (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0x10000) (i32.const 0x1000000)))
      (if (i32.eqz (local.get $st)) (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (call $rec (local.get $st))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (call $report)
    (i32.const 0))"#
            .into(),
        ..Wat::default()
    }
    .load();
    let mut g = start_guest(&module, |o| o.callback_timeout = Duration::from_secs(20));
    let (ex, result) = g.request(GET_ROOT);
    assert_eq!(result.unwrap(), Action::Continue);
    // Four 16 MiB appends fit in 64 MiB; the fifth and sixth: BAD_ARGUMENT.
    assert_eq!(statuses(&ex), vec![0, 0, 0, 0, 2, 2]);
    assert_eq!(ex.lock().request_body.len(), 64 << 20);
    assert!(g.logs.contains(
        LogLevel::Warn,
        "proxy_set_buffer_bytes refused with BAD_ARGUMENT"
    ));
    drop(ex);
    assert_neighbours_unharmed(neighbour);
}
