//! The wasmfilter operator, library part: resolving module references in OCI registries
//! ([`oci`]), the content-addressed module cache ([`cache`]), registry credentials
//! ([`auth`]). The WasmFilter controller and the control plane are not here yet.

pub mod auth;
pub mod cache;
pub mod oci;

pub use auth::{Credentials, credentials_from_dockerconfigjson};
pub use cache::ModuleCache;
pub use oci::{Layout, ResolveError, ResolvedModule, Resolver, ResolverConfig};
