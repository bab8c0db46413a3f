//! A VM: one instance of a module in its own store, hosting one or more plugins (root
//! contexts) and their streams. A VM is used from one thread at a time; the dataplane keeps one
//! per (filter, worker) and never moves a stream between VMs.
//!
//! Every entry point below maps to one proxy-wasm callback (or a fixed sequence of them) and
//! documents when the embedder calls it and what its result means. After any entry point, the
//! embedder drains [`Vm::take_effects`] and carries them out.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Module, Store, StoreLimitsBuilder, Trap, TypedFunc, WasmBacktrace};

use crate::abi::{AbiVersion, Action, ConnectionSide, LogLevel, PeerType};
use crate::exchange::{Effect, HttpCallResponse, SharedExchange};
use crate::host::{Host, LoadError, PluginModule};
use crate::limits::{
    DEFAULT_CALLBACK_TIMEOUT, DEFAULT_MEMORY_LIMIT_BYTES, DEFAULT_START_TIMEOUT, MAX_CONTEXTS,
};
use crate::pairs::Fields;
use crate::state::{
    Embedder, LogSink, NoClusters, Phase, PluginSpec, RootContext, StreamContext, VmState,
};
use crate::wasi::ProcExit;

/// Settings of one VM.
#[derive(Clone)]
pub struct VmOptions {
    /// The VM sharing key (`plugin_vm_id`); shared data and queues are scoped by it.
    pub vm_id: String,
    /// Name used in logs until a plugin starts.
    pub label: String,
    pub memory_limit_bytes: usize,
    /// Wall-clock budget of one stream or timer callback; past it the callback traps.
    pub callback_timeout: Duration,
    /// Budget for start-up and configuration callbacks.
    pub start_timeout: Duration,
    /// Guest log lines below this level are dropped (and `proxy_get_log_level` reports it).
    pub log_level: LogLevel,
    pub log: LogSink,
    /// Environment variables visible through WASI (nothing is inherited).
    pub env: Vec<(String, String)>,
    pub embedder: Arc<dyn Embedder>,
    /// The filter's quotas on host resources.
    pub quotas: crate::Quotas,
    /// The filter's refusal counters and log gates: one per filter, shared by its VMs.
    pub quota_state: Arc<crate::QuotaState>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            vm_id: String::new(),
            label: "wasm".into(),
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT_BYTES,
            callback_timeout: DEFAULT_CALLBACK_TIMEOUT,
            start_timeout: DEFAULT_START_TIMEOUT,
            log_level: LogLevel::Info,
            log: crate::state::tracing_log_sink(),
            env: Vec::new(),
            embedder: Arc::new(NoClusters),
            quotas: crate::Quotas::default(),
            quota_state: Arc::default(),
        }
    }
}

impl std::fmt::Debug for VmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmOptions")
            .field("vm_id", &self.vm_id)
            .field("memory_limit_bytes", &self.memory_limit_bytes)
            .field("callback_timeout", &self.callback_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a callback did not complete. After any of these the VM is failed: every later call
/// returns [`CallbackError::VmFailed`] and the embedder rebuilds the VM.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallbackError {
    #[error("{callback} ran past its {limit:?} deadline and was stopped")]
    Timeout {
        callback: &'static str,
        limit: Duration,
    },
    #[error("{callback} trapped: {message}")]
    Trap {
        callback: &'static str,
        message: String,
        /// The guest stack at the trap, innermost frame first (function names when the
        /// module has a name section).
        backtrace: String,
    },
    #[error("the VM failed earlier ({0}) and must be rebuilt")]
    VmFailed(String),
    #[error("unknown context {0}")]
    UnknownContext(u32),
    #[error("too many live contexts in this VM")]
    TooManyContexts,
}

/// Why a plugin could not start on a VM.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("proxy_on_vm_start returned false: the module rejected its VM configuration{}", said(.0))]
    VmStartRejected(Option<String>),
    #[error("proxy_validate_configuration returned false: the module rejected its configuration{}", said(.0))]
    ConfigurationInvalid(Option<String>),
    #[error("proxy_on_configure returned false: the module rejected its configuration{}", said(.0))]
    ConfigureRejected(Option<String>),
    #[error(transparent)]
    Callback(#[from] CallbackError),
}

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("instantiating the module failed: {0}")]
    Instantiate(String),
    #[error("the module's start-up code failed: {0}")]
    Start(CallbackError),
    #[error("memory limit {0} bytes is above the host's maximum {1}")]
    MemoryLimit(usize, usize),
    #[error("{0}")]
    Quotas(String),
}

type F1 = TypedFunc<i32, ()>;
type F1R = TypedFunc<i32, i32>;
type F2 = TypedFunc<(i32, i32), ()>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3 = TypedFunc<(i32, i32, i32), ()>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// Header callbacks take `(ctx, num_headers, end_of_stream)` since 0.2.0, `(ctx, n)` before.
#[derive(Clone)]
enum HeadersFn {
    V2(F3R),
    V1(F2R),
}

