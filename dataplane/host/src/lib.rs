//! A proxy-wasm host on wasmtime.
//!
//! Runs unmodified filters built with the official proxy-wasm SDKs (Rust, Go, AssemblyScript,
//! C++), ABI versions 0.2.1, 0.2.0 and 0.1.0, without depending on any HTTP server: the
//! embedder (the dataplane, or a test) feeds it stream events and carries out the
//! [`Effect`]s the guest asks for.
//!
//! ```text
//! Host (one per process: Engine, Linker with every hostcall, shared data, epoch clock)
//!  └─ PluginModule (one per module digest: compiled once, InstancePre)
//!      └─ Vm (one per (filter, worker thread): Store, limits, deadline per callback)
//!          ├─ root context per plugin (start_plugin: on_vm_start, on_configure)
//!          └─ stream context per HTTP stream or network connection (create_stream … finish_stream)
//! ```

mod abi;
mod exchange;
mod foreign;
mod host;
mod hostcalls;
pub mod limits;
mod memory;
mod metrics;
pub mod pairs;
mod properties;
mod quota;
mod shared;
mod state;
mod vm;
mod wasi;

pub use abi::{
    AbiVersion, Action, BufferType, ConnectionSide, LogLevel, MapType, MetricType, PeerType,
    Status, StreamType,
};
pub use exchange::{
    Effect, GrpcCallout, HttpCallResponse, HttpCallout, HttpExchange, LocalResponse, SharedExchange,
};
pub use foreign::{ForeignFunction, ForeignFunctions};
pub use host::{Host, HostConfig, LoadError, PluginModule};
pub use metrics::{HISTOGRAM_BOUNDS, MetricSnapshot, MetricsRegistry, split_tags};
pub use pairs::Fields;
pub use properties::{PropertyValue, StreamInfo};
pub use quota::{Limit, QuotaState, Quotas};
pub use shared::{QueueReady, SharedState};
pub use state::{Embedder, LogRecord, LogSink, NoClusters, PluginSpec, tracing_log_sink};
pub use vm::{CallbackError, StartError, Vm, VmError, VmOptions};
pub use wasi::ProcExit;
