//! OCI module references for wasmfilter: resolving them in registries ([`oci`]), the
//! content-addressed module cache ([`cache`]) and registry credentials ([`auth`]). Used by the
//! operator (WasmFilter modules) and by the dataplane in standalone mode (`image:` filters).

pub mod auth;
pub mod cache;
pub mod oci;

pub use auth::{Credentials, credentials_from_dockerconfigjson};
pub use cache::ModuleCache;
pub use oci::{Layout, ResolveError, ResolvedModule, Resolver, ResolverConfig};