#[derive(Clone, Default)]
struct Exports {
    context_create: Option<F2>,
    vm_start: Option<F2R>,
    validate_configuration: Option<F2R>,
    configure: Option<F2R>,
    tick: Option<F1>,
    queue_ready: Option<F2>,
    request_headers: Option<HeadersFn>,
    request_body: Option<F3R>,
    request_trailers: Option<F2R>,
    response_headers: Option<HeadersFn>,
    response_body: Option<F3R>,
    response_trailers: Option<F2R>,
    http_call_response: Option<F5>,
    grpc_initial_metadata: Option<F3>,
    grpc_trailing_metadata: Option<F3>,
    grpc_receive: Option<F3>,
    grpc_close: Option<F3>,
    foreign_function: Option<F3>,
    new_connection: Option<F1R>,
    downstream_data: Option<F3R>,
    upstream_data: Option<F3R>,
    downstream_close: Option<F2>,
    upstream_close: Option<F2>,
    done: Option<F1R>,
    log: Option<F1>,
    delete: Option<F1>,
}

/// Expected signatures of the callbacks, checked at load time so a module with a wrong one
/// is refused with a clear error instead of failing on its first request.
const SIGNATURES: &[(&str, &[&str])] = &[
    ("proxy_on_context_create", &["(i32, i32) -> ()"]),
    ("proxy_on_vm_start", &["(i32, i32) -> i32"]),
    ("proxy_validate_configuration", &["(i32, i32) -> i32"]),
    ("proxy_on_configure", &["(i32, i32) -> i32"]),
    ("proxy_on_tick", &["(i32) -> ()"]),
    ("proxy_on_queue_ready", &["(i32, i32) -> ()"]),
    (
        "proxy_on_request_headers",
        &["(i32, i32, i32) -> i32", "(i32, i32) -> i32"],
    ),
    ("proxy_on_request_body", &["(i32, i32, i32) -> i32"]),
    ("proxy_on_request_trailers", &["(i32, i32) -> i32"]),
    (
        "proxy_on_response_headers",
        &["(i32, i32, i32) -> i32", "(i32, i32) -> i32"],
    ),
    ("proxy_on_response_body", &["(i32, i32, i32) -> i32"]),
    ("proxy_on_response_trailers", &["(i32, i32) -> i32"]),
    (
        "proxy_on_http_call_response",
        &["(i32, i32, i32, i32, i32) -> ()"],
    ),
    (
        "proxy_on_grpc_receive_initial_metadata",
        &["(i32, i32, i32) -> ()"],
    ),
    (
        "proxy_on_grpc_receive_trailing_metadata",
        &["(i32, i32, i32) -> ()"],
    ),
    (
        "proxy_on_grpc_trailing_metadata",
        &["(i32, i32, i32) -> ()"],
    ),
    ("proxy_on_grpc_receive", &["(i32, i32, i32) -> ()"]),
    ("proxy_on_grpc_close", &["(i32, i32, i32) -> ()"]),
    ("proxy_on_foreign_function", &["(i32, i32, i32) -> ()"]),
    ("proxy_on_new_connection", &["(i32) -> i32"]),
    ("proxy_on_downstream_data", &["(i32, i32, i32) -> i32"]),
    ("proxy_on_upstream_data", &["(i32, i32, i32) -> i32"]),
    (
        "proxy_on_downstream_connection_close",
        &["(i32, i32) -> ()"],
    ),
    ("proxy_on_upstream_connection_close", &["(i32, i32) -> ()"]),
    ("proxy_on_done", &["(i32) -> i32"]),
    ("proxy_on_log", &["(i32) -> ()"]),
    ("proxy_on_delete", &["(i32) -> ()"]),
    ("proxy_on_memory_allocate", &["(i32) -> i32"]),
    ("malloc", &["(i32) -> i32"]),
];

fn signature(ty: &wasmtime::FuncType) -> String {
    let list = |it: &mut dyn Iterator<Item = wasmtime::ValType>| {
        it.map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    };
    let params = list(&mut ty.params());
    let results = list(&mut ty.results());
    format!(
        "({params}) -> {}",
        if results.is_empty() {
            "()".into()
        } else {
            results
        }
    )
}

pub(crate) fn check_export_types(module: &Module) -> Result<(), LoadError> {
    for (name, accepted) in SIGNATURES {
        if let Some(wasmtime::ExternType::Func(ty)) = module.get_export(name) {
            let found = signature(&ty);
            if !accepted.contains(&found.as_str()) {
                return Err(LoadError::BadExport {
                    name: name.to_string(),
                    found,
                    expected: accepted.join(" or "),
                });
            }
        }
    }
    Ok(())
}

