//! Every limit the host enforces, in one place. Each one protects the host (or the other
//! plugins) from a guest; none of them is a tuning knob for throughput.

use std::time::Duration;

/// Largest serialized header map accepted from a guest (cpp-host limits.h uses the same).
pub const MAX_PAIRS_BYTES: usize = 1 << 20;
/// Most pairs in one serialized map accepted from a guest.
pub const MAX_PAIRS_COUNT: usize = 1024;
/// Largest single buffer a guest may hand to one hostcall (bodies, shared data, queue items,
/// callout bodies, local reply bodies).
pub const MAX_GUEST_BUFFER_BYTES: usize = 16 << 20;
/// Largest `random_get` request (cpp-host: 64 KiB; more gets WASI INVAL).
pub const MAX_RANDOM_GET_BYTES: usize = 64 * 1024;
/// Log messages longer than this are cut (with a marker) before they reach the log sink.
pub const MAX_LOG_MESSAGE_BYTES: usize = 64 * 1024;
/// Most values held by one shared queue. The SDKs accept only OK or NOT_FOUND from an enqueue,
/// so a full queue drops its oldest item (logged and counted) rather than refusing the new one.
pub const MAX_QUEUE_ITEMS: usize = 10_000;
/// Most keys in one vm_id's shared data.
pub const MAX_SHARED_DATA_KEYS: usize = 100_000;
/// Most metrics one plugin may define.
pub const MAX_METRICS_PER_PLUGIN: usize = 10_000;
/// Most callouts (HTTP and gRPC) outstanding per VM.
pub const MAX_PENDING_CALLOUTS: usize = 10_000;
/// Most live stream contexts per VM.
pub const MAX_CONTEXTS: usize = 1 << 20;
/// Most bytes one `fd_write` to stdout/stderr accepts; the guest is told how much was written
/// and may call again (each call within its callback deadline).
pub const MAX_STDIO_WRITE_BYTES: usize = 1 << 20;
/// Bytes of guest stdout/stderr kept while waiting for a newline.
pub const MAX_STDIO_LINE_BYTES: usize = 64 * 1024;

/// Default linear-memory cap per VM (`limits.memory` in a WasmFilter).
pub const DEFAULT_MEMORY_LIMIT_BYTES: usize = 64 << 20;
/// Highest memory cap a plugin may ask for.
pub const MAX_MEMORY_LIMIT_BYTES: usize = 1 << 30;
/// Default wall-clock budget for one callback (`limits.callbackTimeout`).
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_millis(100);
/// Budget for module start-up (`_initialize`, `main`, `_start`) and `proxy_on_vm_start` /
/// `proxy_on_configure`, which may legitimately parse large configurations.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(5);
/// Period of the engine's epoch ticker; callback deadlines are rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);
/// Largest wasm stack (wasmtime `max_wasm_stack`).
pub const MAX_WASM_STACK_BYTES: usize = 1 << 20;
/// Most instances the pooling allocator keeps slots for.
pub const POOL_TOTAL_INSTANCES: u32 = 1000;
