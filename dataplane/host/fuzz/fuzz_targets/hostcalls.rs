//! The hostcall boundary, driven by a guest that runs whatever the fuzzer writes.
//!
//! One long-lived VM (executions stay cheap) runs a WAT interpreter: its
//! `proxy_on_request_headers` / `proxy_on_response_headers` read the request body (the fuzz
//! input after its first byte) and execute it as records of one opcode byte (which hostcall)
//! and 12 little-endian u32 arguments. The top two bits of each argument choose what it is:
//! `00` a small number (low 16 bits: lengths, ids, enum values), `01` a pointer into the
//! program itself (so maps, keys and names are fuzzer-controlled bytes), `10` a pointer into
//! a scratch area for return slots, `11` the raw value with the top bit cleared (wild).
//! Every hostcall of the ABI is reachable, in any order, with any context switches.
//!
//! Invariants: the host never panics; no hostcall traps the guest (they answer statuses);
//! whatever the guest managed to put in the stream's maps is valid HTTP and within the
//! filter's quotas; the VM keeps serving.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;
use wasmfilter_host::pairs::{self, MapRole};
use wasmfilter_host::*;

/// (import name, parameter types: `i` i32, `I` i64). Every `env` hostcall a guest may call.
const HOSTCALLS: &[(&str, &str)] = &[
    ("proxy_log", "iii"),
    ("proxy_get_log_level", "i"),
    ("proxy_get_current_time_nanoseconds", "i"),
    ("proxy_set_tick_period_milliseconds", "i"),
    ("proxy_set_effective_context", "i"),
    ("proxy_done", ""),
    ("proxy_get_buffer_bytes", "iiiii"),
    ("proxy_get_buffer_status", "iii"),
    ("proxy_set_buffer_bytes", "iiiii"),
    ("proxy_get_header_map_pairs", "iii"),
    ("proxy_set_header_map_pairs", "iii"),
    ("proxy_get_header_map_value", "iiiii"),
    ("proxy_add_header_map_value", "iiiii"),
    ("proxy_replace_header_map_value", "iiiii"),
    ("proxy_remove_header_map_value", "iii"),
    ("proxy_get_header_map_size", "ii"),
    ("proxy_continue_stream", "i"),
    ("proxy_close_stream", "i"),
    ("proxy_send_local_response", "iiiiiiii"),
    ("proxy_get_status", "iii"),
    ("proxy_http_call", "iiiiiiiiii"),
    ("proxy_grpc_call", "iiiiiiiiiiii"),
    ("proxy_grpc_stream", "iiiiiiiii"),
    ("proxy_grpc_send", "iiii"),
    ("proxy_grpc_cancel", "i"),
    ("proxy_grpc_close", "i"),
    ("proxy_get_property", "iiii"),
    ("proxy_set_property", "iiii"),
    ("proxy_get_shared_data", "iiiii"),
    ("proxy_set_shared_data", "iiiii"),
    ("proxy_register_shared_queue", "iii"),
    ("proxy_resolve_shared_queue", "iiiii"),
    ("proxy_enqueue_shared_queue", "iii"),
    ("proxy_dequeue_shared_queue", "iii"),
    ("proxy_define_metric", "iiii"),
    ("proxy_increment_metric", "iI"),
    ("proxy_record_metric", "iI"),
    ("proxy_get_metric", "ii"),
    ("proxy_call_foreign_function", "iiiiii"),
];

/// Bytes of one program record: the opcode and 12 arguments.
const RECORD: usize = 1 + 12 * 4;