/// A VM instance. See the module docs.
pub struct Vm {
    store: Store<VmState>,
    /// Shared, so an entry point takes a reference-counted handle instead of cloning the
    /// `TypedFunc`s it calls (each clone costs about as much as the call itself).
    exports: Arc<Exports>,
    failure: Option<String>,
    module: Arc<PluginModule>,
    callback_timeout: Duration,
    start_timeout: Duration,
    traps: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vm_id", &self.store.data().vm_id)
            .field("module", &self.module.digest)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Instantiates `module` into a new VM and runs its start-up code (`_initialize` then
    /// `main`, or `_start`). No plugin runs yet: add them with [`Vm::start_plugin`].
    pub fn new_vm(
        self: &Arc<Self>,
        module: &Arc<PluginModule>,
        opts: VmOptions,
    ) -> Result<Vm, VmError> {
        if opts.memory_limit_bytes > self.max_memory_bytes {
            return Err(VmError::MemoryLimit(
                opts.memory_limit_bytes,
                self.max_memory_bytes,
            ));
        }
        opts.quotas.validate().map_err(VmError::Quotas)?;
        let state = VmState {
            memory: None,
            allocator: None,
            limits: StoreLimitsBuilder::new()
                .memory_size(opts.memory_limit_bytes)
                .instances(1)
                .build(),
            abi: module.abi,
            vm_id: opts.vm_id,
            instance_id: self
                .next_instance
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            label: opts.label,
            log_level: opts.log_level,
            log: opts.log,
            last_error_log: Default::default(),
            env: opts.env,
            shared: self.shared.clone(),
            foreign: self.foreign.clone(),
            embedder: opts.embedder,
            roots: Default::default(),
            streams: Default::default(),
            next_context_id: 1,
            next_token: 0,
            callouts: Default::default(),
            current: None,
            effective: None,
            phase: Phase::Idle,
            allocating: false,
            effects: Vec::new(),
            call_response: None,
            grpc_metadata: None,
            grpc_message: None,
            foreign_args: None,
            last_status: (0, Vec::new()),
            stdio: [Vec::new(), Vec::new()],
            queue_overflows: 0,
            quotas: opts.quotas,
            quota: opts.quota_state,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(Host::deadline_ticks(opts.start_timeout));
        // A start section runs inside instantiation, under the start-up deadline.
        let instance = module.pre.instantiate(&mut store).map_err(|e| {
            if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                VmError::Start(CallbackError::Timeout {
                    callback: "the module's start function",
                    limit: opts.start_timeout,
                })
            } else {
                VmError::Instantiate(describe(&e))
            }
        })?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocator = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .ok();
        store.data_mut().memory = memory;
        store.data_mut().allocator = allocator;

        let get = |store: &mut Store<VmState>, name: &str| instance.get_func(&mut *store, name);
        macro_rules! typed {
            ($name:literal) => {
                get(&mut store, $name).and_then(|f| f.typed(&store).ok())
            };
        }
        let headers = |store: &mut Store<VmState>, name: &str| -> Option<HeadersFn> {
            let f = instance.get_func(&mut *store, name)?;
            if let Ok(t) = f.typed::<(i32, i32, i32), i32>(&*store) {
                Some(HeadersFn::V2(t))
            } else {
                f.typed::<(i32, i32), i32>(&*store).ok().map(HeadersFn::V1)
            }
        };
        let exports = Exports {
            context_create: typed!("proxy_on_context_create"),
            vm_start: typed!("proxy_on_vm_start"),
            validate_configuration: typed!("proxy_validate_configuration"),
            configure: typed!("proxy_on_configure"),
            tick: typed!("proxy_on_tick"),
            queue_ready: typed!("proxy_on_queue_ready"),
            request_headers: headers(&mut store, "proxy_on_request_headers"),
            request_body: typed!("proxy_on_request_body"),
            request_trailers: typed!("proxy_on_request_trailers"),
            response_headers: headers(&mut store, "proxy_on_response_headers"),
            response_body: typed!("proxy_on_response_body"),
            response_trailers: typed!("proxy_on_response_trailers"),
            http_call_response: typed!("proxy_on_http_call_response"),
            grpc_initial_metadata: typed!("proxy_on_grpc_receive_initial_metadata"),
            grpc_trailing_metadata: typed!("proxy_on_grpc_receive_trailing_metadata")
                .or_else(|| typed!("proxy_on_grpc_trailing_metadata")),
            grpc_receive: typed!("proxy_on_grpc_receive"),
            grpc_close: typed!("proxy_on_grpc_close"),
            foreign_function: typed!("proxy_on_foreign_function"),
            new_connection: typed!("proxy_on_new_connection"),
            downstream_data: typed!("proxy_on_downstream_data"),
            upstream_data: typed!("proxy_on_upstream_data"),
            downstream_close: typed!("proxy_on_downstream_connection_close"),
            upstream_close: typed!("proxy_on_upstream_connection_close"),
            done: typed!("proxy_on_done"),
            log: typed!("proxy_on_log"),
            delete: typed!("proxy_on_delete"),
        };
        let mut vm = Vm {
            store,
            exports: Arc::new(exports),
            failure: None,
            module: module.clone(),
            callback_timeout: opts.callback_timeout,
            start_timeout: opts.start_timeout,
            traps: 0,
        };
        vm.initialize(instance).map_err(VmError::Start)?;
        Ok(vm)
    }
}

fn describe(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

impl Vm {
    /// Runs the WASI reactor or command entry point (start sections already ran).
    fn initialize(&mut self, instance: wasmtime::Instance) -> Result<(), CallbackError> {
        let store = &mut self.store;
        let init = instance
            .get_typed_func::<(), ()>(&mut *store, "_initialize")
            .ok();
        let main = instance
            .get_typed_func::<(i32, i32), i32>(&mut *store, "main")
            .ok();
        let main_void = instance
            .get_typed_func::<(), i32>(&mut *store, "__main_void")
            .ok();
        let start = instance
            .get_typed_func::<(), ()>(&mut *store, "_start")
            .ok();
        let timeout = self.start_timeout;
        if let Some(f) = init {
            self.invoke("_initialize", None, Phase::Initializing, timeout, |s| {
                f.call(s, ())
            })?;
            if let Some(f) = main {
                self.invoke("main", None, Phase::Initializing, timeout, |s| {
                    f.call(s, (0, 0))
                })?;
            } else if let Some(f) = main_void {
                self.invoke("__main_void", None, Phase::Initializing, timeout, |s| {
                    f.call(s, ())
                })?;
            }
        } else if let Some(f) = start {
            self.invoke("_start", None, Phase::Initializing, timeout, |s| {
                f.call(s, ())
            })?;
        }
        Ok(())
    }

    /// The calling convention around every callback: refuse on a failed VM, set the context
    /// and deadline, call, clear per-call state, and turn a trap into a [`CallbackError`]
    /// that fails the VM. `proc_exit(0)` during start-up counts as success.
    fn invoke<R: Default>(
        &mut self,
        callback: &'static str,
        context: Option<u32>,
        phase: Phase,
        timeout: Duration,
        f: impl FnOnce(&mut Store<VmState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallbackError> {
        if let Some(why) = &self.failure {
            return Err(CallbackError::VmFailed(why.clone()));
        }
        {
            let s = self.store.data_mut();
            s.current = context;
            s.effective = None;
            s.phase = phase;
        }
        self.store.set_epoch_deadline(Host::deadline_ticks(timeout));
        let result = f(&mut self.store);
        {
            let s = self.store.data_mut();
            s.current = None;
            s.effective = None;
            s.phase = Phase::Idle;
            s.call_response = None;
            s.grpc_metadata = None;
            s.grpc_message = None;
            s.foreign_args = None;
            s.allocating = false;
            crate::wasi::flush_stdio(s);
        }
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<ProcExit>()
                    && exit.0 == 0
                    && phase == Phase::Initializing
                {
                    return Ok(R::default());
                }
                let err = if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    CallbackError::Timeout {
                        callback,
                        limit: timeout,
                    }
                } else {
                    let backtrace = e
                        .downcast_ref::<WasmBacktrace>()
                        .map(|b| b.to_string())
                        .unwrap_or_default();
                    let message = match e.downcast_ref::<Trap>() {
                        Some(trap) => trap.to_string(),
                        None => e.root_cause().to_string(),
                    };
                    CallbackError::Trap {
                        callback,
                        message,
                        backtrace,
                    }
                };
                self.traps += 1;
                self.failure = Some(err.to_string());
                let detail = match &err {
                    CallbackError::Trap { backtrace, .. } if !backtrace.is_empty() => {
                        format!("{err}\n{backtrace}")
                    }
                    _ => err.to_string(),
                };
                self.store.data().emit_log(LogLevel::Critical, detail);
                Err(err)
            }
        }
    }

    /// Every entry point refuses a failed VM first, whether or not the module exports the
    /// callback, so a stream of a failed filter never silently continues.
    fn check_live(&self) -> Result<(), CallbackError> {
        match &self.failure {
            Some(why) => Err(CallbackError::VmFailed(why.clone())),
            None => Ok(()),
        }
    }

    /// The reason the VM failed, if it did; a failed VM refuses every call.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Traps (and timeouts) this VM has seen (at most one, since a trap fails the VM).
    pub fn traps(&self) -> u64 {
        self.traps
    }

    pub fn module(&self) -> &Arc<PluginModule> {
        &self.module
    }

    pub fn abi_version(&self) -> AbiVersion {
        self.module.abi
    }

    /// Identifies this VM in [`crate::QueueReady`] notifications.
    pub fn instance_id(&self) -> u64 {
        self.store.data().instance_id
    }

    pub fn vm_id(&self) -> &str {
        &self.store.data().vm_id
    }

    /// Bytes of linear memory the VM has now.
    pub fn memory_bytes(&self) -> usize {
        self.store
            .data()
            .memory
            .map(|m| m.data_size(&self.store))
            .unwrap_or(0)
    }

    /// Queue items dropped because a queue of this VM's was full.
    pub fn queue_overflows(&self) -> u64 {
        self.store.data().queue_overflows
    }

    /// Live stream contexts.
    pub fn stream_count(&self) -> usize {
        self.store.data().streams.len()
    }

    /// Everything the guest asked for since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.store.data_mut().effects)
    }

