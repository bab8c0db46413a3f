//! What a VM's store holds: its contexts, the callback in flight, and what the guest asked for.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::{Memory, StoreLimits, TypedFunc};

use crate::abi::{AbiVersion, LogLevel};
use crate::exchange::{Effect, HttpCallResponse, SharedExchange};
use crate::foreign::ForeignFunctions;
use crate::metrics::MetricsRegistry;
use crate::pairs::Fields;
use crate::quota::{Limit, QuotaState, Quotas};
use crate::shared::{QueueReady, SharedState};

/// One plugin (filter) as the host runs it: its identity and configuration.
///
/// Cloning is cheap: the configurations are shared, not copied, by every VM the plugin runs
/// in (one per worker, and each rebuild). Their bytes reach guest memory only when the guest
/// asks for the buffer (`proxy_get_buffer_bytes`, `proxy_get_configuration`).
#[derive(Clone, Debug, Default)]
pub struct PluginSpec {
    /// The filter's name (`plugin_name`), used in logs and metrics.
    pub name: String,
    /// `plugin_root_id`: selects the root context factory in multi-root modules ("" is valid).
    pub root_id: String,
    /// Passed to `proxy_on_vm_start` (buffer type VM_CONFIGURATION).
    pub vm_configuration: Arc<[u8]>,
    /// Passed to `proxy_on_configure` (buffer type PLUGIN_CONFIGURATION).
    pub configuration: Arc<[u8]>,
    /// Where the plugin's own metrics go; share one registry between the plugin's VMs.
    pub metrics: Arc<MetricsRegistry>,
}

/// A log line from a guest (or from the host about a guest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub plugin: String,
    pub vm_id: String,
    pub level: LogLevel,
    pub message: String,
}

/// Where guest log lines go. The default sends them to `tracing` (target `wasm`).
pub type LogSink = Arc<dyn Fn(&LogRecord) + Send + Sync>;

pub fn tracing_log_sink() -> LogSink {
    Arc::new(|r: &LogRecord| match r.level {
        LogLevel::Trace => tracing::trace!(target: "wasm", plugin = %r.plugin, "{}", r.message),
        LogLevel::Debug => tracing::debug!(target: "wasm", plugin = %r.plugin, "{}", r.message),
        LogLevel::Info => tracing::info!(target: "wasm", plugin = %r.plugin, "{}", r.message),
        LogLevel::Warn => tracing::warn!(target: "wasm", plugin = %r.plugin, "{}", r.message),
        LogLevel::Error | LogLevel::Critical => {
            tracing::error!(target: "wasm", plugin = %r.plugin, "{}", r.message)
        }
    })
}

/// What the host needs from the program embedding it, beyond the data it passes in calls.
pub trait Embedder: Send + Sync {
    /// Whether callouts may target `cluster`; an unknown one is refused at dispatch
    /// (`BAD_ARGUMENT` for HTTP, `PARSE_FAILURE` for gRPC, as Envoy does).
    fn has_cluster(&self, cluster: &str) -> bool;

    /// A shared queue owned by a root context of one of the embedder's VMs has new items.
    /// Called from whichever thread enqueued; deliver with [`crate::Vm::on_queue_ready`] on the
    /// owner VM's thread.
    fn queue_ready(&self, ready: QueueReady) {
        let _ = ready;
    }
}

/// An embedder with no clusters and no queue delivery: enough for VMs that make no callouts.
#[derive(Debug, Default)]
pub struct NoClusters;

impl Embedder for NoClusters {
    fn has_cluster(&self, _: &str) -> bool {
        false
    }
}

/// Which callback is running, which decides what buffers and maps are readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    Initializing,
    VmStart,
    Configure,
    Stream,
    HttpCallResponse,
    GrpcCallback,
    ForeignFunction,
    Root,
}

pub(crate) struct RootContext {
    pub plugin: PluginSpec,
}

pub(crate) struct StreamContext {
    pub root_id: u32,
    pub exchange: SharedExchange,
    /// `proxy_on_done` returned false and `proxy_done` has not been called yet.
    pub done_pending: bool,
}

/// What a pending callout's answer goes back to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingCallout {
    pub root_context_id: u32,
    pub grpc: bool,
}

/// Store data of one VM.
pub(crate) struct VmState {
    pub memory: Option<Memory>,
    pub allocator: Option<TypedFunc<i32, i32>>,
    pub limits: StoreLimits,
    pub abi: AbiVersion,
    pub vm_id: String,
    pub instance_id: u64,
    /// Name used in logs before any plugin starts (the module's name).
    pub label: String,
    pub log_level: LogLevel,
    pub log: LogSink,
    /// The module's latest error or critical log message (kept whatever the log level), so a
    /// refused start can say in the module's own words why.
    pub last_error_log: parking_lot::Mutex<Option<String>>,
    pub env: Vec<(String, String)>,
    pub shared: Arc<SharedState>,
    pub foreign: Arc<ForeignFunctions>,
    pub embedder: Arc<dyn Embedder>,