fn interpreter() -> String {
    let mut imports = String::new();
    let mut dispatch = String::new();
    for (i, (name, params)) in HOSTCALLS.iter().enumerate() {
        let types: Vec<&str> = params
            .chars()
            .map(|p| if p == 'I' { "i64" } else { "i32" })
            .collect();
        imports.push_str(&format!(
            "  (import \"env\" \"{name}\" (func $h{i} (param {}) (result i32)))\n",
            types.join(" ")
        ));
        let args: Vec<String> = params
            .chars()
            .enumerate()
            .map(|(k, p)| {
                if p == 'I' {
                    format!("(i64.extend_i32_s (call $arg (i32.const {k})))")
                } else {
                    format!("(call $arg (i32.const {k}))")
                }
            })
            .collect();
        dispatch.push_str(&format!(
            "    (if (i32.eq (local.get $op) (i32.const {i})) (then (drop (call $h{i} {})) (return)))\n",
            args.join(" ")
        ));
    }
    let n = HOSTCALLS.len();
    format!(
        r#"(module
{imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 0x10000))
  (global $base (mut i32) (i32.const 0))
  (global $end (mut i32) (i32.const 0))
  (global $rec (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (if (i32.lt_u (local.get $end) (local.get $p)) (then (return (i32.const 0))))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 0xffff)) (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func $arg (param $k i32) (result i32)
    (local $v i32)
    (local.set $v (i32.load (i32.add (global.get $rec) (i32.add (i32.const 1) (i32.shl (local.get $k) (i32.const 2))))))
    (block $wild
      (block $scratch
        (block $program
          (block $small
            (br_table $small $program $scratch $wild (i32.shr_u (local.get $v) (i32.const 30))))
          (return (i32.and (local.get $v) (i32.const 0xffff))))
        (return (i32.add (global.get $base) (i32.and (local.get $v) (i32.const 0xffff)))))
      (return (i32.add (i32.const 0x1000) (i32.and (local.get $v) (i32.const 0xfff)))))
    (i32.and (local.get $v) (i32.const 0x7fffffff)))
  (func $dispatch (param $op i32)
    (local.set $op (i32.rem_u (local.get $op) (i32.const {n})))
{dispatch}  )
  (func $run (result i32)
    (global.set $heap (i32.const 0x10000))
    (if (call $h6 (i32.const 0) (i32.const 0) (i32.const 0x7fffffff) (i32.const 0x100) (i32.const 0x104))
      (then (return (i32.const 0))))
    (global.set $base (i32.load (i32.const 0x100)))
    (global.set $end (i32.add (global.get $base) (i32.load (i32.const 0x104))))
    (global.set $rec (global.get $base))
    (block $done
      (loop $next
        (br_if $done (i32.gt_u (i32.add (global.get $rec) (i32.const {RECORD})) (global.get $end)))
        (call $dispatch (i32.load8_u (global.get $rec)))
        (global.set $rec (i32.add (global.get $rec) (i32.const {RECORD})))
        (br $next)))
    (i32.const 0))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $run))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $run))
)"#
    )
}

struct Fixture {
    vm: Vm,
    root: u32,
    quotas: Quotas,
}

/// Small quotas, so that every limit is reached within a short program.
fn quotas() -> Quotas {
    Quotas {
        shared_data_bytes: 64 << 10,
        queue_bytes: 64 << 10,
        queue_items: 16,
        metrics: 32,
        metric_name_bytes: 64,
        header_count: 64,
        header_bytes: 16 << 10,
        pending_callouts: 16,
        local_reply_bytes: 16 << 10,
        log_records_per_second: 100,
    }
}

fn fixture() -> Fixture {
    let host = Host::new(HostConfig {
        pooling: false,
        max_memory_bytes: 16 << 20,
        ..Default::default()
    })
    .expect("host starts");
    let bytes = wat::parse_str(interpreter()).expect("interpreter assembles");
    let module = host.load(&bytes).expect("interpreter loads");
    let mut vm = host
        .new_vm(
            &module,
            VmOptions {
                vm_id: "fuzz".into(),
                label: "fuzz".into(),
                memory_limit_bytes: 16 << 20,
                callback_timeout: std::time::Duration::from_secs(10),
                log: Arc::new(|_: &LogRecord| {}),
                log_level: LogLevel::Trace,
                quotas: quotas(),
                ..Default::default()
            },
        )
        .expect("VM starts");
    let root = vm
        .start_plugin(PluginSpec {
            name: "fuzz".into(),
            configuration: b"{}".to_vec().into(),
            ..Default::default()
        })
        .expect("plugin starts");
    // The host must outlive the VM: keep it for the process's life.
    std::mem::forget(host);
    Fixture {
        vm,
        root,
        quotas: quotas(),
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, program)) = data.split_first() else {
        return;
    };
    FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let f = cell.get_or_insert_with(fixture);
        let ex = HttpExchange {
            request_headers: Fields::from_pairs([
                (":method", "GET"),
                (":path", "/fuzz"),
                (":authority", "fuzz.test"),
                (":scheme", "http"),
            ]),
            request_body: program.to_vec(),
            response_headers: Fields::from_pairs([(":status", "200"), ("x-up", "1")]),
            ..Default::default()
        };
        let ex: SharedExchange = Arc::new(Mutex::new(ex));
        let ctx = f.vm.create_stream(f.root, ex.clone()).expect("stream");
        let result = if mode & 1 == 0 {
            f.vm.on_request_headers(ctx, mode & 2 == 0)
        } else {
            f.vm.on_response_headers(ctx, mode & 2 == 0)
        };
        assert!(result.is_ok(), "a hostcall trapped or failed: {result:?}");
        drop(f.vm.take_effects());
        f.vm.finish_stream(ctx).expect("stream finishes");
        let ex = ex.lock();
        for (role, map) in [
            (MapRole::RequestHeaders, &ex.request_headers),
            (MapRole::ResponseHeaders, &ex.response_headers),
            (MapRole::Trailers, &ex.request_trailers),
            (MapRole::Trailers, &ex.response_trailers),
        ] {
            if let Err(e) = pairs::check_fields(role, map) {
                panic!("a guest put a field HTTP cannot carry in {role:?}: {e}");
            }
            assert!(map.len() <= f.quotas.header_count, "{} fields", map.len());
            assert!(map.byte_size() <= f.quotas.header_bytes);
        }
        assert!(f.vm.failure().is_none());
    });
});
