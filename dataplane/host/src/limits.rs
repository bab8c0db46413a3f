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
/// Largest a filter may grow a body (or connection data) buffer to with
/// `proxy_set_buffer_bytes`: 64 MiB. Rewriting a larger body the upstream sent is allowed;
/// growing one past this by repeated appends is `BAD_ARGUMENT`.
pub const MAX_BODY_BYTES_GROWN: usize = 64 << 20;
/// Largest `random_get` request (cpp-host: 64 KiB; more gets WASI INVAL).
pub const MAX_RANDOM_GET_BYTES: usize = 64 * 1024;
/// Log messages longer than this are cut (with a marker) before they reach the log sink.
pub const MAX_LOG_MESSAGE_BYTES: usize = 64 * 1024;
/// Most values held by one shared queue. The SDKs accept only OK or NOT_FOUND from an enqueue,
/// so a full queue drops its oldest item (logged and counted) rather than refusing the new one.
pub const MAX_QUEUE_ITEMS: usize = 10_000;
/// Most keys in one vm_id's shared data.
pub const MAX_SHARED_DATA_KEYS: usize = 100_000;
/// Most shared queues one vm_id may register (each holds up to `limits.queueBytes`): without
/// it (and [`MAX_QUEUE_NAME_BYTES`]), a guest registering a queue under a new 1 MiB name per
/// request grew the host without bound.
pub const MAX_QUEUES_PER_VM_ID: usize = 1_000;
/// Longest shared queue name (bytes); longer ones are BAD_ARGUMENT.
pub const MAX_QUEUE_NAME_BYTES: usize = 4 * 1024;
/// Most metrics one plugin may define: the hard ceiling of `limits.metrics`.
pub const MAX_METRICS_PER_PLUGIN: usize = 10_000;
/// Most callouts (HTTP and gRPC) outstanding per VM: the hard ceiling of
/// `limits.pendingCallouts`.
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

// ---- Per-filter quotas ---------------------------------------------------------------------
// Every host resource a guest can grow, with its default. Each is set per filter
// ([`Quotas`], the dataplane's `limits` block), enforced at the hostcall with the status the
// ABI allows there, counted (`wasmfilter_filter_quota_refusals_total{filter,limit}`) and
// logged at most once per [`QUOTA_LOG_INTERVAL`] per filter and limit.

/// Bytes (keys plus values) of one vm_id's shared data. 64 MiB: room for caches of
/// thousands of entries; without it, 16 MiB values under new keys grew the host by 3.3 GB
/// in 200 requests. Over it, `proxy_set_shared_data` answers CAS_MISMATCH (the only refusal
/// the SDKs accept there).
pub const DEFAULT_SHARED_DATA_BYTES: usize = 64 << 20;
/// Bytes held by one shared queue. 16 MiB: one maximal item, or many small ones; a full
/// queue drops its oldest items (the SDKs accept only OK or NOT_FOUND from an enqueue).
pub const DEFAULT_QUEUE_BYTES: usize = 16 << 20;
/// Items held by one shared queue (oldest dropped past it).
pub const DEFAULT_QUEUE_ITEMS: usize = MAX_QUEUE_ITEMS;
/// Metrics one filter may define. 1,000: far more series than a dashboard reads, and it
/// keeps `/metrics` bounded when a filter defines one metric per request.
pub const DEFAULT_METRICS: usize = 1_000;
/// Longest metric name (tags included). 512 bytes: Envoy-style tagged names stay well under
/// it; a 60,000-byte name is refused with BAD_ARGUMENT.
pub const DEFAULT_METRIC_NAME_BYTES: usize = 512;
/// Most fields a filter may put in one header or trailer map. 1,024 (the pairs decoder's
/// own limit): above what any HTTP server accepts, far below `http::HeaderMap`'s panic at
/// 32,768.
pub const DEFAULT_HEADER_COUNT: usize = 1_024;
/// Most bytes (names plus values) a filter may put in one header or trailer map: 1 MiB, the
/// size of the largest serialized map a guest may hand over.
pub const DEFAULT_HEADER_BYTES: usize = MAX_PAIRS_BYTES;
/// Callouts (HTTP and gRPC) one VM may have outstanding. 1,000: each holds its request
/// until answered; past it, dispatch answers INTERNAL_FAILURE.
pub const DEFAULT_PENDING_CALLOUTS: usize = 1_000;
/// Largest local reply body (`proxy_send_local_response`): 1 MiB, for error pages and
/// small generated answers; over it the call answers BAD_ARGUMENT.
pub const DEFAULT_LOCAL_REPLY_BYTES: usize = 1 << 20;
/// Log records one filter may emit per second, all workers together (with a burst of as
/// many); excess records are dropped and counted. 1,000: a filter logging every request at
/// a few hundred requests per second fits; 7,800 records per request does not.
pub const DEFAULT_LOG_RECORDS_PER_SECOND: u32 = 1_000;
/// A quota refusal is logged at most once per this interval per filter and limit, with the
/// number of refusals not logged since.
pub const QUOTA_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Highest value any byte quota may be set to (1 GiB): a typo cannot lift a quota entirely.
pub const MAX_QUOTA_BYTES: usize = 1 << 30;
/// Highest value any count quota may be set to.
pub const MAX_QUOTA_COUNT: usize = 1 << 20;
