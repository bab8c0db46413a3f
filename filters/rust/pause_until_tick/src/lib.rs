//! `pause_until_tick`: pauses every request in its headers with nothing outstanding; the root
//! context's tick resumes it later through `proxy_set_effective_context`, as an Envoy filter
//! waiting on a timer would.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"resume_after_ms": 200, "tick_ms": 50}` (the defaults). `resume_after_ms: 0` never
//!   resumes. Invalid JSON: logs an error and `on_configure` returns false.
//! * Root `on_configure`: sets the tick period to `tick_ms`.
//! * Request headers: remembers (context id, now), returns Pause.
//! * Root `on_tick`: for each remembered stream paused at least `resume_after_ms` ago (and
//!   `resume_after_ms > 0`): `proxy_set_effective_context(id)`, adds request header
//!   `x-resumed-by: tick`, `resume_http_request`, and forgets it. A context the host no longer
//!   knows (`BAD_ARGUMENT`) is forgotten.
//! * HTTP `on_log`: forgets the stream.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(PauseRoot::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    resume_after_ms: u64,
    tick_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resume_after_ms: 200,
            tick_ms: 50,
        }
    }
}

type Paused = Rc<RefCell<Vec<(u32, SystemTime)>>>;

#[derive(Default)]
struct PauseRoot {
    config: Rc<Config>,
    paused: Paused,
}

impl Context for PauseRoot {}

impl RootContext for PauseRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = if bytes.iter().all(u8::is_ascii_whitespace) {
            Config::default()
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    proxy_wasm::hostcalls::log(
                        LogLevel::Error,
                        &format!("pause_until_tick: invalid plugin configuration: {e}"),
                    )
                    .ok();
                    return false;
                }
            }
        };
        if config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(config.tick_ms));
        }
        self.config = Rc::new(config);
        true
    }

    fn on_tick(&mut self) {
        if self.config.resume_after_ms == 0 {
            return;
        }
        let now = self.get_current_time();
        let due = Duration::from_millis(self.config.resume_after_ms);
        self.paused.borrow_mut().retain(|&(id, since)| {
            if now.duration_since(since).unwrap_or_default() < due {
                return true;
            }
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-resumed-by",
                    Some("tick"),
                );
                let _ = hostcalls::resume_http_request();
            }
            false
        });
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(PauseStream {
            id: context_id,
            paused: self.paused.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct PauseStream {
    id: u32,
    paused: Paused,
}

impl Context for PauseStream {}

impl HttpContext for PauseStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let now = self.get_current_time();
        self.paused.borrow_mut().push((self.id, now));
        Action::Pause
    }

    fn on_log(&mut self) {
        self.paused.borrow_mut().retain(|&(id, _)| id != self.id);
    }
}