    fn new_context_id(&mut self) -> Result<u32, CallbackError> {
        let s = self.store.data_mut();
        if s.roots.len() + s.streams.len() >= MAX_CONTEXTS {
            return Err(CallbackError::TooManyContexts);
        }
        let id = s.next_context_id;
        s.next_context_id += 1;
        Ok(id)
    }

    /// Creates a root context for `plugin` and runs `proxy_on_context_create`,
    /// `proxy_on_vm_start`, `proxy_validate_configuration` (if exported) and
    /// `proxy_on_configure`. On success the plugin may serve streams; the returned id is its
    /// root context. On failure the root context is removed again.
    pub fn start_plugin(&mut self, plugin: PluginSpec) -> Result<u32, StartError> {
        let id = self.new_context_id()?;
        let vm_config_len = plugin.vm_configuration.len() as i32;
        let config_len = plugin.configuration.len() as i32;
        self.store
            .data_mut()
            .roots
            .insert(id, RootContext { plugin });
        let result = self.run_start(id, vm_config_len, config_len);
        if result.is_err() {
            self.store.data_mut().roots.remove(&id);
        }
        result.map(|_| id)
    }

    fn run_start(
        &mut self,
        id: u32,
        vm_config_len: i32,
        config_len: i32,
    ) -> Result<(), StartError> {
        let t = self.start_timeout;
        let e = self.exports.clone();
        *self.store.data().last_error_log.lock() = None;
        let said = |vm: &Self| vm.store.data().last_error_log.lock().take();
        if let Some(f) = &e.context_create {
            self.invoke("proxy_on_context_create", Some(id), Phase::Root, t, |s| {
                f.call(s, (id as i32, 0))
            })?;
        }
        if let Some(f) = &e.vm_start
            && self.invoke("proxy_on_vm_start", Some(id), Phase::VmStart, t, |s| {
                f.call(s, (id as i32, vm_config_len))
            })? == 0
        {
            return Err(StartError::VmStartRejected(said(self)));
        }
        if let Some(f) = &e.validate_configuration
            && self.invoke(
                "proxy_validate_configuration",
                Some(id),
                Phase::Configure,
                t,
                |s| f.call(s, (id as i32, config_len)),
            )? == 0
        {
            return Err(StartError::ConfigurationInvalid(said(self)));
        }
        if let Some(f) = &e.configure
            && self.invoke("proxy_on_configure", Some(id), Phase::Configure, t, |s| {
                f.call(s, (id as i32, config_len))
            })? == 0
        {
            return Err(StartError::ConfigureRejected(said(self)));
        }
        Ok(())
    }

