//! Shared test harness: one host per test binary, filters built from source by the testkit,
//! a log capture and an embedder that knows a few clusters.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use wasmfilter_host::*;

pub fn host() -> Arc<Host> {
    static HOST: OnceLock<Arc<Host>> = OnceLock::new();
    HOST.get_or_init(|| Host::new(HostConfig::default()).expect("host starts"))
        .clone()
}

pub fn rust_module(name: &str) -> Arc<PluginModule> {
    let bytes = wasmfilter_testkit::rust_filter_bytes(name).expect("Rust filter builds");
    host().load(&bytes).expect("Rust filter loads")
}

#[derive(Clone, Default)]
pub struct Logs(pub Arc<Mutex<Vec<LogRecord>>>);

impl Logs {
    pub fn sink(&self) -> LogSink {
        let logs = self.0.clone();
        Arc::new(move |r: &LogRecord| logs.lock().push(r.clone()))
    }
    pub fn messages(&self) -> Vec<(LogLevel, String)> {
        self.0
            .lock()
            .iter()
            .map(|r| (r.level, r.message.clone()))
            .collect()
    }
    pub fn contains(&self, level: LogLevel, text: &str) -> bool {
        self.0
            .lock()
            .iter()
            .any(|r| r.level == level && r.message.contains(text))
    }
}

#[derive(Default)]
pub struct TestEmbedder {
    pub clusters: Vec<String>,
    pub queue_ready: Mutex<Vec<QueueReady>>,
}

impl Embedder for TestEmbedder {
    fn has_cluster(&self, cluster: &str) -> bool {
        self.clusters.iter().any(|c| c == cluster)
    }
    fn queue_ready(&self, ready: QueueReady) {
        self.queue_ready.lock().push(ready);
    }
}

pub struct Plugin {
    pub vm: Vm,
    pub root: u32,
    pub logs: Logs,
    pub metrics: Arc<MetricsRegistry>,
    pub embedder: Arc<TestEmbedder>,
}

pub struct Setup<'a> {
    pub module: Arc<PluginModule>,
    pub name: &'a str,
    pub config: &'a str,
    pub vm_config: &'a str,
    pub vm_id: &'a str,
    pub root_id: &'a str,
    pub clusters: &'a [&'a str],
    pub log_level: LogLevel,
}

impl<'a> Setup<'a> {
    pub fn new(module: Arc<PluginModule>) -> Setup<'a> {
        Setup {
            module,
            name: "test-filter",
            config: "",
            vm_config: "",
            vm_id: "",
            root_id: "",
            clusters: &[],
            log_level: LogLevel::Trace,
        }
    }

    pub fn start(self) -> Plugin {
        let logs = Logs::default();
        let embedder = Arc::new(TestEmbedder {
            clusters: self.clusters.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        let mut vm = host()
            .new_vm(
                &self.module,
                VmOptions {
                    vm_id: self.vm_id.to_string(),
                    log_level: self.log_level,
                    log: logs.sink(),
                    embedder: embedder.clone(),
                    ..Default::default()
                },
            )
            .expect("VM starts");
        let metrics = Arc::new(MetricsRegistry::default());
        let root = vm
            .start_plugin(PluginSpec {
                name: self.name.to_string(),
                root_id: self.root_id.to_string(),
                vm_configuration: self.vm_config.as_bytes().into(),
                configuration: self.config.as_bytes().into(),
                metrics: metrics.clone(),
            })
            .unwrap_or_else(|e| panic!("plugin starts: {e}; logs: {:?}", logs.messages()));
        Plugin {
            vm,
            root,
            logs,
            metrics,
            embedder,
        }
    }
}

pub fn exchange(headers: &[(&str, &str)]) -> SharedExchange {
    let ex = HttpExchange {
        request_headers: Fields::from_pairs(headers.iter().map(|(k, v)| (*k, v.as_bytes()))),
        ..Default::default()
    };
    Arc::new(Mutex::new(ex))
}

pub fn get_request_header(ex: &SharedExchange, name: &str) -> Option<String> {
    ex.lock().request_headers.get_str(name)
}

pub fn get_response_header(ex: &SharedExchange, name: &str) -> Option<String> {
    ex.lock().response_headers.get_str(name)
}

pub const GET_ROOT: &[(&str, &str)] = &[
    (":method", "GET"),
    (":path", "/"),
    (":authority", "example.test"),
    (":scheme", "http"),
];
