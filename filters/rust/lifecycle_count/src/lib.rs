//! `lifecycle_count`: counts every stream context's life in metrics, so a test can prove that
//! each context created was ended exactly once, in Envoy's order.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * No configuration. Root `on_configure` defines counters `lifecycle_created_total`,
//!   `lifecycle_done_total`, `lifecycle_log_total`, `lifecycle_delete_total` and
//!   `lifecycle_out_of_order_total`.
//! * HTTP context creation: `lifecycle_created_total` +1.
//! * Request headers: Continue.
//! * `on_done`: `lifecycle_done_total` +1; returns true. `on_log`: `lifecycle_log_total` +1.
//!   The SDK's `on_delete` drops the context: its `Drop` adds `lifecycle_delete_total` +1.
//! * A callback that comes out of order (log before done, a second done or log, or a context
//!   dropped before its log): `lifecycle_out_of_order_total` +1.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(CountRoot::default())
    });
}}

#[derive(Default, Clone, Copy)]
struct Ids {
    created: u32,
    done: u32,
    log: u32,
    delete: u32,
    out_of_order: u32,
}

#[derive(Default)]
struct CountRoot {
    ids: Rc<Ids>,
}

impl Context for CountRoot {}

fn define(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0)
}

fn inc(id: u32) {
    let _ = hostcalls::increment_metric(id, 1);
}

impl RootContext for CountRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        self.ids = Rc::new(Ids {
            created: define("lifecycle_created_total"),
            done: define("lifecycle_done_total"),
            log: define("lifecycle_log_total"),
            delete: define("lifecycle_delete_total"),
            out_of_order: define("lifecycle_out_of_order_total"),
        });
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        inc(self.ids.created);
        Some(Box::new(CountStream {
            ids: self.ids.clone(),
            stage: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct CountStream {
    ids: Rc<Ids>,
    /// 0 = live, 1 = done, 2 = logged.
    stage: u8,
}

impl Context for CountStream {
    fn on_done(&mut self) -> bool {
        inc(self.ids.done);
        if self.stage != 0 {
            inc(self.ids.out_of_order);
        }
        self.stage = 1;
        true
    }
}

impl HttpContext for CountStream {
    fn on_log(&mut self) {
        inc(self.ids.log);
        if self.stage != 1 {
            inc(self.ids.out_of_order);
        }
        self.stage = 2;
    }
}

impl Drop for CountStream {
    fn drop(&mut self) {
        inc(self.ids.delete);
        if self.stage != 2 {
            inc(self.ids.out_of_order);
        }
    }
}
