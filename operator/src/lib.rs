//! The wasmfilter operator, library part. Module resolution, the module cache and registry
//! credentials live in `wasmfilter-oci` (the dataplane uses them too) and are re-exported
//! here. The WasmFilter controller and the control plane are not here yet.

pub use wasmfilter_oci::*;
