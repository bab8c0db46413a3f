//! `header_rewrite`: rewrites request and response headers (also the project's demo filter).
//!
//! Contract (the host tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"request": {"add": {k: v}, "set": {k: v}, "remove": [k]}, "response": {...same...}}`.
//!   Defaults: no rules. Invalid JSON: logs an error and `on_configure` returns false.
//! * `on_configure` with an empty configuration (no rules, nothing to do) logs exactly one
//!   message at each level trace, debug, info, warn, error: `header_rewrite configured
//!   (<level>)`, which the host tests use to check every level arrives. With a valid
//!   non-empty configuration it logs one info message and nothing else, so a healthy start is
//!   quiet: `header_rewrite configured (request rules: <n>, response rules: <m>)`.
//! * `on_vm_start` reads the VM configuration; if non-empty it is kept (UTF-8, lossy).
//! * Request headers: for each rule set, in this order and in key order within each:
//!   `add` → `proxy_add_header_map_value`, `set` → `proxy_replace_header_map_value`,
//!   `remove` → `proxy_remove_header_map_value`. Returns Continue.
//! * Response headers: the same with the `response` rules, then always adds
//!   `x-wasmfilter: header_rewrite` (add), then, if the VM configuration was non-empty,
//!   sets `x-vm-config: <vm configuration>`. Returns Continue.
//! * The SDK log level is Trace (`proxy_wasm::set_log_level`), so SDK panics are logged as critical.

use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(HeaderRewriteRoot::default())
    });
}}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    request: Rules,
    response: Rules,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Rules {
    add: BTreeMap<String, String>,
    set: BTreeMap<String, String>,
    remove: Vec<String>,
}

impl Rules {
    fn len(&self) -> usize {
        self.add.len() + self.set.len() + self.remove.len()
    }
}

fn log(level: LogLevel, message: &str) {
    // The SDK panics on any status but OK, so there is no error to handle here.
    let _ = hostcalls::log(level, message);
}

#[derive(Default)]
struct HeaderRewriteRoot {
    config: Rc<Config>,
    vm_config: Option<Rc<str>>,
}

impl Context for HeaderRewriteRoot {}

impl RootContext for HeaderRewriteRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.vm_config = self
            .get_vm_configuration()
            .filter(|bytes| !bytes.is_empty())
            .map(|bytes| String::from_utf8_lossy(&bytes).into());
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.iter().all(u8::is_ascii_whitespace) {
            for (level, name) in [
                (LogLevel::Trace, "trace"),
                (LogLevel::Debug, "debug"),
                (LogLevel::Info, "info"),
                (LogLevel::Warn, "warn"),
                (LogLevel::Error, "error"),
            ] {
                log(level, &format!("header_rewrite configured ({name})"));
            }
            self.config = Rc::default();
            return true;
        }
        match serde_json::from_slice::<Config>(&raw) {
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "header_rewrite configured (request rules: {}, response rules: {})",
                        config.request.len(),
                        config.response.len()
                    ),
                );
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log(
                    LogLevel::Error,
                    &format!("header_rewrite: invalid plugin configuration: {err}"),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HeaderRewrite {
            config: Rc::clone(&self.config),
            vm_config: self.vm_config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HeaderRewrite {
    config: Rc<Config>,
    vm_config: Option<Rc<str>>,
}

impl Context for HeaderRewrite {}

impl HttpContext for HeaderRewrite {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let rules = &self.config.request;
        for (name, value) in &rules.add {
            self.add_http_request_header(name, value);
        }
        for (name, value) in &rules.set {
            self.set_http_request_header(name, Some(value));
        }
        for name in &rules.remove {
            self.set_http_request_header(name, None);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let rules = &self.config.response;
        for (name, value) in &rules.add {
            self.add_http_response_header(name, value);
        }
        for (name, value) in &rules.set {
            self.set_http_response_header(name, Some(value));
        }
        for name in &rules.remove {
            self.set_http_response_header(name, None);
        }
        self.add_http_response_header("x-wasmfilter", "header_rewrite");
        if let Some(vm_config) = &self.vm_config {
            self.set_http_response_header("x-vm-config", Some(vm_config));
        }
        Action::Continue
    }
}