    /// Retires a plugin: `proxy_on_done`, `proxy_on_delete` on its root context.
    pub fn stop_plugin(&mut self, root_context_id: u32) -> Result<(), CallbackError> {
        if !self.store.data().roots.contains_key(&root_context_id) {
            return Err(CallbackError::UnknownContext(root_context_id));
        }
        let t = self.callback_timeout;
        let e = self.exports.clone();
        let id = root_context_id as i32;
        let mut result = Ok(());
        if let Some(f) = &e.done {
            result = self
                .invoke(
                    "proxy_on_done",
                    Some(root_context_id),
                    Phase::Root,
                    t,
                    |s| f.call(s, id),
                )
                .map(|_| ());
        }
        if result.is_ok()
            && let Some(f) = &e.delete
        {
            result = self.invoke(
                "proxy_on_delete",
                Some(root_context_id),
                Phase::Root,
                t,
                |s| f.call(s, id),
            );
        }
        self.store.data_mut().roots.remove(&root_context_id);
        result
    }

    /// Creates a stream context under `root_context_id` for one HTTP stream
    /// (`proxy_on_context_create(stream, root)`). Pair it with [`Vm::finish_stream`].
    pub fn create_stream(
        &mut self,
        root_context_id: u32,
        exchange: SharedExchange,
    ) -> Result<u32, CallbackError> {
        self.check_live()?;
        if !self.store.data().roots.contains_key(&root_context_id) {
            return Err(CallbackError::UnknownContext(root_context_id));
        }
        if let Some(why) = &self.failure {
            return Err(CallbackError::VmFailed(why.clone()));
        }
        let id = self.new_context_id()?;
        self.store.data_mut().streams.insert(
            id,
            StreamContext {
                root_id: root_context_id,
                exchange,
                done_pending: false,
            },
        );
        let e = self.exports.clone();
        if let Some(f) = e.context_create.as_ref() {
            let t = self.callback_timeout;
            if let Err(e) =
                self.invoke("proxy_on_context_create", Some(id), Phase::Stream, t, |s| {
                    f.call(s, (id as i32, root_context_id as i32))
                })
            {
                self.store.data_mut().streams.remove(&id);
                return Err(e);
            }
        }
        Ok(id)
    }

    fn stream_exchange(&self, ctx: u32) -> Result<SharedExchange, CallbackError> {
        self.store
            .data()
            .streams
            .get(&ctx)
            .map(|s| s.exchange.clone())
            .ok_or(CallbackError::UnknownContext(ctx))
    }

