//! `tick_trap`: traps once in `proxy_on_tick`, so a test can watch the host recover and the
//! ticks of the rebuilt VM resume.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"tick_ms": 50, "trap_on_tick": 3}` (the defaults). Invalid JSON: logs an error and
//!   `on_configure` returns false.
//! * Root `on_configure`: defines counter `tick_trap_ticks_total`, sets the tick period.
//! * Root `on_tick`: `tick_trap_ticks_total` +1. On this root's `trap_on_tick`-th tick, if
//!   shared data `tick_trap.trapped` is absent, stores it ("yes") and panics (the SDK aborts:
//!   a trap). So only the first VM to get there traps; its successors tick on.
//! * Streams: pass untouched.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(TickTrap::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    tick_ms: u64,
    trap_on_tick: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tick_ms: 50,
            trap_on_tick: 3,
        }
    }
}

#[derive(Default)]
struct TickTrap {
    config: Config,
    ticks: u64,
    metric: u32,
}

impl Context for TickTrap {}

impl RootContext for TickTrap {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice(&bytes) {
                Ok(c) => self.config = c,
                Err(e) => {
                    let _ = hostcalls::log(
                        LogLevel::Error,
                        &format!("tick_trap: invalid plugin configuration: {e}"),
                    );
                    return false;
                }
            }
        }
        self.metric =
            hostcalls::define_metric(MetricType::Counter, "tick_trap_ticks_total").unwrap_or(0);
        if self.config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(self.config.tick_ms));
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let _ = hostcalls::increment_metric(self.metric, 1);
        if self.ticks == self.config.trap_on_tick
            && matches!(
                hostcalls::get_shared_data("tick_trap.trapped"),
                Ok((None, _))
            )
        {
            let _ = hostcalls::set_shared_data("tick_trap.trapped", Some(b"yes"), None);
            panic!("tick_trap: trapping on tick {}", self.ticks);
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(PassThrough))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Streams pass untouched.
struct PassThrough;

impl Context for PassThrough {}

impl HttpContext for PassThrough {}
