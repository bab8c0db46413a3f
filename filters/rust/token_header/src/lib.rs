//! `token_header`: an HTTP filter that reads the token a service plugin shares.
//!
//! Contract (dataplane/daemon/tests/network.rs asserts exactly this):
//!
//! * Request headers: sets request header `x-token` to shared data `token` (UTF-8 lossy), or to
//!   `none` when it is absent. Continue.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream))
    }
}

struct Stream;

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let value = match self.get_shared_data("token") {
            (Some(bytes), _) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => "none".into(),
        };
        self.set_http_request_header("x-token", Some(&value));
        Action::Continue
    }
}