    fn call_headers(
        &mut self,
        name: &'static str,
        f: Option<&HeadersFn>,
        ctx: u32,
        count: usize,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        self.check_live()?;
        let t = self.callback_timeout;
        let c = ctx as i32;
        let n = count as i32;
        let r = match f {
            None => return Ok(Action::Continue),
            Some(HeadersFn::V2(f)) => self.invoke(name, Some(ctx), Phase::Stream, t, |s| {
                f.call(s, (c, n, end_of_stream as i32))
            })?,
            Some(HeadersFn::V1(f)) => {
                self.invoke(name, Some(ctx), Phase::Stream, t, |s| f.call(s, (c, n)))?
            }
        };
        Ok(Action::from_i32(r))
    }

    fn call_stream3(
        &mut self,
        name: &'static str,
        f: Option<&F3R>,
        ctx: u32,
        a: usize,
        b: bool,
    ) -> Result<Action, CallbackError> {
        self.check_live()?;
        let Some(f) = f else {
            return Ok(Action::Continue);
        };
        let t = self.callback_timeout;
        let r = self.invoke(name, Some(ctx), Phase::Stream, t, |s| {
            f.call(s, (ctx as i32, a as i32, b as i32))
        })?;
        Ok(Action::from_i32(r))
    }

    fn call_stream2(
        &mut self,
        name: &'static str,
        f: Option<&F2R>,
        ctx: u32,
        a: usize,
    ) -> Result<Action, CallbackError> {
        self.check_live()?;
        let Some(f) = f else {
            return Ok(Action::Continue);
        };
        let t = self.callback_timeout;
        let r = self.invoke(name, Some(ctx), Phase::Stream, t, |s| {
            f.call(s, (ctx as i32, a as i32))
        })?;
        Ok(Action::from_i32(r))
    }

