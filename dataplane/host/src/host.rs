//! The engine side: one wasmtime `Engine` and `Linker` per process, modules compiled once
//! (or loaded from the on-disk cache) into an `InstancePre`, and VMs instantiated from them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, OptLevel};

use crate::abi::AbiVersion;
use crate::foreign::ForeignFunctions;
use crate::limits::{EPOCH_TICK, MAX_WASM_STACK_BYTES, POOL_TOTAL_INSTANCES};
use crate::shared::SharedState;
use crate::state::VmState;

/// How the process-wide engine is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Use wasmtime's pooling allocator (pre-reserved slots, copy-on-write memory images):
    /// instantiation in microseconds. Off for tools that only compile.
    pub pooling: bool,
    /// Largest linear memory any VM may have; per-VM limits are lower or equal.
    pub max_memory_bytes: usize,
    /// Where compiled modules are kept, keyed by module digest and engine fingerprint.
    pub module_cache_dir: Option<PathBuf>,
    pub foreign_functions: ForeignFunctions,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            pooling: true,
            max_memory_bytes: crate::limits::MAX_MEMORY_LIMIT_BYTES,
            module_cache_dir: None,
            foreign_functions: ForeignFunctions::with_builtins(),
        }
    }
}

/// Why a module cannot be used; each message says what was found and what is expected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not a WebAssembly module: it starts with {0:02x?}, expected the magic bytes 00 61 73 6d"
    )]
    NotWasm(Vec<u8>),
    #[error("the module does not compile: {0}")]
    Invalid(String),
    #[error(
        "not a proxy-wasm module: it exports none of proxy_abi_version_0_2_1, proxy_abi_version_0_2_0, proxy_abi_version_0_1_0 (exports: {0})"
    )]
    NoAbiMarker(String),
    #[error("the module exports no allocator: proxy-wasm needs proxy_on_memory_allocate or malloc")]
    NoAllocator,
    #[error("the module exports no memory named \"memory\"")]
    NoMemory,
    #[error("export {name} has the wrong signature: {found}, expected {expected}")]
    BadExport {
        name: String,
        found: String,
        expected: String,
    },
    #[error("the module imports {0}, which this host does not provide")]
    UnknownImport(String),
}

/// A compiled module, ready to be instantiated into VMs.
pub struct PluginModule {
    pub(crate) pre: InstancePre<VmState>,
    pub abi: AbiVersion,
    /// `sha256:<hex>` of the module bytes.
    pub digest: String,
    pub size: usize,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
}

impl std::fmt::Debug for PluginModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModule")
            .field("abi", &self.abi)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// The host: engine, linker with every hostcall, shared data and queues.