    pub roots: HashMap<u32, RootContext>,
    pub streams: HashMap<u32, StreamContext>,
    pub next_context_id: u32,
    pub next_token: u32,
    pub callouts: HashMap<u32, PendingCallout>,

    /// The context the running callback was called for.
    pub current: Option<u32>,
    /// Set by `proxy_set_effective_context` until the callback returns.
    pub effective: Option<u32>,
    pub phase: Phase,
    /// The guest allocator is running: only logging and WASI are allowed.
    pub allocating: bool,
    pub effects: Vec<Effect>,
    pub call_response: Option<HttpCallResponse>,
    pub grpc_metadata: Option<Fields>,
    pub grpc_message: Option<Vec<u8>>,
    pub foreign_args: Option<Vec<u8>>,
    /// Answer of `proxy_get_status`: the last callout's status code and message.
    pub last_status: (u32, Vec<u8>),
    /// Partial lines written to stdout (0) and stderr (1).
    pub stdio: [Vec<u8>; 2],
    /// Queue items dropped because a queue was full.
    pub queue_overflows: u64,
    /// This filter's quotas, and its refusal counters and log gates (shared by its VMs).
    pub quotas: Quotas,
    pub quota: Arc<QuotaState>,
}

impl VmState {
    /// The context hostcalls act on: the effective one if set, else the callback's own.
    pub fn active_context(&self) -> Option<u32> {
        self.effective.or(self.current)
    }

    /// The root context of `context_id` (itself if it is a root).
    pub fn root_of(&self, context_id: u32) -> Option<u32> {
        if self.roots.contains_key(&context_id) {
            Some(context_id)
        } else {
            self.streams.get(&context_id).map(|s| s.root_id)
        }
    }

    pub fn active_root(&self) -> Option<&RootContext> {
        let ctx = self.active_context()?;
        self.roots.get(&self.root_of(ctx)?)
    }

    pub fn active_stream(&self) -> Option<&StreamContext> {
        self.streams.get(&self.active_context()?)
    }

    pub fn plugin_name(&self) -> &str {
        self.active_root()
            .map(|r| r.plugin.name.as_str())
            .unwrap_or(self.label.as_str())
    }

    /// Logs a record for the filter, within its `logRecordsPerSecond`: past it, records are
    /// dropped and counted (critical ones, such as trap reports, are always kept).
    pub fn emit_log(&self, level: LogLevel, message: String) {
        if level >= LogLevel::Error {
            *self.last_error_log.lock() = Some(message.clone());
        }
        if level < self.log_level {
            return;
        }
        if level < LogLevel::Critical && !self.quota.allow_log(self.quotas.log_records_per_second) {
            self.refuse(
                Limit::LogRecordsPerSecond,
                "log records dropped".to_string(),
            );
            return;
        }
        self.sink(level, message);
    }

    /// Counts a refusal by `limit` and logs it, at most one line per limit per
    /// [`crate::limits::QUOTA_LOG_INTERVAL`], whatever the filter's log level; `what` says
    /// what was refused.
    pub fn refuse(&self, limit: Limit, what: String) {
        let Some(suppressed) = self.quota.refuse(limit) else {
            return;
        };
        let more = if suppressed > 0 {
            format!(
                " ({suppressed} more refusals not logged in the last {}s)",
                crate::limits::QUOTA_LOG_INTERVAL.as_secs()
            )
        } else {
            String::new()
        };
        let name = self.plugin_name();
        let line = if limit == Limit::HeaderSyntax {
            format!("filter {name:?} sent a header HTTP cannot carry: {what}{more}")
        } else {
            let field = limit.name();
            let value = self.quotas.value(limit);
            format!(
                "filter {name:?} is over its limits.{field} ({value}): {what}{more}; raise limits.{field} if this is expected"
            )
        };
        self.sink(LogLevel::Warn, line);
    }

    fn sink(&self, level: LogLevel, message: String) {
        (self.log)(&LogRecord {
            plugin: self.plugin_name().to_string(),
            vm_id: self.vm_id.clone(),
            level,
            message,
        });
    }

    pub fn fresh_token(&mut self) -> u32 {
        loop {
            self.next_token = self.next_token.wrapping_add(1);
            if self.next_token != 0 && !self.callouts.contains_key(&self.next_token) {
                return self.next_token;
            }
        }
    }
}