    /// `proxy_on_request_headers`: the request headers are in the exchange. `Pause` holds the
    /// request until the filter resumes it ([`Effect::ContinueStream`]) or replies locally.
    pub fn on_request_headers(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().request_headers.len();
        let e = self.exports.clone();
        let f = e.request_headers.as_ref();
        self.call_headers("proxy_on_request_headers", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_request_body`: `exchange.request_body` holds the new chunk, or everything
    /// buffered so far if this filter paused on an earlier chunk (sizes are cumulative).
    /// `Pause` asks the embedder to buffer and call again with more.
    pub fn on_request_body(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().request_body.len();
        let e = self.exports.clone();
        let f = e.request_body.as_ref();
        self.call_stream3("proxy_on_request_body", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_request_trailers`.
    pub fn on_request_trailers(&mut self, ctx: u32) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().request_trailers.len();
        let e = self.exports.clone();
        let f = e.request_trailers.as_ref();
        self.call_stream2("proxy_on_request_trailers", f, ctx, n)
    }

    /// `proxy_on_response_headers`: also runs for local replies.
    pub fn on_response_headers(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().response_headers.len();
        let e = self.exports.clone();
        let f = e.response_headers.as_ref();
        self.call_headers("proxy_on_response_headers", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_response_body`: as [`Vm::on_request_body`], for the response.
    pub fn on_response_body(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().response_body.len();
        let e = self.exports.clone();
        let f = e.response_body.as_ref();
        self.call_stream3("proxy_on_response_body", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_response_trailers`.
    pub fn on_response_trailers(&mut self, ctx: u32) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().response_trailers.len();
        let e = self.exports.clone();
        let f = e.response_trailers.as_ref();
        self.call_stream2("proxy_on_response_trailers", f, ctx, n)
    }

    /// `proxy_on_new_connection`: a network filter's context (made with
    /// [`Vm::create_stream`]) sees a new downstream connection. `Pause` holds the connection's
    /// data until the filter resumes it ([`Effect::ContinueStream`]) or closes it
    /// ([`Effect::CloseStream`]).
    pub fn on_new_connection(&mut self, ctx: u32) -> Result<Action, CallbackError> {
        self.stream_exchange(ctx)?;
        self.check_live()?;
        let e = self.exports.clone();
        let Some(f) = e.new_connection.as_ref() else {
            return Ok(Action::Continue);
        };
        let t = self.callback_timeout;
        let r = self.invoke(
            "proxy_on_new_connection",
            Some(ctx),
            Phase::Stream,
            t,
            |s| f.call(s, ctx as i32),
        )?;
        Ok(Action::from_i32(r))
    }

    /// `proxy_on_downstream_data`: `exchange.downstream_data` holds the bytes read from the
    /// client (cumulative while this filter pauses); the filter may rewrite them with
    /// `proxy_set_buffer_bytes(DOWNSTREAM_DATA)`. `Pause` buffers and calls again with more.
    pub fn on_downstream_data(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().downstream_data.len();
        let e = self.exports.clone();
        let f = e.downstream_data.as_ref();
        self.call_stream3("proxy_on_downstream_data", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_upstream_data`: as [`Vm::on_downstream_data`], for bytes from the upstream.
    pub fn on_upstream_data(
        &mut self,
        ctx: u32,
        end_of_stream: bool,
    ) -> Result<Action, CallbackError> {
        let n = self.stream_exchange(ctx)?.lock().upstream_data.len();
        let e = self.exports.clone();
        let f = e.upstream_data.as_ref();
        self.call_stream3("proxy_on_upstream_data", f, ctx, n, end_of_stream)
    }

    /// `proxy_on_downstream_connection_close` / `proxy_on_upstream_connection_close`: one side
    /// of the connection closed; `peer` says who closed it.
    pub fn on_connection_close(
        &mut self,
        ctx: u32,
        side: ConnectionSide,
        peer: PeerType,
    ) -> Result<(), CallbackError> {
        self.stream_exchange(ctx)?;
        self.check_live()?;
        let e = self.exports.clone();
        let (name, f) = match side {
            ConnectionSide::Downstream => (
                "proxy_on_downstream_connection_close",
                e.downstream_close.as_ref(),
            ),
            ConnectionSide::Upstream => (
                "proxy_on_upstream_connection_close",
                e.upstream_close.as_ref(),
            ),
        };
        let Some(f) = f else { return Ok(()) };
        let t = self.callback_timeout;
        self.invoke(name, Some(ctx), Phase::Stream, t, |s| {
            f.call(s, (ctx as i32, peer as i32))
        })
    }

    /// Ends a stream: `proxy_on_done`, `proxy_on_log` (maps still readable), then
    /// `proxy_on_delete`. The context is removed whatever happens. A filter whose
    /// `proxy_on_done` returns false is not waited for: the stream is over either way.
    pub fn finish_stream(&mut self, ctx: u32) -> Result<(), CallbackError> {
        self.check_live()?;
        if !self.store.data().streams.contains_key(&ctx) {
            return Err(CallbackError::UnknownContext(ctx));
        }
        let t = self.callback_timeout;
        let e = self.exports.clone();
        let c = ctx as i32;
        let result = (|| {
            if let Some(f) = &e.done {
                let done = self.invoke("proxy_on_done", Some(ctx), Phase::Stream, t, |s| {
                    f.call(s, c)
                })?;
                if done == 0
                    && let Some(stream) = self.store.data_mut().streams.get_mut(&ctx)
                {
                    stream.done_pending = true;
                }
            }
            if let Some(f) = &e.log {
                self.invoke("proxy_on_log", Some(ctx), Phase::Stream, t, |s| {
                    f.call(s, c)
                })?;
            }
            if let Some(f) = &e.delete {
                self.invoke("proxy_on_delete", Some(ctx), Phase::Stream, t, |s| {
                    f.call(s, c)
                })?;
            }
            Ok(())
        })();
        self.store.data_mut().streams.remove(&ctx);
        result
    }

    /// `proxy_on_tick` for a root context whose tick period is set ([`Effect::TickPeriod`]).
    pub fn on_tick(&mut self, root_context_id: u32) -> Result<(), CallbackError> {
        let e = self.exports.clone();
        self.root_callback1("proxy_on_tick", e.tick.as_ref(), root_context_id)
    }

    fn root_callback1(
        &mut self,
        name: &'static str,
        f: Option<&F1>,
        root: u32,
    ) -> Result<(), CallbackError> {
        self.check_live()?;
        if !self.store.data().roots.contains_key(&root) {
            return Err(CallbackError::UnknownContext(root));
        }
        let Some(f) = f else { return Ok(()) };
        let t = self.callback_timeout;
        self.invoke(name, Some(root), Phase::Root, t, |s| f.call(s, root as i32))
    }

    /// `proxy_on_queue_ready` for the root context that registered `queue_id`.
    pub fn on_queue_ready(
        &mut self,
        root_context_id: u32,
        queue_id: u32,
    ) -> Result<(), CallbackError> {
        self.check_live()?;
        if !self.store.data().roots.contains_key(&root_context_id) {
            return Err(CallbackError::UnknownContext(root_context_id));
        }
        let e = self.exports.clone();
        let Some(f) = e.queue_ready.as_ref() else {
            return Ok(());
        };
        let t = self.callback_timeout;
        self.invoke(
            "proxy_on_queue_ready",
            Some(root_context_id),
            Phase::Root,
            t,
            |s| f.call(s, (root_context_id as i32, queue_id as i32)),
        )
    }

    /// Delivers the answer to HTTP callout `token` to its root context
    /// (`proxy_on_http_call_response`). `None` means the call failed (reset, timeout, no
    /// upstream): the guest sees zero headers and `proxy_get_status` answers "reset".
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: Option<HttpCallResponse>,
    ) -> Result<(), CallbackError> {
        self.check_live()?;
        let Some(pending) = self.store.data_mut().callouts.remove(&token) else {
            return Err(CallbackError::UnknownContext(token));
        };
        let root = pending.root_context_id;
        if !self.store.data().roots.contains_key(&root) {
            return Ok(()); // the plugin went away while the call was in flight
        }
        let e = self.exports.clone();
        let Some(f) = e.http_call_response.as_ref() else {
            return Ok(());
        };
        let (n_headers, body_len, n_trailers) = match &response {
            Some(r) => (r.headers.len().max(1), r.body.len(), r.trailers.len()),
            None => (0, 0, 0),
        };
        {
            let s = self.store.data_mut();
            s.last_status = match &response {
                Some(_) => (0, Vec::new()),
                None => (1, b"reset".to_vec()),
            };
            s.call_response = response;
        }
        let t = self.callback_timeout;
        self.invoke(
            "proxy_on_http_call_response",
            Some(root),
            Phase::HttpCallResponse,
            t,
            |s| {
                s.data_mut().phase = Phase::HttpCallResponse;
                f.call(
                    s,
                    (
                        root as i32,
                        token as i32,
                        n_headers as i32,
                        body_len as i32,
                        n_trailers as i32,
                    ),
                )
            },
        )
    }

    /// Forgets callout `token` without calling the guest: the stream that waited for it ended
    /// (or stopped waiting) before the answer came, as Envoy cancels a stream's callouts when
    /// the stream ends. Its slot no longer counts against the filter's pending-callout quota.
    pub fn cancel_callout(&mut self, token: u32) {
        self.store.data_mut().callouts.remove(&token);
    }

    fn grpc_root(&self, token: u32) -> Result<u32, CallbackError> {
        self.store
            .data()
            .callouts
            .get(&token)
            .map(|p| p.root_context_id)
            .ok_or(CallbackError::UnknownContext(token))
    }

    fn grpc_callback(
        &mut self,
        name: &'static str,
        f: Option<&F3>,
        token: u32,
        arg: i32,
        metadata: Option<Fields>,
        message: Option<Vec<u8>>,
    ) -> Result<(), CallbackError> {
        self.check_live()?;
        let root = self.grpc_root(token)?;
        let Some(f) = f else { return Ok(()) };
        {
            let s = self.store.data_mut();
            s.grpc_metadata = metadata;
            s.grpc_message = message;
        }
        let t = self.callback_timeout;
        self.invoke(name, Some(root), Phase::GrpcCallback, t, |s| {
            f.call(s, (root as i32, token as i32, arg))
        })
    }

    /// `proxy_on_grpc_receive_initial_metadata`.
    pub fn on_grpc_initial_metadata(
        &mut self,
        token: u32,
        metadata: Fields,
    ) -> Result<(), CallbackError> {
        let n = metadata.len() as i32;
        let e = self.exports.clone();
        let f = e.grpc_initial_metadata.as_ref();
        self.grpc_callback(
            "proxy_on_grpc_receive_initial_metadata",
            f,
            token,
            n,
            Some(metadata),
            None,
        )
    }

    /// `proxy_on_grpc_receive`: one response message.
    pub fn on_grpc_message(&mut self, token: u32, message: Vec<u8>) -> Result<(), CallbackError> {
        let n = message.len() as i32;
        let e = self.exports.clone();
        let f = e.grpc_receive.as_ref();
        self.grpc_callback("proxy_on_grpc_receive", f, token, n, None, Some(message))
    }

    /// `proxy_on_grpc_receive_trailing_metadata`.
    pub fn on_grpc_trailing_metadata(
        &mut self,
        token: u32,
        metadata: Fields,
    ) -> Result<(), CallbackError> {
        let n = metadata.len() as i32;
        let e = self.exports.clone();
        let f = e.grpc_trailing_metadata.as_ref();
        self.grpc_callback(
            "proxy_on_grpc_receive_trailing_metadata",
            f,
            token,
            n,
            Some(metadata),
            None,
        )
    }

    /// `proxy_on_grpc_close`: the call or stream is over with `status` (message readable via
    /// `proxy_get_status`); the token is released.
    pub fn on_grpc_close(
        &mut self,
        token: u32,
        status: u32,
        message: &str,
    ) -> Result<(), CallbackError> {
        let root = self.grpc_root(token)?;
        self.store.data_mut().last_status = (status, message.as_bytes().to_vec());
        let e = self.exports.clone();
        let f = e.grpc_close.as_ref();
        let r = self.grpc_callback("proxy_on_grpc_close", f, token, status as i32, None, None);
        let _ = root;
        self.store.data_mut().callouts.remove(&token);
        r
    }

    /// `proxy_on_foreign_function`: the host calls a function the module implements.
    pub fn on_foreign_function(
        &mut self,
        root_context_id: u32,
        function_id: u32,
        args: Vec<u8>,
    ) -> Result<(), CallbackError> {
        self.check_live()?;
        if !self.store.data().roots.contains_key(&root_context_id) {
            return Err(CallbackError::UnknownContext(root_context_id));
        }
        let e = self.exports.clone();
        let Some(f) = e.foreign_function.as_ref() else {
            return Ok(());
        };
        let n = args.len() as i32;
        self.store.data_mut().foreign_args = Some(args);
        let t = self.callback_timeout;
        self.invoke(
            "proxy_on_foreign_function",
            Some(root_context_id),
            Phase::ForeignFunction,
            t,
            |s| {
                s.data_mut().phase = Phase::ForeignFunction;
                f.call(s, (root_context_id as i32, function_id as i32, n))
            },
        )
    }
}

/// ` (the module said: "…")` when the module logged an error before refusing.
fn said(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(" (the module said: {m:?})"),
        None => String::new(),
    }
}