pub struct Host {
    pub(crate) engine: Engine,
    linker: Mutex<Linker<VmState>>,
    pub(crate) shared: Arc<SharedState>,
    pub(crate) foreign: Arc<ForeignFunctions>,
    pub(crate) next_instance: AtomicU64,
    pub(crate) max_memory_bytes: usize,
    cache_dir: Option<PathBuf>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The engine settings every compiled module depends on (part of the cache key).
fn engine_config(cfg: &HostConfig) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .max_wasm_stack(MAX_WASM_STACK_BYTES);
    if cfg.pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_TOTAL_INSTANCES)
            .total_memories(POOL_TOTAL_INSTANCES)
            .total_tables(POOL_TOTAL_INSTANCES)
            .max_memory_size(cfg.max_memory_bytes)
            .max_memories_per_module(1)
            .max_tables_per_module(2)
            .table_elements(100_000)
            .max_core_instance_size(1 << 20);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl Host {
    pub fn new(cfg: HostConfig) -> anyhow::Result<Arc<Host>> {
        let engine = Engine::new(&engine_config(&cfg))?;
        let mut linker = Linker::new(&engine);
        crate::hostcalls::add_to_linker(&mut linker)?;
        crate::wasi::add_to_linker(&mut linker)?;
        if let Some(dir) = &cfg.module_cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            // Callback deadlines count epochs; this thread is the clock.
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        Ok(Arc::new(Host {
            engine,
            linker: Mutex::new(linker),
            shared: SharedState::new(),
            foreign: Arc::new(cfg.foreign_functions),
            next_instance: AtomicU64::new(1),
            max_memory_bytes: cfg.max_memory_bytes,
            cache_dir: cfg.module_cache_dir,
            ticker_stop,
        }))
    }

    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// Number of epoch ticks that covers `d`, plus one for the tick in progress.
    pub(crate) fn deadline_ticks(d: Duration) -> u64 {
        (d.as_micros() / EPOCH_TICK.as_micros().max(1)).min(u128::from(u64::MAX - 1)) as u64 + 1
    }

    /// Validates and compiles a module (or loads its compiled form from the cache).
    /// Compilation happens here and only here: never on the request path.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<PluginModule>, LoadError> {
        if bytes.len() < 8 || bytes[..4] != *b"\0asm" {
            return Err(LoadError::NotWasm(bytes.iter().take(4).copied().collect()));
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let (module, from_cache) = self.compile(bytes, &digest)?;
        let abi = AbiVersion::MARKERS
            .iter()
            .find(|(name, _)| module.get_export(name).is_some())
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let mut names: Vec<&str> = module.exports().map(|e| e.name()).collect();
                names.truncate(12);
                LoadError::NoAbiMarker(names.join(", "))
            })?;
        if module.get_export("proxy_on_memory_allocate").is_none()
            && module.get_export("malloc").is_none()
        {
            return Err(LoadError::NoAllocator);
        }
        match module.get_export("memory") {
            Some(wasmtime::ExternType::Memory(_)) => {}
            _ => return Err(LoadError::NoMemory),
        }
        crate::vm::check_export_types(&module)?;
        let pre = {
            let mut linker = self.linker.lock();
            // Imports no SDK uses trap only if they are called (as cpp-host does), so a module
            // that merely links an exotic function still loads.
            linker
                .define_unknown_imports_as_traps(&module)
                .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
            linker
                .instantiate_pre(&module)
                .map_err(|e| describe_link_error(&module, e))?
        };
        Ok(Arc::new(PluginModule {
            pre,
            abi,
            digest,
            size: bytes.len(),
            from_cache,
        }))
    }

    fn compile(&self, bytes: &[u8], digest: &str) -> Result<(Module, bool), LoadError> {
        let Some(dir) = &self.cache_dir else {
            return Module::new(&self.engine, bytes)
                .map(|m| (m, false))
                .map_err(|e| LoadError::Invalid(format!("{e:#}")));
        };
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            h.finish()
        };
        let path = dir.join(format!(
            "{}-wasmtime{}-{fingerprint:016x}.cwasm",
            digest.trim_start_matches("sha256:"),
            wasmtime_version()
        ));
        if path.exists()
            && let Ok(module) = deserialize_cached(&self.engine, &path)
        {
            return Ok((module, true));
        }
        let module =
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        if let Ok(serialized) = module.serialize() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, serialized).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((module, false))
    }
}

fn wasmtime_version() -> &'static str {
    "48"
}

/// Loads a compiled module written by [`Host::compile`].
#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, path: &std::path::Path) -> wasmtime::Result<Module> {
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output. The file sits in
    // the host's private cache directory, was written by `Module::serialize` of this same
    // wasmtime version (the version and the engine fingerprint are in its name), and was
    // renamed into place only once complete. wasmtime still checks the header, version and
    // engine settings, and anything it refuses is recompiled from the original bytes.
    unsafe { Module::deserialize_file(engine, path) }
}

fn describe_link_error(module: &Module, e: wasmtime::Error) -> LoadError {
    let text = format!("{e:#}");
    for import in module.imports() {
        let name = format!("{}.{}", import.module(), import.name());
        if text.contains(import.name()) {
            return LoadError::UnknownImport(format!("{name} ({text})"));
        }
    }
    LoadError::Invalid(text)
}
